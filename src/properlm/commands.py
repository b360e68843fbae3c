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
    from properlm.train.users import add_users

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
