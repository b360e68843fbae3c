"""The paper's tables from evaluated runs, as Markdown, JSON and CSV, plus its figures.

    properlm report runs/lamp3 runs/lamp3-lowres runs/lamp3-text-router runs/lamp3-k8 --out reports/lamp3

Runs are sorted by what their config says about them (runs of several tasks
give one column group per task):

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

import json
from pathlib import Path
from typing import Sequence

from safetensors import safe_open

from properlm.data.tasks import get_task
from properlm.evaluate.evaluate import METHODS, load_results, write_csv
from properlm.evaluate.metrics import HIGHER_IS_BETTER
from properlm.io import write_json, write_text

TABLE_TITLES = {
    "table1": "Table 1: methods on the target users (most active users)",
    "table2": "Table 2: low-resource setting (least active users as targets)",
    "table3": "Table 3: ablations of PROPER",
    "experts": "Number of group experts K",
    "efficiency": "Efficiency: trainable parameters and training time",
}
_EFFICIENCY_COLUMNS = ["stage", "trainable_params", "params_per_user", "n_users", "steps", "train_seconds",
                       "seconds_per_user"]


# --- sorting runs ---------------------------------------------------------------------------------


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"group": {"router": "text"}}`` -> ``{"group.router": "text"}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def ablation_flags(config: dict) -> list[str]:
    """The ablation switches a run's config sets, as short labels (empty for the full method)."""
    c = flatten(config)
    flags = []
    if c.get("group.router") == "text":
        flags.append("text router")
    if c.get("group.constraint_weight", 1) == 0:
        flags.append("no constraint loss")
    if c.get("user.lora_aware_router") is False:
        flags.append("no LoRA-aware router")
    if any(k.rsplit(".", 1)[-1].endswith("end_to_end") and bool(v) for k, v in c.items()):
        flags.append("end-to-end")
    return flags


def run_kind(config: dict) -> str:
    """``"low-resource"``, ``"ablation"`` or ``"main"``."""
    if flatten(config).get("data.split") == "low-resource":
        return "low-resource"
    return "ablation" if ablation_flags(config) else "main"


def _num_experts(r: dict) -> int:
    return int(flatten(r["config"]).get("group.num_experts", 0))


def main_runs(results: Sequence[dict]) -> dict[str, dict]:
    """Task -> its main run (K=5 preferred, else the first given)."""
    out: dict[str, dict] = {}
    for r in results:
        if run_kind(r["config"]) == "main":
            if r["task"] not in out or (_num_experts(r) == 5 and _num_experts(out[r["task"]]) != 5):
                out[r["task"]] = r
    return out


# --- tables ---------------------------------------------------------------------------------------


def _metric_columns(results: Sequence[dict]) -> list[tuple[str, str]]:
    tasks = list(dict.fromkeys(r["task"] for r in results))
    return [(t, m) for t in tasks for m in get_task(t).metric_names]


def _col(task: str, metric: str) -> str:
    return f"{task} {metric}"


def _method_table(runs: Sequence[dict]) -> dict:
    cols = _metric_columns(runs)
    given = dict.fromkeys(m for r in runs for m in r["methods"])
    methods = [m for m in METHODS if m in given] + [m for m in given if m not in METHODS]  # e.g. scored files
    rows = []
    for m in methods:
        row = {"method": m}
        for r in runs:
            row.update({_col(r["task"], k): v for k, v in r["methods"].get(m, {}).get("metrics", {}).items()})
        rows.append(row)
    return {"columns": ["method", *[_col(*c) for c in cols]], "rows": rows}


def _final_method(r: dict) -> str | None:
    return next((m for m in ("proper", "stage2") if r["methods"].get(m, {}).get("metrics")), None)


def _variant_table(entries: Sequence[tuple], first: str) -> dict:
    """Rows of (fixed leading cells, run[, method]): the method's scores (default: PROPER, else stage 2)."""
    cols = _metric_columns([e[1] for e in entries])
    rows = []
    for entry in entries:
        lead, r = entry[0], entry[1]
        m = entry[2] if len(entry) > 2 else _final_method(r)
        row = {**lead, "method": m or ""}
        if m and r["methods"].get(m, {}).get("metrics"):
            row.update({_col(r["task"], k): v for k, v in r["methods"][m]["metrics"].items()})
        rows.append(row)
    return {"columns": [first, "method", *[_col(*c) for c in cols]], "rows": rows}


