"""The paper's tables from evaluated runs, as Markdown, JSON and CSV, plus its figures.

    properlm report runs/lamp3 runs/lamp3-lowres runs/lamp3-text-router runs/lamp3-k8 --out reports/lamp3

Runs are sorted by what their config says about them (runs of several tasks
give one column group per task; the rows are built in :mod:`properlm.evaluate.tables`):

* **Table 1** (``table1``): every evaluated method of the *main* run of each task
  (``data.split`` not low-resource, no ablation switch; the one with
  ``group.num_experts=5`` when several) x the task's LaMP metrics.
* **Table 2** (``table2``): the same for runs with ``data.split=low-resource``.
* **Table 3** (``table3``): the main run's PROPER against runs with an ablation
  switch: ``group.router=text``, ``group.constraint_weight=0``,
  ``user.lora_aware_router=false``, or any ``*end_to_end*`` key set true.
  A run trained only to stage 2 shows its stage-2 scores (the ``method`` column says).
* **Expert sweep** (``experts``): main-type runs that differ in ``group.num_experts``.
* **Efficiency** (``efficiency``): trainable parameters per stage and per user
  (from the saved safetensors) and training time per stage and per user (from
  the timestamps in ``RUN/logs/<stage>.jsonl``; a stage's time is the span of its
  step records scaled by ``n/(n-1)`` to count the first step).
* **Timings** (``timings``; only given a grid's ``timings.json``, as
  ``properlm experiments`` does): the grid's wall seconds per variant and stage
  (stages copied from the main run, each stage trained, the OPPU baselines
  trained, each decoding evaluated), each variant's total and the grid's.

Tables 1-3 and the expert sweep come once per decoding among the runs' methods
(free generation, then ``@labels``, ``@labels-norm``, ``@expected``): ``table1``
over the freely generated methods, ``table1@labels`` over the ``METHOD@labels``
ones and so on, each title naming its decoding; a run without a method of that
decoding is left out of that decoding's tables (the grid's variants are label
decoded only, so Table 3 and the sweep come as ``table3@labels``, ...).

* **Who gains** (``gains``; :mod:`properlm.evaluate.gains`): in every run whose
  predictions are on disk, stage 2, PROPER and OPPU against stage 1 per tercile of
  the targets' history length and over all targets (the low-resource split in a
  low-resource run), with 95% intervals over users; figure ``gains_by_history.png``
  per task (the main run's terciles and the low-resource run's targets).

Every interval resamples users (each with all their queries), not queries, and
says how many users and queries it rests on.

Files in ``out_dir``: ``report.md``, ``report.json``, ``<table>.csv`` for each
table, ``gains.csv``, ``per_user.csv`` (every run, method and user: history
length, metrics) and the figures of :mod:`properlm.evaluate.figures` (PNG).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from properlm.evaluate.evaluate import load_results, write_csv
from properlm.evaluate.metrics import HIGHER_IS_BETTER
from properlm.evaluate.tables import (ROUTING_COLUMN, ablation_flags, build_tables, decoding_suffixes, main_runs,
                                      run_kind, timing_table)
from properlm.io import read_json, write_json, write_text

# --- writing --------------------------------------------------------------------------------------


def _fmt(v, digits: int = 4) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_head(cols: Sequence[str]) -> list[str]:
    """A Markdown table's two header lines; metric columns get an arrow for their direction."""
    head = [f"{c} {'↑' if HIGHER_IS_BETTER[c.rsplit(' ', 1)[-1]] else '↓'}"
            if c.rsplit(" ", 1)[-1] in HIGHER_IS_BETTER else c for c in cols]
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in cols) + "|"]


#: The header cells that :func:`bootstrap_cells` fills.
BOOTSTRAP_HEAD = "difference | 95% interval | users | queries | beyond noise"


def bootstrap_cells(b: dict) -> str:
    """A bootstrap comparison's difference, 95% interval, the users and queries it rests on, and its
    verdict as Markdown cells (see :data:`BOOTSTRAP_HEAD`)."""
    return (f"{b['diff']:+.4f} | [{b['ci95'][0]:+.4f}, {b['ci95'][1]:+.4f}] | {b.get('n_users', '')} | "
            f"{b.get('n_queries', b.get('n', ''))} | {'yes' if b['better'] else 'no'}")


