"""``properlm train``: a thin wrapper over :func:`properlm.train.run.train` (and its multi-process launch)."""

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
    if config is None and (run_dir / "config.yaml").exists():
        config = run_dir / "config.yaml"  # resuming, or the next stage of a run: the run's own config
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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``properlm train``."""
    p = subparsers.add_parser("train", help="train PROPER's stages (population, group, user)",
                              description="Train one stage or all three. Overrides are dotted key=value pairs, "
                                          "e.g. group.num_experts=8 user.lr=1e-4 base_model=/models/llama-2-7b.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--stage", choices=("population", "group", "user"), help="train this stage (earlier ones must exist)")
    g.add_argument("--all", action="store_true", help="train the three stages in order")
    p.add_argument("--config", default=None,
                   help="YAML config (see configs/); default: the run's own config.yaml when --out is an existing run "
                        "(a later stage, --resume), else built-in defaults")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="train in N processes on this machine (data-parallel stages 1-2, users sharded in stage 3; "
                        "the same as accelerate launch --multi_gpu --num_processes N -m properlm train ...)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(func=cmd_train)
