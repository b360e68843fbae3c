"""``properlm generate`` and ``properlm users``: thin wrappers over functions of several layers.

``generate`` answers with :func:`properlm.load_run`; ``users add`` trains with
:func:`properlm.train.users.add_users`, ``users delete`` forgets with
:func:`properlm.forget.forget_users`, ``users list`` reads the user store. They sit
here, above the layers, because ``delete`` and ``generate`` call functions that are
themselves above the train layer.
"""

from __future__ import annotations

import argparse


def cmd_generate(args: argparse.Namespace) -> int:
    """Answer one query for one user with their personalized model; stderr says which model answered."""
    import sys

    from properlm.api import MODEL_BASE, load_run

    lm = load_run(args.run)
    user = None if args.user == "base" else args.user
    which = lm.model_for(user, fallback=args.fallback)
    answer = lm.generate([args.query], [user], max_new_tokens=args.max_new_tokens, fallback=args.fallback)[0]
    said = {"user-lora": f"personalized for {user} (their stage-3 LoRA)",
            "group": f"personalized for {user} (their stage-2 group)",
            MODEL_BASE: "the non-personalized model" + (f" ({user} has no personalized model)" if user else "")}
    print(f"[model: {said[which]}]", file=sys.stderr)
    print(answer)
    return 0


def register_generate(subparsers: argparse._SubParsersAction) -> None:
    """Add ``properlm generate``."""
    p = subparsers.add_parser("generate", help="answer a query with a user's personalized model")
    p.add_argument("--run", required=True, help="a trained run directory")
    p.add_argument("--user", required=True,
                   help="user id ('base': the non-personalized model); an id without a personalized model is an error")
    p.add_argument("--fallback", action="store_true",
                   help="answer an id without a personalized model with the non-personalized model instead of failing")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("query", help="the query text")
    p.set_defaults(func=cmd_generate)


def cmd_users_add(args: argparse.Namespace) -> int:
    from properlm.train.users import add_instant, add_users

    if args.instant:
        if args.resume:
            from properlm.errors import ProperError

            raise ProperError("--instant has nothing to resume (it takes no training step)")
        given, kept = add_instant(args.run, args.users, data=args.data)
        print(f"gave {len(given)} user(s) their instant stage-2 embedding in {args.run} (answered by their group; "
              f"no LoRA: add them again without --instant to train it)"
              + (f"; {len(kept)} already had an embedding, kept" if kept else ""))
        return 0
    done = add_users(args.run, args.users, data=args.data, resume=args.resume)
    print(f"trained LoRAs of {len(done)} user(s) in {args.run}; every other user unchanged")
    return 0


def cmd_users_delete(args: argparse.Namespace) -> int:
    from properlm.errors import ProperError
    from properlm.forget import forget_users

    if not args.users and not args.resume:
        raise ProperError("say which users to delete: --users ID [ID ...] (or --resume to finish an interrupted delete)")
    removed = forget_users(args.run, args.users or [])
    print(", ".join(f"{k}: {v} removed" for k, v in removed.items()) or "nothing to remove")
    return 0


def cmd_users_list(args: argparse.Namespace) -> int:
    from properlm.store.run import LORA, open_bank

    bank = open_bank(args.run, LORA)
    for u in (bank.users() if bank is not None else []):
        print(u if u.isprintable() else repr(u))  # an id from before the id rule must not break lines
    return 0


def register_users(subparsers: argparse._SubParsersAction) -> None:
    """Add ``properlm users add|delete``."""
    p = subparsers.add_parser("users", help="add, refresh, list or delete users of a trained run")
    p.set_defaults(func=lambda _a: p.print_help())
    sub = p.add_subparsers(metavar="SUBCOMMAND")
    a = sub.add_parser("add", help="train LoRAs for new users (or refresh existing ones) against the frozen router")
    a.add_argument("--run", required=True, help="a run with all three stages")
    a.add_argument("--users", nargs="+", required=True, help="user ids")
    a.add_argument("--data", default=None, help="dataset holding their histories (default: the run's data)")
    a.add_argument("--resume", action="store_true", help="continue an interrupted add of the same users")
    a.add_argument("--instant", action="store_true",
                   help="only give new users their stage-2 embedding from the run's instant encoder (seconds, no "
                        "gradient step, no LoRA): they are answered by their group until an add without --instant "
                        "trains their LoRA")
    a.set_defaults(func=cmd_users_add)
    d = sub.add_parser("delete", help="remove every trace of users from a run (adapters, embeddings, moments, "
                                      "checkpoints, profiles, predictions, scores, split lists)")
    d.add_argument("--run", required=True, help="a run directory")
    d.add_argument("--users", nargs="+", default=None, help="user ids")
    d.add_argument("--resume", action="store_true", help="finish a delete that was interrupted (also done by any "
                                                          "later delete and by loading the run)")
    d.set_defaults(func=cmd_users_delete)
    ls = sub.add_parser("list", help="list the users with a personal LoRA (walks the whole store)")
    ls.add_argument("--run", required=True, help="a run directory")
    ls.set_defaults(func=cmd_users_list)


def cmd_instant_fit(args: argparse.Namespace) -> int:
    """Fit the instant encoder of a run's stage 2 and print its report."""
    import json

    from properlm.train.users import fit_run_encoder

    enc = fit_run_encoder(args.run)
    print(json.dumps(enc.report, indent=1))
    print(f"wrote {args.run}/group/instant.safetensors")
    return 0


def cmd_instant_compare(args: argparse.Namespace) -> int:
    """Mean, instant and fitted stage-2 embeddings and PROPER on a run's targets, with intervals over users."""
    from properlm.evaluate.unseen import compare_unseen, format_comparison

    result = compare_unseen(args.run, routings=args.routings, decode=args.decode, batch_size=args.batch_size,
                            progress=not args.quiet)
    print(format_comparison(result))
    return 0


def register_instant(subparsers: argparse._SubParsersAction) -> None:
    """Add ``properlm instant fit|compare``."""
    from properlm.evaluate.unseen import ROUTINGS

    p = subparsers.add_parser("instant", help="instant group routing: fit the encoder of a run, compare it")
    p.set_defaults(func=lambda _a: p.print_help())
    sub = p.add_subparsers(metavar="SUBCOMMAND")
    f = sub.add_parser("fit", help="fit the instant encoder (a user's stage-2 embedding from their history, no "
                                   "gradient step) into a run with stage 2, from its training users")
    f.add_argument("--run", required=True, help="a run with stage 2")
    f.set_defaults(func=cmd_instant_fit)
    c = sub.add_parser("compare", help="the run's targets at stage 2 with the mean, instant and fitted embedding, and "
                                       "PROPER: metrics with 95%% intervals over users, seconds per user")
    c.add_argument("--run", required=True, help="a trained run with an instant encoder")
    c.add_argument("--routings", nargs="+", default=None, choices=ROUTINGS, metavar="ROUTING",
                   help=f"what to compare (default: all): {', '.join(ROUTINGS)}")
    c.add_argument("--decode", choices=("free", "labels", "expected"), default="free",
                   help="free generation (default), the best label by likelihood (classification, rating), or the "
                        "expected rating under the labels' likelihoods (rating tasks)")
    c.add_argument("--batch-size", type=int, default=32, help="queries answered together")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_instant_compare)
