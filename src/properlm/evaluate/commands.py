"""``properlm evaluate`` and ``properlm report``: thin wrappers over :func:`evaluate_run` and :func:`report`.

    properlm evaluate --run runs/demo                       # every method, greedy
    properlm evaluate --run runs/demo --methods stage1 proper rag --sample
    properlm evaluate --run runs/demo --predictions oppu_output.json --name oppu-original
    properlm report runs/demo runs/demo-lowres runs/demo-text-router --out reports/demo

Add to the CLI table as ``"evaluate": "properlm.evaluate.commands:register"``:
``register`` adds both commands. Heavy imports happen inside the command
functions so that ``properlm --help`` stays fast.
"""

from __future__ import annotations

import argparse

from properlm.errors import ProperError

METHOD_CHOICES = ("stage1", "stage2", "proper", "stage3", "rag", "pag", "oppu-kv", "oppu-mlp", "user-mean", "item-mean",
                  "user-bm25")


def format_scores(result: dict) -> str:
    """A plain-text table of an :func:`evaluate_run` result: one line per method."""
    lines = []
    for method, e in result["methods"].items():
        metrics = "  ".join(f"{k}={v:.4f}" for k, v in e["metrics"].items()) or "(no golds: not scored)"
        lines.append(f"{method:<9} {metrics}   [{e['n_queries']} queries, {e['n_users']} users]")
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``properlm evaluate --run DIR``: predictions and scores under ``DIR/eval``."""
    from properlm.evaluate.evaluate import evaluate_run, score_prediction_file

    if args.predictions:
        if args.methods:
            raise ProperError("give either --methods (generate and score) or --predictions (score a file), not both")
        entry = score_prediction_file(args.run, args.predictions, args.name)
        print(format_scores({"methods": {args.name: entry}}))
        return 0
    result = evaluate_run(args.run, methods=args.methods, sample=args.sample, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, rag_k=args.rag_k, progress=not args.quiet, decode=args.decode)
    print(f"{result['task']} on {args.run}:")
    print(format_scores(result))
    print(f"predictions and per-user scores in {args.run}/eval/<method>/")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``properlm report RUN... --out DIR``: tables (Markdown, JSON, CSV) and figures."""
    from properlm.evaluate.report import grid_timings, report

    result = report(args.runs, args.out, figures=not args.no_figures, timings=grid_timings(args.runs))
    print(f"wrote {len(result['files'])} files to {args.out} (start with {args.out}/report.md)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``properlm evaluate`` and ``properlm report``."""
    p = subparsers.add_parser("evaluate", help="evaluate PROPER and the baselines on a run's target users")
    p.add_argument("--run", required=True, help="run directory (from properlm train)")
    p.add_argument("--methods", nargs="+", default=None, choices=METHOD_CHOICES, metavar="METHOD",
                   help=f"methods to evaluate (default: all): {', '.join(METHOD_CHOICES)}")
    p.add_argument("--sample", action="store_true",
                   help="OPPU's sampling (temperature 0.1, top-p 0.9) instead of greedy decoding")
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer length limit (default: by task kind)")
    p.add_argument("--decode", choices=("free", "labels"), default="free",
                   help="free: LaMP's free generation (default); labels: classification and rating tasks, the label "
                        "with the highest likelihood (filed as METHOD@labels; ratings also METHOD@expected, the "
                        "expected rating under those likelihoods)")
    p.add_argument("--batch-size", type=int, default=32, help="queries decoded together (mixing users)")
    p.add_argument("--rag-k", type=int, default=1, help="history items retrieved for rag and pag")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--predictions", default=None, metavar="FILE",
                   help="score this prediction file (LaMP's layout) instead of generating")
    p.add_argument("--name", default="external", help="method name for --predictions (default: external)")
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser("report", help="tables and figures from evaluated runs")
    p.add_argument("runs", nargs="+", metavar="RUN", help="evaluated run directories")
    p.add_argument("--out", required=True, help="output directory for report.md, .json, .csv and .png files")
    p.add_argument("--no-figures", action="store_true", help="tables only (figures load the models)")
    p.set_defaults(func=cmd_report)
