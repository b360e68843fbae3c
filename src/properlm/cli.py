"""The ``properlm`` command line: a table from command name to a ``register`` function.

Each entry of :data:`COMMANDS` adds one top-level command (with its subcommands) to
the parser and sets ``func`` on its parsers; ``func(args)`` is a thin call into
properlm's public Python API and returns an exit status (``None`` means 0). An entry
is either the register function itself or a ``"module:function"`` string imported
when the parser is built, so each package can keep its commands beside its code.
Register functions must import heavy modules (torch, transformers) inside the
command functions, so that ``properlm --help`` and ``properlm data ...`` start fast.

Every :class:`~properlm.errors.ProperError` (bad data, bad config, missing model)
reaches the user as one line ``properlm: error: ...`` on stderr, with exit status 2.

Examples::

    properlm data inspect /path/to/movielens-100k
    properlm data synth --out data/synth --seed 1
    properlm data convert interactions.jsonl --out data/mine
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Callable, Sequence

from properlm import __version__
from properlm.errors import ProperError

Register = Callable[["argparse._SubParsersAction"], None]


# --- data ------------------------------------------------------------------------------


def cmd_data_inspect(args: argparse.Namespace) -> int:
    """``properlm data inspect PATH``: check any layout and summarize it (JSONL and LaMP in one streaming pass)."""
    from properlm.data.inspect import format_inspect, inspect_path

    info = inspect_path(args.path, task=args.task, fmt=args.format, n_queries=args.n_queries)
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    """``properlm data synth --out DIR``: generate a synthetic task and write it in LaMP's layout."""
    from properlm.data import export_lamp, generate

    ds = generate(task=args.task, n_users=args.users, n_groups=args.groups, seed=args.seed,
                  min_history=args.min_history, max_history=args.max_history, n_queries=args.queries,
                  quirk_rate=args.quirk_rate, n_topics=args.topics)
    export_lamp(ds, args.out)
    print(f"wrote {ds.task}: {len(ds.users)} users in {args.groups} groups to {args.out}")
    return 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    """``properlm data convert PATH --out DIR``: any loadable dataset to LaMP's layout."""
    from properlm.data.load import convert_dataset

    # Every record is checked before anything is written: a bad input leaves --out untouched.
    # A JSONL log streams through temporary bucket files (bounded memory); others load whole.
    task, n_users, written = convert_dataset(args.path, args.out, task=args.task, fmt=args.format,
                                             n_queries=args.n_queries)
    print(f"wrote {task}: {n_users} users to {', '.join(str(p) for p in written)}")
    return 0


def _add_load_options(p: argparse.ArgumentParser) -> None:
    from properlm.data.load import FORMATS

    p.add_argument("path", help="dataset file or directory (LaMP, OPPU, MovieLens, .jsonl)")
    p.add_argument("--task", default=None, help="task name when the files do not say (e.g. LaMP-3)")
    p.add_argument("--format", default="auto", choices=FORMATS, help="input layout (default: detect)")
    p.add_argument("--n-queries", type=int, default=5,
                   help="latest records per user held out as queries (MovieLens, JSONL)")


def register_data(subparsers: argparse._SubParsersAction) -> None:
    """Add ``properlm data {inspect,synth,convert}``."""
    data = subparsers.add_parser("data", help="inspect, generate and convert datasets")
    data.set_defaults(func=lambda _args: _print_help(data))
    sub = data.add_subparsers(metavar="SUBCOMMAND")

    p = sub.add_parser("inspect", help="summarize a dataset: users, items, history lengths, groups")
    _add_load_options(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_data_inspect)

    p = sub.add_parser("synth", help="generate a synthetic task with planted user groups (LaMP layout)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default="synth-cls", choices=("synth-cls", "synth-gen"))
    p.add_argument("--users", type=int, default=60, help="number of users")
    p.add_argument("--groups", type=int, default=5, help="number of planted groups K")
    p.add_argument("--min-history", type=int, default=4)
    p.add_argument("--max-history", type=int, default=60)
    p.add_argument("--queries", type=int, default=3, help="queries per user")
    p.add_argument("--quirk-rate", type=float, default=0.3, help="share of users with a personal quirk")
    p.add_argument("--topics", type=int, default=6, help="number of topic words")
    p.set_defaults(func=cmd_data_synth)

    p = sub.add_parser("convert", help="convert any loadable dataset to LaMP's layout")
    _add_load_options(p)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_data_convert)


# --- store ------------------------------------------------------------------------------


def cmd_store_verify(args: argparse.Namespace) -> int:
    """``properlm store verify --run DIR [--repair]``: one line per problem, a summary; 1 when a problem is left."""
    from properlm.store.verify import verify_run

    age = {} if args.min_age is None else {"min_age": args.min_age}
    result = verify_run(args.run, repair=args.repair, on_problem=lambda p: print(p.line(), flush=True), **age)
    print(result.summary())
    return 0 if result.ok else 1


def register_store(subparsers: argparse._SubParsersAction) -> None:
    """Add ``properlm store verify``."""
    store = subparsers.add_parser("store", help="check a run directory's files")
    store.set_defaults(func=lambda _args: _print_help(store))
    sub = store.add_subparsers(metavar="SUBCOMMAND")
    p = sub.add_parser("verify", help="check stage files, checkpoints and user banks against their checksums and "
                                      "indexes; find orphan, stray and temporary files (exit 1 on any problem)")
    p.add_argument("--run", required=True, help="a run directory")
    p.add_argument("--repair", action="store_true",
                   help="remove what is provably garbage (temporary files of killed writes, user files no index "
                        "names); never a stage file or a user's indexed data")
    p.add_argument("--min-age", type=float, default=None, metavar="SECONDS",
                   help="--repair removes a temporary or orphan file only when nothing modified it for this long "
                        "(else a write may still be in progress; default 600)")
    p.set_defaults(func=cmd_store_verify)


# --- the table ---------------------------------------------------------------------------

#: Top-level commands: name -> register function, or "module:function" to import.
COMMANDS: dict[str, Register | str] = {
    "data": register_data,
    "train": "properlm.train.commands:register",
    "generate": "properlm.commands:register_generate",
    "users": "properlm.commands:register_users",
    "instant": "properlm.commands:register_instant",
    "evaluate": "properlm.evaluate.commands:register",  # also adds `report`
    "demo": "properlm.demo:register",
    "experiments": "properlm.experiments:register",
    "serve": "properlm.serving:register",
    "export": "properlm.export:register",
    "store": register_store,
}


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


def _resolve(entry: Register | str) -> Register:
    if callable(entry):
        return entry
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


def build_parser() -> argparse.ArgumentParser:
    """The full parser, one subcommand per :data:`COMMANDS` entry."""
    parser = argparse.ArgumentParser(
        prog="properlm", description="Progressive personalization of LLMs (PROPER) for many users at once.")
    parser.add_argument("--version", action="version", version=f"properlm {__version__}")
    parser.set_defaults(func=lambda _args: _print_help(parser))
    subparsers = parser.add_subparsers(metavar="COMMAND")
    for entry in COMMANDS.values():
        _resolve(entry)(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 on a properlm error, with a one-line message)."""
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
    except (ProperError, OSError) as e:
        # OSError too: an unwritable --out is the user's to fix, not a traceback to read.
        message = " ".join(str(e).split())
        print(f"properlm: error: {message}", file=sys.stderr)
        return 2
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
