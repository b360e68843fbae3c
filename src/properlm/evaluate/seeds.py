"""Tables over several seeds: mean and standard deviation per cell, and a bootstrap over every seed's users.

    properlm experiments --out runs/seeds --seeds 0,1,2 data.synth_queries=10     # one grid per seed
    from properlm.evaluate.seeds import seeds_report
    seeds_report({0: "runs/seeds/seed-0", 1: "runs/seeds/seed-1"}, "runs/seeds/report")

Each seed's grid (``OUT/seed-<s>/``) has its own report (``OUT/seed-<s>/report/``).
This combines them: every numeric cell of Tables 1-3 and the expert sweep as
mean ± standard deviation over the seeds (sample standard deviation, n-1), each
decoding's tables apart, the grid's wall times likewise, and PROPER against
stage 1, stage 2 and the OPPU baselines (each decoding alike) by a paired
bootstrap over all seeds' main runs together that resamples (seed, user)
pairs, not queries: each pair is one cluster, drawn with all its queries (a
user's queries in one seed share that seed's adapter; a seed changes the data
draw of a synthetic task as well as the initialisations and the data order, so
the same user id in two seeds is two clusters). Who gains (evaluate/gains.py) is
pooled likewise: each seed's targets in thirds by history length, each third's
gain over stage 1 over all seeds with (seed, user) pairs resampled.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np

from properlm.errors import ProperError
from properlm.evaluate.evaluate import load_results
from properlm.evaluate.gains import TITLE as GAINS_TITLE
from properlm.evaluate.gains import figure_rows
from properlm.evaluate.gains import markdown as gains_markdown
from properlm.evaluate.gains import pooled_gain_rows
from properlm.evaluate.report import BOOTSTRAP_HEAD, bootstrap_cells, markdown_head
from properlm.evaluate.stats import aligned_users, cluster_bootstrap, judged
from properlm.evaluate.tables import ROUTING_COLUMN
from properlm.io import read_json, write_json, write_text

#: the tables combined over seeds, the scores' once per decoding (``table1``, ``table1@labels``, ...),
#: and the grid's wall times; the efficiency table is per run, not a score
SEED_TABLES = ("table1", "table2", "table3", "experts", "timings")
#: the cells a row is matched by across seeds (Table 3's routing too: two runs of one variant name
#: that route their targets differently are two rows)
_KEY_COLUMNS = ("method", "variant", "num_experts", ROUTING_COLUMN)


def _key(row: dict) -> tuple:
    return tuple((c, row[c]) for c in _KEY_COLUMNS if c in row)


def seed_table_names(per_seed: Mapping[int, Mapping[str, dict]]) -> list[str]:
    """The names of the tables to combine: those of :data:`SEED_TABLES` under every decoding any seed has,
    in the order the seeds' reports give them."""
    names = dict.fromkeys(n for t in per_seed.values() for n in t)
    return [n for n in names if n.partition("@")[0] in SEED_TABLES]


def combine_tables(per_seed: Mapping[int, Mapping[str, dict]]) -> dict[str, dict]:
    """``{table: {"title", "columns", "rows"}}`` whose metric cells are ``{"mean", "std", "n", "values"}``.

    ``per_seed`` maps a seed to its report's ``tables``. A row is matched across seeds
    by its method / variant / expert count; a seed without the row or cell adds nothing.
    """
    out: dict[str, dict] = {}
    for name in seed_table_names(per_seed):
        tables = [t[name] for t in per_seed.values() if name in t]
        columns = list(dict.fromkeys(c for t in tables for c in t["columns"]))
        keys: dict[tuple, dict] = {}
        for t in tables:
            for row in t["rows"]:
                keys.setdefault(_key(row), {})
                for c, v in row.items():
                    if isinstance(v, (int, float)) and c not in _KEY_COLUMNS:
                        keys[_key(row)].setdefault(c, []).append(float(v))
        rows = []
        for key, cells in keys.items():
            row = dict(key)
            for c, vals in cells.items():
                row[c] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan,
                          "n": len(vals), "values": vals}
            rows.append(row)
        out[name] = {"title": tables[0].get("title", name), "columns": columns, "rows": rows,
                     **{k: tables[0][k] for k in ("decoding", "digits") if k in tables[0]}}
    return out


def pooled_bootstrap(main_runs: list[str | Path], method: str, other: str, n: int = 10000) -> dict | None:
    """``method`` minus ``other`` over the queries of every run (paired within each run), resampling
    (run, user) pairs with all their queries; None if absent. ``n_users`` counts the pairs."""
    a_all, b_all, clusters, name = [], [], [], None
    for i, run in enumerate(main_runs):
        try:
            a, b, users, name = aligned_users(run, method, other)
        except ProperError:  # a method not evaluated in this run
            continue
        a_all.append(a)
        b_all.append(b)
        clusters += [(i, u) for u in users]
    if not clusters:
        return None
    res = cluster_bootstrap(np.concatenate(a_all), np.concatenate(b_all), clusters, n=n)
    return {**judged(res, method, other, name), "runs": len(a_all)}