#: Ablations of stage 2: measured at stage 2, as the paper does (later stages sit on a fixed stage 2).
STAGE2_ABLATIONS = {"text router", "no constraint loss"}


def ablation_entries(mains: dict[str, dict], abl: Sequence[dict]) -> list[tuple[dict, dict, str]]:
    """Table 3's rows: stage-2 ablations against full PROPER at stage 2 (plus labelled after-stage-3 rows),
    stage-3 ablations against full PROPER after stage 3."""
    has = lambda r, m: bool(r["methods"].get(m, {}).get("metrics"))  # noqa: E731
    at2 = [r for r in abl if set(ablation_flags(r["config"])) <= STAGE2_ABLATIONS]
    entries: list[tuple[dict, dict, str]] = []
    for r in mains.values():
        entries.append(({"variant": "PROPER (full)"}, r, "proper"))
        if at2 and has(r, "stage2"):
            entries.append(({"variant": "PROPER (full), stage 2"}, r, "stage2"))
    for r in abl:
        name = "w/ " + " + ".join(ablation_flags(r["config"]))
        if r in at2:
            if has(r, "stage2") or not has(r, "proper"):
                entries.append(({"variant": f"{name}, stage 2"}, r, "stage2"))
            if has(r, "proper"):
                entries.append(({"variant": f"{name}, after stage 3"}, r, "proper"))
        else:
            entries.append(({"variant": name}, r, _final_method(r) or "proper"))
    return entries


def _numel(path: Path, skip: str = "fallback_emb") -> int:
    if not path.exists():
        return 0
    with safe_open(str(path), "pt") as f:
        total = 0
        for k in f.keys():
            if skip not in k:
                n = 1
                for s in f.get_slice(k).get_shape():
                    n *= s
                total += n
    return total


def _bank_numel(run: Path, bank: str) -> tuple[int, int]:
    """(parameters per user, users) of a user bank of the run; (0, 0) when absent."""
    from properlm.store.run import open_bank

    store = open_bank(run, bank)
    if store is None:
        return 0, 0
    return store.user_bytes("params") // 4, len(store)


def _config(run: Path) -> dict:
    import yaml

    p = run / "config.yaml"
    return yaml.safe_load(p.read_text(encoding="utf-8")) or {} if p.exists() else {}


def stage_timing(log: Path) -> tuple[int, float | None]:
    """(steps, seconds) of a stage from its JSONL log; seconds None with fewer than 2 records."""
    if not log.exists():
        return 0, None
    recs = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(recs) < 2:
        return len(recs), None
    span = recs[-1]["time"] - recs[0]["time"]
    return len(recs), span * len(recs) / (len(recs) - 1)


def efficiency_rows(run_dir: str | Path) -> list[dict]:
    """Trainable parameters and training time per stage and per user of one run (and its OPPU baselines)."""
    run = Path(run_dir)
    split_path = run / "split.json"
    split = json.loads(split_path.read_text()) if split_path.exists() else {"train": [], "target": []}
    n_train, n_target = len(split["train"]), len(split["target"])
    emb_each, _ = _bank_numel(run, "emb")
    # The stage-2 users (training users; the targets in the end-to-end ablation), not the
    # unseen users whose embeddings were fitted afterwards.
    e2e = bool(_config(run).get("user", {}).get("end_to_end"))
    n_emb = (n_target if e2e else n_train) if emb_each else 0
    lora_each, _ = _bank_numel(run, "lora")
    specs = [
        ("population", run / "logs" / "population.jsonl", _numel(run / "population" / "adapter_model.safetensors"),
         None, n_train),
        ("group", run / "logs" / "group.jsonl", _numel(run / "group" / "experts.safetensors") + emb_each * n_emb,
         emb_each or None, n_emb or n_train),
        ("user", run / "logs" / "user.jsonl", lora_each * n_target + _numel(run / "user" / "router.safetensors"),
         lora_each or None, n_target),
    ]
    for kind in ("oppu-kv", "oppu-mlp"):
        d = run / "baselines" / kind
        each, _ = _bank_numel(run, kind)
        specs.append((kind, d / "logs" / f"{kind}.jsonl", each * n_target, each or None, n_target))
    rows = []
    for stage, log, params, per_user, n_users in specs:
        steps, secs = stage_timing(log)
        if not params and not steps:
            continue
        rows.append({"stage": stage, "trainable_params": params, "params_per_user": per_user, "n_users": n_users,
                     "steps": steps, "train_seconds": None if secs is None else round(secs, 3),
                     "seconds_per_user": round(secs / n_users, 4) if secs is not None and n_users and
                     stage not in ("population", "group") else None})
    return rows