def markdown_table(table: dict) -> str:
    """A table as GitHub Markdown; the best value of each metric column in bold, arrows for direction;
    numbers to the table's ``digits`` decimals (default 4)."""
    cols, digits = table["columns"], table.get("digits", 4)
    best = {}
    for c in cols:
        metric = c.rsplit(" ", 1)[-1]
        vals = [r[c] for r in table["rows"] if isinstance(r.get(c), float)]
        if metric in HIGHER_IS_BETTER and len(set(vals)) > 1:
            best[c] = max(vals) if HIGHER_IS_BETTER[metric] else min(vals)
    lines = markdown_head(cols)
    for r in table["rows"]:
        cells = [f"**{_fmt(r.get(c), digits)}**" if c in best and r.get(c) == best[c] else _fmt(r.get(c), digits)
                 for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_user_rows(results: Sequence[dict]) -> tuple[list[dict], list[str]]:
    """Every run's, method's and user's scores as flat rows, and the columns."""
    rows, metrics = [], []
    for r in results:
        for m, e in r["methods"].items():
            for u in e.get("per_user", []):
                rows.append({"run": r["run_dir"], "task": r["task"], "method": m, **u})
                metrics += [k for k in u if k not in ("user_id", "history_len", "n_queries")]
    return rows, ["run", "task", "method", "user_id", "history_len", "n_queries", *dict.fromkeys(metrics)]



def bootstrap_rows(mains: dict[str, dict]) -> list[dict]:
    """PROPER against stage 1, stage 2 and OPPU (each decoding alike) in every main run whose predictions
    are on disk, by a paired bootstrap over the run's users (:func:`properlm.evaluate.stats.compare`)."""
    from properlm.evaluate.stats import compare

    rows = []
    for task, r in mains.items():
        if not (Path(r["run_dir"]) / "eval" / "golds.json").exists():
            continue
        for suffix in decoding_suffixes(r["methods"]):
            if "proper" + suffix not in r["methods"]:
                continue
            for other in ("stage1", "stage2", "oppu-mlp", "oppu-kv"):
                if other + suffix in r["methods"]:
                    rows.append({"task": task, **compare(r["run_dir"], "proper" + suffix, other + suffix)})
    return rows


def gains_section(results: Sequence[dict], out: Path, figures: bool) -> tuple[list[dict], dict[str, Path]]:
    """The who-gains rows of every run (written to ``gains.csv``) and, with ``figures``, one PNG per task."""
    from properlm.evaluate import gains

    rows = [row for r in results for row in gains.gain_rows(r, run_kind(r["config"]))]
    if not rows:
        return rows, {}
    write_csv(out / "gains.csv", rows, gains.COLUMNS)
    figs: dict[str, Path] = {}
    if figures:
        from properlm.evaluate.figures import plot_gains

        mains = main_runs(results)
        tasks = list(dict.fromkeys(r["task"] for r in rows))
        shown_runs = {g["run_dir"] for g in rows}
        for task in tasks:
            ran = [r for r in results if r["task"] == task and str(Path(r["run_dir"])) in shown_runs]
            low = next((str(Path(r["run_dir"])) for r in ran if run_kind(r["config"]) == "low-resource"), None)
            main = mains.get(task)
            primary = str(Path(main["run_dir"])) if any(r is main for r in ran) else (low or str(Path(ran[0]["run_dir"])))
            shown = gains.figure_rows(rows, primary, low if low != primary else None)
            if shown:
                prefix = f"{task}_" if len(tasks) > 1 else ""
                figs[f"{prefix}gains_by_history"] = plot_gains(shown, out / f"{prefix}gains_by_history.png",
                                                               f"{task}: gain over stage 1 by history length")
    return rows, figs


#: Under Table 3: what its routing column says, and why the stage-2 rows differ in it.
ROUTING_NOTE = (
    f"`{ROUTING_COLUMN}`: how each row's run routes the target users (who were not in stage 2), from its "
    "config. `fitted embedding` (`group.unseen=fit`, the default): each target's stage-2 embedding is fitted "
    "on their own history after stage 2; `instant-encoder embedding` "
    "(`group.unseen=instant`): predicted from their history by an encoder fitted after stage 2; "
    "`mean embedding` (`group.unseen=mean`): "
    "the fallback, the mean learned embedding; `text only (no user embedding)` (`group.router=text`): the "
    "router reads the text alone, so its stage-2 row gets no per-user fit for the targets while a "
    "user-aware row does; `embedding learned end-to-end`: the targets' embeddings train with their LoRAs. "
    "Table 1's stage-2 row routes as the full PROPER rows here say.")


def decoding_note(results: Sequence[dict]) -> str:
    """What decoding the reported methods used (LaMP's free generation unless a method says otherwise)."""
    from properlm.evaluate.evaluate import decoding_of

    kinds = {decoding_of(m) for r in results for m in r["methods"]}
    parts = ["Decoding: free generation, greedy, parsed as LaMP does" + ("" if kinds <= {"free"} else
             " (methods without a suffix)")]
    if "labels" in kinds:
        parts.append("`@labels`: the label with the highest likelihood (summed log-probability) as the answer")
    if "labels-norm" in kinds:
        parts.append("`@labels-norm`: the label with the best mean log-probability per token as the answer")
    if "expected" in kinds:
        parts.append("`@expected`: the expected rating under the labels' likelihoods")
    return "; ".join(parts) + "."


#: Where ``properlm experiments`` records its wall times: ``OUT/timings.json``, ``{variant: {stage: seconds}}``.
TIMINGS = "timings.json"


def grid_timings(sources: Sequence[str | Path | dict]) -> dict[str, dict[str, float]] | None:
    """The wall times a grid recorded for these runs: for each run directory ``OUT/<variant>``, the
    ``<variant>`` entry of ``OUT/timings.json`` (None when no run has one), so that ``properlm report``
    on a grid's runs prints the timing table the grid's own report has."""
    found: dict[str, dict[str, float]] = {}
    for src in sources:
        if isinstance(src, dict):
            continue
        run = Path(src).resolve()
        path = run.parent / TIMINGS
        if not path.is_file():
            continue
        entry = read_json(path).get(run.name)
        if isinstance(entry, dict) and entry and all(isinstance(v, (int, float)) for v in entry.values()):
            found[run.name] = {k: float(v) for k, v in entry.items()}
    return found or None


def report(sources: Sequence[str | Path | dict], out_dir: str | Path, figures: bool = True,
           timings: dict[str, dict[str, float]] | None = None) -> dict:
    """Write the tables (Markdown, JSON, CSV) and figures for evaluated runs.

    Args:
        sources: run directories (evaluated with ``properlm evaluate``) or the
            dicts :func:`~properlm.evaluate.evaluate.evaluate_run` returned.
        out_dir: where the report files go (created).
        figures: also draw the figures (they need the main run's directory).
        timings: a grid's wall seconds per variant and stage (``OUT/timings.json`` of
            ``properlm experiments``): adds the ``timings`` table
            (:func:`~properlm.evaluate.tables.timing_table`).

    Returns:
        ``{"tables": {name: table}, "bootstrap": [PROPER vs baselines], "gains": [who-gains rows],
        "figures": {name: path}, "routing_ari": float | None, "routing_ari_per_site": float | None,
        "files": [paths written]}``.
    """
    from properlm.evaluate.figures import make_figures

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = [s if isinstance(s, dict) else load_results(s) for s in sources]
    tables = build_tables(results)
    if timings:
        tables["timings"] = timing_table(timings)
    files = []
    for name, t in tables.items():
        write_csv(out / f"{name}.csv", t["rows"], t["columns"])
        files.append(out / f"{name}.csv")
    pu_rows, pu_cols = per_user_rows(results)
    write_csv(out / "per_user.csv", pu_rows, pu_cols)
    files.append(out / "per_user.csv")
    figs, ari = {}, None
    if figures:
        mains = main_runs(results)
        plain = next((r for r in results if set(ablation_flags(r["config"])) >= {"text router", "no constraint loss"}), None)
        for task, main in mains.items():
            got, ari_task = make_figures(main, plain if plain and plain["task"] == task else None, out,
                                         prefix=f"{task}_" if len(mains) > 1 else "")
            figs.update(got)
            ari = ari_task if ari is None else ari
    gain_rows, gain_figs = gains_section(results, out, figures)
    figs.update(gain_figs)
    files += list(figs.values()) + ([out / "gains.csv"] if gain_rows else [])
    md = ["# PROPER evaluation report", "", "Runs: " + ", ".join(f"`{r['run_dir']}`" for r in results), ""]
    md += [decoding_note(results), ""]
    for name, t in tables.items():
        md += [f"## {t['title']}", "", markdown_table(t), ""]
        if name.partition("@")[0] == "table3":
            md += [ROUTING_NOTE, ""]
    boot = bootstrap_rows(main_runs(results))
    if boot:
        md += ["## PROPER against the baselines, paired bootstrap over users", "",
               "Difference of per-query means (PROPER minus the other method), its 95% interval from 10,000 "
               "resamples of the users (each drawn user with all their queries: a user's queries share one "
               "adapter, so they are not independent), the users and queries it rests on, and whether the "
               "whole interval is on PROPER's better side.", "",
               f"| task | vs | metric | {BOOTSTRAP_HEAD} |", "|---|---|---|---|---|---|---|---|"]
        md += [f"| {b['task']} | {b['other']} | {b['metric']} | {bootstrap_cells(b)} |" for b in boot]
        md += [""]
    if gain_rows:
        from properlm.evaluate.gains import TITLE, markdown as gains_markdown

        md += [f"## {TITLE}", "",
               "Per run, method and group of target users (terciles of history length, sparsest first; then all "
               "targets): the improvement over stage 1 decoded alike on the per-query metric (for absolute error, "
               "stage 1's minus the method's: positive is better), its 95% interval from 10,000 resamples of the "
               "group's users (each with all their queries), and the users and queries it rests on.", "",
               gains_markdown(gain_rows), ""]
    if ari is not None:
        md += ["## Routing vs planted groups", "",
               "Adjusted Rand index between the training users clustered (KMeans) by their mean stage-2 expert "
               f"weights and their true groups: {ari['site_mean']:.4f} with the weights averaged over the adapted "
               f"sites, {ari['per_site']:.4f} with each site's weights kept apart (1 = the same partition, 0 = chance).",
               ""]
    md += [f"![{name}]({Path(p).name})\n" for name, p in figs.items()]
    write_text(out / "report.md", "\n".join(md) + "\n")
    summary = {"runs": [r["run_dir"] for r in results], "tables": tables, "bootstrap": boot, "gains": gain_rows,
               "routing_ari": ari["site_mean"] if ari else None, "routing_ari_per_site": ari["per_site"] if ari else None,
               "figures": {k: str(v) for k, v in figs.items()}}
    write_json(out / "report.json", summary)
    files += [out / "report.md", out / "report.json"]
    return {**summary, "files": [str(f) for f in files]}
