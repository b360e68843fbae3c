"""The main job at small scale: ``make demo`` / ``properlm demo``.

    properlm demo --out runs/demo

A synthetic task with planted user groups -> PROPER's three stages on the
embedded SmolLM2-135M -> the baselines (non-personalized, RAG, OPPU) -> Table 1,
printed and written to ``RUN/report/``. Sized for a laptop CPU (minutes, with
progress bars); rerunning continues where an interrupted run stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

DEMO_METHODS = ("stage1", "stage2", "proper", "rag", "oppu-mlp")


def default_config() -> Path | None:
    """``configs/demo.yaml`` of the source tree, when properlm runs from a checkout."""
    p = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    return p if p.exists() else None


def run_demo(out: str | Path = "runs/demo", config: str | Path | None = None, overrides: list[str] = (),
             methods: tuple[str, ...] = DEMO_METHODS) -> dict:
    """Train, evaluate and report; returns the report summary (see ``evaluate.report.report``)."""
    from properlm.config import load_config
    from properlm.evaluate.evaluate import evaluate_run
    from properlm.evaluate.report import markdown_table, report
    from properlm.run_config import RunConfig
    from properlm.train.run import train

    out = Path(out)
    cfg = load_config(RunConfig, config or default_config(), list(overrides))
    t0 = time.time()
    print(f"[1/3] training PROPER's three stages on {cfg.base_model} ({cfg.data.path}) into {out}", flush=True)
    train(cfg, out, resume=True)
    t1 = time.time()
    print(f"[2/3] evaluating {', '.join(methods)} on the target users' held-out queries", flush=True)
    result = evaluate_run(out, methods=list(methods), progress=cfg.progress)
    t2 = time.time()
    print("[3/3] writing the report", flush=True)
    summary = report([result], out / "report")
    table = summary["tables"].get("table1")
    if table is not None:
        print("\nTable 1 (target users' held-out queries)\n")
        print(markdown_table(table))
    if summary.get("routing_ari") is not None:
        print(f"\nRouting vs planted groups: adjusted Rand index {summary['routing_ari']:.3f} "
              f"(expert weights averaged over sites), {summary['routing_ari_per_site']:.3f} (per site)")
    print(f"\ntimes: training {t1 - t0:.0f} s, evaluation {t2 - t1:.0f} s, total {time.time() - t0:.0f} s")
    print(f"report: {out / 'report' / 'report.md'}")
    return summary


def cmd_demo(args) -> int:
    run_demo(args.out, args.config, args.overrides)
    return 0


def register(subparsers) -> None:
    """Add ``properlm demo``."""
    p = subparsers.add_parser("demo", help="the whole pipeline at small scale: train, baselines, Table 1")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--config", default=None, help="YAML config (default: configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. base_model=tiny-random")
    p.set_defaults(func=cmd_demo)