def pooled_rows(main_runs: list[Path]) -> list[dict]:
    """PROPER against stage 1, stage 2 and OPPU over all seeds' main runs, once per decoding suffix
    among their methods (``proper@labels`` against ``stage1@labels``, ...)."""
    from properlm.evaluate.tables import decoding_suffixes

    methods = [m for run in main_runs for m in read_json(run / "eval" / "summary.json")["methods"]]
    return [b for suffix in decoding_suffixes(methods) for other in ("stage1", "stage2", "oppu-mlp", "oppu-kv")
            if (b := pooled_bootstrap(main_runs, "proper" + suffix, other + suffix)) is not None]


def _cell(v, digits: int = 4) -> str:
    if isinstance(v, dict):
        return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}" if v["n"] > 1 else f"{v['mean']:.{digits}f}"
    return "" if v is None else str(v)


def markdown(table: dict) -> str:
    """A combined table as GitHub Markdown (mean ± sd to the table's ``digits`` decimals, default 4;
    arrows for each metric's direction)."""
    cols, digits = table["columns"], table.get("digits", 4)
    lines = markdown_head(cols)
    lines += ["| " + " | ".join(_cell(r.get(c), digits) for c in cols) + " |" for r in table["rows"]]
    return "\n".join(lines)


def seed_wall_times(per_seed: Mapping[int, Mapping[str, dict]]) -> dict[int, float]:
    """Seed -> its grid's total wall seconds, from its report's timing table (seeds without one left out)."""
    from properlm.evaluate.tables import GRID_TOTAL

    out = {}
    for s, tables in per_seed.items():
        row = next((r for r in tables.get("timings", {}).get("rows", []) if r.get("variant") == GRID_TOTAL), None)
        if row is not None:
            out[s] = float(row["total"])
    return out


def seeds_report(seed_dirs: Mapping[int, str | Path], out_dir: str | Path, figures: bool = True) -> dict:
    """Combine the seeds' grids (each with ``report/report.json`` and a ``main`` run) into ``out_dir``.

    Returns ``{"seeds", "tables", "bootstrap", "gains", "files"}``; writes ``report.md``,
    ``report.json`` and, with ``figures`` and gains to show, ``gains_by_history.png`` (the
    pooled who-gains rows, drawn as :func:`properlm.evaluate.figures.plot_gains` draws a run's).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_seed = {s: read_json(Path(d) / "report" / "report.json")["tables"] for s, d in seed_dirs.items()}
    tables = combine_tables(per_seed)
    mains = [Path(d) / "main" for d in seed_dirs.values() if (Path(d) / "main" / "eval" / "golds.json").exists()]
    boot = pooled_rows(mains)
    gains = pooled_gain_rows([load_results(m) for m in mains], kind="main")
    seeds = sorted(seed_dirs)
    md = ["# PROPER over seeds", "", f"Seeds: {', '.join(map(str, seeds))} (one grid each: "
          + ", ".join(f"`{seed_dirs[s]}`" for s in seeds) + "). Cells: mean ± sample standard deviation over "
          "the seeds.", ""]
    for t in tables.values():
        md += [f"## {t['title']}", "", markdown(t), ""]
    walls = seed_wall_times(per_seed)
    if walls:
        md += [f"Wall time of the grids: {sum(walls.values()):.1f} s in all ("
               + ", ".join(f"seed {s}: {w:.1f} s" for s, w in walls.items()) + ").", ""]
    if boot:
        md += ["## PROPER against the baselines over all seeds, paired bootstrap over (seed, user) pairs", "",
               "Difference of per-query means over every seed's main run together (PROPER minus the other "
               "method, each decoding alike), its 95% interval from 10,000 resamples of (seed, user) pairs (each "
               "drawn pair with all its queries: a user's queries in one seed share that seed's adapter, and the "
               "same user id in two seeds is two pairs), the pairs (users) and queries it rests on, and whether "
               "the whole interval is on PROPER's better side.", "",
               f"| vs | metric | {BOOTSTRAP_HEAD} |", "|---|---|---|---|---|---|---|"]
        md += [f"| {b['other']} | {b['metric']} | {bootstrap_cells(b)} |" for b in boot]
        md += [""]
    files = [out / "report.md", out / "report.json"]
    if gains:
        md += [f"## {GAINS_TITLE}, over all seeds", "",
               "Each seed's targets fall in thirds by that seed's history lengths; a row pools the third's queries "
               "over the seeds' main runs, and its 95% interval resamples (seed, user) pairs (users: the pairs).", "",
               gains_markdown(gains), ""]
        shown = figure_rows(gains, primary="")   # pooled rows belong to no one run directory
        if figures and shown:
            from properlm.evaluate.figures import plot_gains

            files.append(plot_gains(shown, out / "gains_by_history.png",
                                    f"{gains[0]['task']}: gain over stage 1 by history length, {len(seeds)} seeds "
                                    "pooled (95% intervals over (seed, user) pairs)"))
            md += ["![gains_by_history](gains_by_history.png)", ""]
    write_text(out / "report.md", "\n".join(md) + "\n")
    summary = {"seeds": seeds, "runs": {str(s): str(d) for s, d in seed_dirs.items()}, "tables": tables,
               "bootstrap": boot, "gains": gains, "wall_seconds": {str(s): w for s, w in walls.items()}}
    write_json(out / "report.json", summary)
    return {**summary, "files": [str(f) for f in files]}
