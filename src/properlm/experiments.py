"""The paper's experiment grid on one config: ``properlm experiments``.

    properlm experiments --out runs/paper                      # configs/demo.yaml, every variant
    properlm experiments --out runs/paper --only main,ablations --config configs/movielens.yaml
    properlm experiments --out runs/seeds --seeds 0,1,2 data.synth_queries=10   # mean ± sd over seeds

One run directory per variant under ``--out``, then one report over all of them
(``OUT/report/``: Table 1, Table 2, Table 3, the expert-count sweep, each per
decoding, the efficiency table, the grid's timing table and the figures; see
docs/evaluation.md), and each stage's wall time in ``OUT/timings.json``:

==================  ===============================================  ===================  ==========
variant             overrides on the config                          stages reused        report
==================  ===============================================  ===================  ==========
main                (none)                                           -                    Table 1
low-resource        ``data.split=low-resource``                      -                    Table 2
text-router         ``group.router=text``                            population           Table 3 (at stage 2)
no-constraint       ``group.constraint_weight=0``                    population           Table 3 (at stage 2)
loramoe             both of the above (plain LoRAMoE)                population           Table 3 (at stage 2), density
no-lora-router      ``user.lora_aware_router=false``                 population, group    Table 3
end-to-end          ``user.end_to_end=true``                         population           Table 3
experts-2/-8        ``group.num_experts=2`` / ``8``                  population           expert sweep
==================  ===============================================  ===================  ==========

A variant that changes only later stages starts from a copy of the main run's
earlier stages (same data, split and settings, so the same weights), which
saves most of its cost. Everything resumes: finished stages are skipped,
evaluated methods are not evaluated again, and the times of work done in an
earlier call are kept (:func:`timed`).

``--decode`` (:func:`variant_decodings`) says how the methods answer. By
default, on a classification or rating task, the main run is evaluated twice:
with LaMP's free generation (comparable with the paper's numbers) and by label
scoring (``METHOD@labels``, ``@labels-norm``, ``@expected``; see
:func:`properlm.evaluate.evaluate.evaluate_run`), and every other variant by
label scoring only: it decodes nothing (one pass over the prompt, then each
label's few tokens from its cache, where free generation decodes token by
token), no answer is lost to parsing, and the variants are compared with the
main run decoded alike (the timing table says what each decoding cost). Tables 1-3 and the
sweep then come once per decoding (``table3@labels``, ...). ``free``,
``labels`` or ``both`` decode every variant alike; a generation task has no
labels and is decoded freely.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from properlm.errors import ConfigError
from properlm.evaluate.report import TIMINGS  # OUT/timings.json: {variant: {stage: seconds}} (see timed)

#: ``--decode`` choices (None: the default of :func:`variant_decodings`).
DECODE_CHOICES = ("free", "labels", "both")

#: name -> (config overrides, stages copied from the main run, methods evaluated)
_FINAL = ("proper",)
#: stage-2 ablations are compared at stage 2 (the paper's Table 3); after stage 3 as well, labelled so
_AT_STAGE2 = ("stage2", "proper")
VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "main": ((), (), ("stage1", "stage2", "proper", "rag", "pag", "oppu-kv", "oppu-mlp")),
    "low-resource": (("data.split=low-resource",), (), ("stage1", "stage2", "proper", "rag", "oppu-mlp")),
    "text-router": (("group.router=text",), ("population",), _AT_STAGE2),
    "no-constraint": (("group.constraint_weight=0",), ("population",), _AT_STAGE2),
    "loramoe": (("group.router=text", "group.constraint_weight=0"), ("population",), _AT_STAGE2),
    "no-lora-router": (("user.lora_aware_router=false",), ("population", "group"), _FINAL),
    "end-to-end": (("user.end_to_end=true",), ("population",), _FINAL),
    "experts-2": (("group.num_experts=2",), ("population",), _FINAL),
    "experts-8": (("group.num_experts=8",), ("population",), _FINAL),
}
#: the user banks a stage writes besides its directory
_STAGE_BANKS = {"group": ("emb",)}
#: groups of variants accepted by ``--only``
GROUPS = {"ablations": ("text-router", "no-constraint", "loramoe", "no-lora-router", "end-to-end"),
          "experts": ("experts-2", "experts-8")}


def select(only: str | None) -> list[str]:
    """Variant names from a comma-separated list of variants and groups (None: all), main first."""
    if not only:
        return list(VARIANTS)
    names: list[str] = []
    for part in (p.strip() for p in only.split(",") if p.strip()):
        if part in GROUPS:
            names += GROUPS[part]
        elif part in VARIANTS:
            names.append(part)
        else:
            raise ConfigError(f"--only: unknown variant {part!r}; choose from {', '.join([*VARIANTS, *GROUPS])}")
    names = list(dict.fromkeys(names))
    if any(VARIANTS[n][1] for n in names) and "main" not in names:
        names.insert(0, "main")  # the others reuse its stages and are compared against it
    return sorted(names, key=list(VARIANTS).index)


def variant_decodings(name: str, decode: str | None, task) -> tuple[str, ...]:
    """The decodings (``evaluate_run``'s ``decode``) a variant's methods are evaluated with.

    Args:
        name: the variant.
        decode: ``"free"``, ``"labels"`` or ``"both"`` for every variant alike; None: on a task with
            labels (classification, rating) the main run both ways (LaMP's free generation for
            Table 1 as the paper has it, label scoring beside it) and every other variant by label
            scoring only; on a generation task free generation.
        task: the grid's :class:`~properlm.data.tasks.Task`.

    Raises:
        ConfigError: an unknown choice, or label scoring asked for a task without labels.
    """
    if decode is not None and decode not in DECODE_CHOICES:
        raise ConfigError(f"--decode: choose from {', '.join(DECODE_CHOICES)}, got {decode!r}")
    if not task.labels:
        if decode in ("labels", "both"):
            raise ConfigError(f"--decode {decode}: {task.name} is a {task.kind} task without a label set; "
                              f"its answers can only be generated freely (--decode free)")
        return ("free",)
    if decode is None:
        return ("free", "labels") if name == "main" else ("labels",)
    return {"free": ("free",), "labels": ("labels",), "both": ("free", "labels")}[decode]


def filed_methods(method: str, decode: str, task) -> list[str]:
    """The names ``evaluate_run`` files a method's results under for one decoding."""
    from properlm.evaluate.evaluate import EXPECTED_SUFFIX, LABEL_SUFFIX, NORM_SUFFIX

    if decode == "free":
        return [method]
    return [method + LABEL_SUFFIX, method + NORM_SUFFIX] + ([method + EXPECTED_SUFFIX] if task.kind == "rating" else [])


def variant_config(name: str, config: str | Path | None, overrides: list[str]):
    """A variant's RunConfig: the grid's config (default: configs/demo.yaml) and overrides, then the variant's."""
    from properlm.config import load_config
    from properlm.demo import default_config
    from properlm.run_config import RunConfig

    return load_config(RunConfig, config or default_config(), [*overrides, *VARIANTS[name][0]])


def grid_task(cfg):
    """The task of the grid's data (every variant has the same data)."""
    from properlm.data.tasks import get_task
    from properlm.train.run import load_data

    return get_task(load_data(cfg, truncate=False).task)


def read_timings(out: Path) -> dict[str, dict[str, float]]:
    """``OUT/timings.json`` as a grid left it (empty when there is none)."""
    from properlm.io import read_json

    return read_json(out / TIMINGS) if (out / TIMINGS).exists() else {}


@contextmanager
def timed(out: Path, timings: dict, name: str, stage: str):
    """Add the block's wall seconds to ``timings[name][stage]`` and write ``OUT/timings.json`` atomically,
    also when the block fails: a stage interrupted (not killed outright) and finished by a later call
    counts both calls' time. Work done in an earlier call is never timed again, so it keeps its time."""
    from properlm.io import write_json

    t0 = time.time()
    try:
        yield
    finally:
        mine = timings.setdefault(name, {})
        mine[stage] = round(mine.get(stage, 0.0) + time.time() - t0, 3)
        write_json(out / TIMINGS, timings)


def copy_stage(out: Path, run_dir: Path, stage: str) -> None:
    """Copy a stage (and the user bank it writes) from the main run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    # A stage's user bank first: the stage directory is what marks it done.
    for bank in _STAGE_BANKS.get(stage, ()):
        src = out / "main" / "store" / bank
        if src.exists():
            shutil.rmtree(run_dir / "store" / bank, ignore_errors=True)
            shutil.copytree(src, run_dir / "store" / bank)
    shutil.copytree(out / "main" / stage, run_dir / stage)


def train_variant(cfg, out: Path, name: str, timings: dict) -> None:
    """Copy the variant's reused stages from the main run (timed as ``copy``) and train the others one
    at a time (each timed under its name); the end-to-end ablation trains stage 2 inside stage 3."""
    from properlm.store.run import STAGES, stages_done
    from properlm.train.run import train

    run_dir = out / name
    done = set(stages_done(run_dir)) if run_dir.exists() else set()
    if not run_dir.exists():
        timings.pop(name, None)  # a fresh run: times of an earlier one at this path are not its own
    for stage in STAGES:
        if stage == "group" and cfg.user.end_to_end:
            continue
        if stage in VARIANTS[name][1]:
            if stage not in done:
                with timed(out, timings, name, "copy"):
                    copy_stage(out, run_dir, stage)
        elif stage in done:
            train(cfg, run_dir, stages=(stage,), resume=True)  # nothing to train; checks the saved config
        else:
            with timed(out, timings, name, stage):
                train(cfg, run_dir, stages=(stage,), resume=True)


def unevaluated(run_dir: Path, methods, decode: str, task) -> list[str]:
    """The methods whose results for ``decode`` are not all filed in the run's summary yet."""
    from properlm.io import read_json

    summary = run_dir / "eval" / "summary.json"
    done = set(read_json(summary)["methods"]) if summary.exists() else set()
    return [m for m in methods if not set(filed_methods(m, decode, task)) <= done]


def train_baselines(out: Path, name: str, methods, timings: dict) -> None:
    """Train the OPPU baselines among ``methods`` that are missing, each timed under its own name
    (evaluating one would train it inside the first decoding's evaluation, and time it there)."""
    from properlm.evaluate import baselines
    from properlm.evaluate.evaluate import load_targets

    run_dir = out / name
    todo = [m for m in methods if m in baselines.OPPU_TARGETS and not baselines.oppu_trained(run_dir, m)]
    if todo:
        cfg, task, targets = load_targets(run_dir)
        for m in todo:
            with timed(out, timings, name, m):
                baselines.train_oppu(cfg, run_dir, m, task.name, targets, resume=True)


def evaluate_variant(out: Path, name: str, decodes, task, progress: bool, timings: dict) -> None:
    """Evaluate each method with each decoding unless its results are already filed: the OPPU baselines
    trained first (:func:`train_baselines`), then one method at a time, each decoding's seconds added
    up as ``eval-<decoding>``."""
    from properlm.evaluate.evaluate import evaluate_run

    run_dir = out / name
    todo = {d: unevaluated(run_dir, VARIANTS[name][2], d, task) for d in decodes}
    train_baselines(out, name, list(dict.fromkeys(m for ms in todo.values() for m in ms)), timings)
    for decode in decodes:
        for m in todo[decode]:
            with timed(out, timings, name, f"eval-{decode}"):
                evaluate_run(run_dir, methods=[m], progress=progress, decode=decode)


def run_experiments(out: str | Path, config: str | Path | None = None, overrides: list[str] = (),
                    only: str | None = None, log=print, decode: str | None = None) -> dict:
    """Train and evaluate each selected variant into ``out/<variant>``, then report over all of them.

    ``decode``: how the methods answer (see :func:`variant_decodings`; None: the default).
    Each stage's wall time goes to ``out/timings.json`` as it ends (:func:`timed`).
    Returns the report summary (see :func:`properlm.evaluate.report.report`) with
    ``"seconds"``: wall seconds per variant (training + evaluation, this call), and
    ``"timings"``: the selected variants' times per stage, over every call.
    """
    out = Path(out)
    names = select(only)
    task = grid_task(variant_config(names[0], config, overrides))
    decodes = {name: variant_decodings(name, decode, task) for name in names}  # refused before any training
    seconds: dict[str, float] = {}
    timings = read_timings(out)
    for i, name in enumerate(names, 1):
        cfg = variant_config(name, config, overrides)
        extra = VARIANTS[name][0]
        log(f"[{i}/{len(names)}] {name}: {' '.join(extra) or 'the config as given'}; "
            f"decoding: {', '.join(decodes[name])}")
        t0 = time.time()
        train_variant(cfg, out, name, timings)
        evaluate_variant(out, name, decodes[name], task, cfg.progress, timings)
        seconds[name] = round(time.time() - t0, 1)
        log(f"    {name} done in {seconds[name]:.0f} s")
    log(f"report over {len(names)} run(s) -> {out / 'report'}")
    from properlm.evaluate.report import report  # imported here: a grid runs for an hour

    mine = {n: timings[n] for n in names if n in timings}
    summary = report([out / n for n in names], out / "report", timings=mine)
    return {**summary, "seconds": seconds, "timings": mine}


def run_seeds(out: str | Path, seeds: list[int], config: str | Path | None = None, overrides: list[str] = (),
              only: str | None = None, log=print, decode: str | None = None) -> dict:
    """The grid once per seed (``out/seed-<s>``, config ``seed=<s>``), then one report over the seeds
    (``out/report``: mean ± sd per cell, intervals resampling every seed's users; :mod:`properlm.evaluate.seeds`).
    ``out/timings.json`` holds each seed's ``timings.json``, keyed by seed."""
    from properlm.evaluate.seeds import seeds_report
    from properlm.io import write_json

    out = Path(out)
    dirs, timings = {}, {}
    for s in seeds:
        log(f"== seed {s} ==")
        res = run_experiments(out / f"seed-{s}", config, [*overrides, f"seed={s}"], only, log=log, decode=decode)
        dirs[s] = out / f"seed-{s}"
        timings[str(s)] = res["timings"]
        write_json(out / TIMINGS, timings)  # {seed: {variant: {stage: seconds}}}
    log(f"report over {len(seeds)} seed(s) -> {out / 'report'}")
    return seeds_report(dirs, out / "report")


def parse_seeds(text: str | None) -> list[int] | None:
    """``"0,1,2"`` -> [0, 1, 2] (None: one grid with the config's seed)."""
    if not text:
        return None
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: comma-separated integers, got {text!r}") from None
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ConfigError(f"--seeds: distinct integers, got {text!r}")
    return seeds


def cmd_experiments(args) -> int:
    seeds = parse_seeds(args.seeds)
    if seeds:
        from properlm.evaluate.seeds import markdown

        res = run_seeds(args.out, seeds, args.config, args.overrides, args.only, decode=args.decode)
    else:
        from properlm.evaluate.report import markdown_table as markdown

        res = run_experiments(args.out, args.config, args.overrides, args.only, decode=args.decode)
    for t in res["tables"].values():
        print(f"\n{t['title']}\n")
        print(markdown(t))
    print(f"\nreport: {Path(args.out) / 'report' / 'report.md'}")
    return 0


def register(subparsers) -> None:
    """Add ``properlm experiments``."""
    p = subparsers.add_parser(
        "experiments", help="the paper's grid: main run, low-resource split, ablations, expert sweep, one report",
        description="Train and evaluate the main run and its variants (" + ", ".join(VARIANTS) + ") under --out, "
                    "reusing the main run's earlier stages where a variant changes only later ones, then write "
                    "Tables 1-3, the expert sweep, the efficiency table and the figures to OUT/report. Resumable.")
    p.add_argument("--out", required=True, help="directory for the variants' runs and the report")
    p.add_argument("--config", default=None, help="YAML config (default: configs/demo.yaml)")
    p.add_argument("--only", default=None,
                   help="comma-separated variants or groups (ablations, experts); main is added when needed")
    p.add_argument("--decode", default=None, choices=DECODE_CHOICES,
                   help="how the methods answer, every variant alike (default, on a classification or rating "
                        "task: main both free and label-scored, the other variants label-scored only; a "
                        "generation task: free)")
    p.add_argument("--seeds", default=None, metavar="S,S,...",
                   help="run the grid once per seed (OUT/seed-S) and report mean ± sd over them (OUT/report)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every variant")
    p.set_defaults(func=cmd_experiments)
