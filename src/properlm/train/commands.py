"""``properlm train``, ``generate`` and ``users``: thin wrappers over the train, api and forget functions."""

from __future__ import annotations

import argparse
import os


def cmd_train(args: argparse.Namespace) -> int:
    """Train one stage or all three into a run directory."""
    from pathlib import Path

    from properlm.config import load_config
    from properlm.errors import ProperError
    from properlm.run_config import RunConfig
    from properlm.train.run import STAGES, train

    if args.processes > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(args.processes)
    run_dir = Path(args.out)
    config = args.config
    if config is None and args.resume and (run_dir / "config.yaml").exists():
        config = run_dir / "config.yaml"  # resuming: the run's own config
    cfg = load_config(RunConfig, config, args.overrides)
    if not args.all and args.stage is None:
        raise ProperError("say which stage to train: --stage population|group|user, or --all")
    stages = STAGES if args.all else (args.stage,)
    train(cfg, run_dir, stages, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # one line for a run of several processes, not one per rank
        print(f"trained {', '.join(stages)} into {run_dir}")
    return 0


def _launch(n: int) -> int:
    """Run this same ``properlm train`` command in ``n`` processes on this machine (torch's launcher).

    On CPUs they share the cores (one torch thread each, gloo); on a machine with
    ``n`` GPUs each process takes one (NCCL). For several machines use
    ``accelerate launch`` (docs/training.md).
    """
    import socket
    import subprocess
    import sys

    argv = sys.argv[1:]
    i = argv.index("--processes")
    argv = argv[:i] + argv[i + 2:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "properlm.cli", *argv]
    return subprocess.call(cmd, env=env)


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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``properlm train``."""
    p = subparsers.add_parser("train", help="train PROPER's stages (population, group, user)",
                              description="Train one stage or all three. Overrides are dotted key=value pairs, "
                                          "e.g. group.num_experts=8 user.lr=1e-4 base_model=/models/llama-2-7b.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--stage", choices=("population", "group", "user"), help="train this stage (earlier ones must exist)")
    g.add_argument("--all", action="store_true", help="train the three stages in order")
    p.add_argument("--config", default=None, help="YAML config (see configs/); default: built-in defaults")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="train in N processes on this machine (data-parallel stages 1-2, users sharded in stage 3; "
                        "the same as accelerate launch --multi_gpu --num_processes N -m properlm train ...)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(func=cmd_train)


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