def build_tables(results: Sequence[dict]) -> dict[str, dict]:
    """All tables (see the module doc) from evaluated runs' results; empty tables are left out."""
    mains = main_runs(results)
    tables: dict[str, dict] = {}
    if mains:
        tables["table1"] = _method_table(list(mains.values()))
    low = [r for r in results if run_kind(r["config"]) == "low-resource"]
    if low:
        tables["table2"] = _method_table(low)
    abl = [r for r in results if run_kind(r["config"]) == "ablation"]
    if abl:
        tables["table3"] = _variant_table(ablation_entries(mains, abl), "variant")
    sweep = sorted((r for r in results if run_kind(r["config"]) == "main"), key=_num_experts)
    if len({_num_experts(r) for r in sweep}) > 1:
        tables["experts"] = _variant_table([({"num_experts": _num_experts(r)}, r) for r in sweep], "num_experts")
    eff = []
    for task, r in mains.items():
        if Path(r["run_dir"]).exists():
            eff += [{"task": task, **row} for row in efficiency_rows(r["run_dir"])]
    if eff:
        tables["efficiency"] = {"columns": ["task", *_EFFICIENCY_COLUMNS], "rows": eff}
    for name, t in tables.items():
        t["title"] = TABLE_TITLES[name]
    return tables


# --- writing --------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
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
    """A table as GitHub Markdown; the best value of each metric column in bold, arrows for direction."""
    cols = table["columns"]
    best = {}
    for c in cols:
        metric = c.rsplit(" ", 1)[-1]
        vals = [r[c] for r in table["rows"] if isinstance(r.get(c), float)]
        if metric in HIGHER_IS_BETTER and len(set(vals)) > 1:
            best[c] = max(vals) if HIGHER_IS_BETTER[metric] else min(vals)
    lines = markdown_head(cols)
    for r in table["rows"]:
        cells = [f"**{_fmt(r.get(c))}**" if c in best and r.get(c) == best[c] else _fmt(r.get(c)) for c in cols]
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


def decoding_suffixes(methods) -> list[str]:
    """The decoding suffixes among method names, free generation (``""``) first: ``["", "@labels", ...]``."""
    return list(dict.fromkeys(["", *sorted({"@" + m.split("@", 1)[1] for m in methods if "@" in m})]))


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


def decoding_note(results: Sequence[dict]) -> str:
    """What decoding the reported methods used (LaMP's free generation unless a method says otherwise)."""
    from properlm.evaluate.evaluate import decoding_of

    kinds = {decoding_of(m) for r in results for m in r["methods"]}
    parts = ["Decoding: free generation, greedy, parsed as LaMP does" + ("" if kinds <= {"free"} else
             " (methods without a suffix)")]
    if "labels" in kinds:
        parts.append("`@labels`: the label with the highest likelihood as the answer")
    if "expected" in kinds:
        parts.append("`@expected`: the expected rating under the labels' likelihoods")
    return "; ".join(parts) + "."


def report(sources: Sequence[str | Path | dict], out_dir: str | Path, figures: bool = True) -> dict:
    """Write the tables (Markdown, JSON, CSV) and figures for evaluated runs.

    Args:
        sources: run directories (evaluated with ``properlm evaluate``) or the
            dicts :func:`~properlm.evaluate.evaluate.evaluate_run` returned.
        out_dir: where the report files go (created).
        figures: also draw the figures (they need the main run's directory).

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
    for t in tables.values():
        md += [f"## {t['title']}", "", markdown_table(t), ""]
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
