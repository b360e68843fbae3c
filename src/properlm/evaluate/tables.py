"""The report's tables from evaluated runs: which run goes in which table, and their rows.

Runs are sorted by what their config says about them (:func:`run_kind`); see
:mod:`properlm.evaluate.report` for the tables and the files they are written to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from safetensors import safe_open

from properlm.data.tasks import get_task
from properlm.evaluate.evaluate import METHODS

TABLE_TITLES = {
    "table1": "Table 1: methods on the target users (most active users)",
    "table2": "Table 2: low-resource setting (least active users as targets)",
    "table3": "Table 3: ablations of PROPER",
    "experts": "Number of group experts K",
    "efficiency": "Efficiency: trainable parameters and training time",
    "timings": "Wall time of the grid per variant and stage (seconds)",
}
#: The tables built once per decoding (the others describe the runs, not their answers).
DECODED_TABLES = ("table1", "table2", "table3", "experts")
#: How a decoding suffix is named in table titles, in the order the tables come.
DECODING_NAMES = {"": "free generation",
                  "@labels": "label scoring, the highest summed log-probability (@labels)",
                  "@labels-norm": "label scoring, the highest mean log-probability per token (@labels-norm)",
                  "@expected": "the expected rating under the labels' likelihoods (@expected)"}
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


#: Table 3's column saying how each row's run routes the target users at stage 2.
ROUTING_COLUMN = "stage-2 routing of targets"
#: ``group.unseen`` -> how a user-aware router's run routes its targets (see :func:`target_routing`).
UNSEEN_ROUTING = {"fit": "fitted embedding", "instant": "instant-encoder embedding", "mean": "mean embedding"}


def target_routing(config: dict) -> str:
    """How a run's stage-2 model routes the target users (not in stage 2), from its config.

    ``"fitted embedding"``: each target's embedding fitted on their own history after
    stage 2 (``group.unseen=fit``, the default; Table 1's stage-2 row has it too);
    ``"instant-encoder embedding"``: ``group.unseen=instant``, predicted from their
    history by the encoder fitted after stage 2; ``"mean embedding"``:
    ``group.unseen=mean``, the fallback; ``"text only (no user embedding)"``:
    ``group.router=text`` has no embedding, so nothing is fitted; ``"embedding
    learned end-to-end"``: the end-to-end ablation trains the targets' embeddings
    with their LoRAs.
    """
    c = flatten(config)
    if c.get("group.router") == "text":
        return "text only (no user embedding)"
    if any(k.rsplit(".", 1)[-1].endswith("end_to_end") and bool(v) for k, v in c.items()):
        return "embedding learned end-to-end"
    unseen = c.get("group.unseen", "fit")
    return UNSEEN_ROUTING.get(unseen, f"group.unseen={unseen}")


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


def suffix_of(method: str) -> str:
    """A method's decoding suffix: ``"proper@labels"`` -> ``"@labels"``; ``""`` for free generation."""
    return "@" + method.split("@", 1)[1] if "@" in method else ""


def _method_table(runs: Sequence[dict], suffix: str = "") -> dict:
    """Every method of the runs decoded as ``suffix`` says, in :data:`METHODS` order, x the tasks' metrics."""
    cols = _metric_columns(runs)
    given = dict.fromkeys(m for r in runs for m in r["methods"] if suffix_of(m) == suffix)
    known = [m + suffix for m in METHODS if m + suffix in given]
    methods = known + [m for m in given if m not in known]  # e.g. scored files
    rows = []
    for m in methods:
        row = {"method": m}
        for r in runs:
            row.update({_col(r["task"], k): v for k, v in r["methods"].get(m, {}).get("metrics", {}).items()})
        rows.append(row)
    return {"columns": ["method", *[_col(*c) for c in cols]], "rows": rows}


def _final_method(r: dict, suffix: str = "") -> str | None:
    """PROPER decoded as ``suffix`` says, else stage 2 so decoded; None when neither has scores."""
    return next((m + suffix for m in ("proper", "stage2") if r["methods"].get(m + suffix, {}).get("metrics")), None)


def _variant_table(entries: Sequence[tuple], first: str, suffix: str = "") -> dict:
    """Rows of (fixed leading cells, run[, method]): the method's scores (default: PROPER, else stage 2,
    decoded as ``suffix`` says). The leading cells' keys come first in the columns (``first`` the first)."""
    cols = _metric_columns([e[1] for e in entries])
    lead_cols = list(dict.fromkeys([first, *(k for e in entries for k in e[0])]))
    rows = []
    for entry in entries:
        lead, r = entry[0], entry[1]
        m = entry[2] if len(entry) > 2 else _final_method(r, suffix)
        row = {**lead, "method": m or ""}
        if m and r["methods"].get(m, {}).get("metrics"):
            row.update({_col(r["task"], k): v for k, v in r["methods"][m]["metrics"].items()})
        rows.append(row)
    return {"columns": [*lead_cols, "method", *[_col(*c) for c in cols]], "rows": rows}


#: Ablations of stage 2: measured at stage 2, as the paper does (later stages sit on a fixed stage 2).
STAGE2_ABLATIONS = {"text router", "no constraint loss"}


def ablation_entries(mains: dict[str, dict], abl: Sequence[dict], suffix: str = "") -> list[tuple[dict, dict, str]]:
    """Table 3's rows: stage-2 ablations against full PROPER at stage 2 (plus labelled after-stage-3 rows),
    stage-3 ablations against full PROPER after stage 3; every method decoded as ``suffix`` says. Each
    row also says how its run routes the target users at stage 2 (:data:`ROUTING_COLUMN`)."""
    has = lambda r, m: bool(r["methods"].get(m + suffix, {}).get("metrics"))  # noqa: E731
    lead = lambda name, r: {"variant": name, ROUTING_COLUMN: target_routing(r["config"])}  # noqa: E731
    at2 = [r for r in abl if set(ablation_flags(r["config"])) <= STAGE2_ABLATIONS]
    entries: list[tuple[dict, dict, str]] = []
    for r in mains.values():
        entries.append((lead("PROPER (full)", r), r, "proper" + suffix))
        if at2 and has(r, "stage2"):
            entries.append((lead("PROPER (full), stage 2", r), r, "stage2" + suffix))
    for r in abl:
        name = "w/ " + " + ".join(ablation_flags(r["config"]))
        if r in at2:
            if has(r, "stage2") or not has(r, "proper"):
                entries.append((lead(f"{name}, stage 2", r), r, "stage2" + suffix))
            if has(r, "proper"):
                entries.append((lead(f"{name}, after stage 3", r), r, "proper" + suffix))
        else:
            entries.append((lead(name, r), r, _final_method(r, suffix) or "proper" + suffix))
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


def decoding_tables(results: Sequence[dict], suffix: str) -> dict[str, dict]:
    """Tables 1-3 and the expert sweep over the methods decoded as ``suffix`` says (``""``: free
    generation); a run without such a method is left out of them, and so is a table left empty."""
    has = lambda r: any(suffix_of(m) == suffix for m in r["methods"])  # noqa: E731
    mains = {task: r for task, r in main_runs(results).items() if has(r)}
    tables: dict[str, dict] = {}
    if mains:
        tables["table1"] = _method_table(list(mains.values()), suffix)
    low = [r for r in results if run_kind(r["config"]) == "low-resource" and has(r)]
    if low:
        tables["table2"] = _method_table(low, suffix)
    abl = [r for r in results if run_kind(r["config"]) == "ablation" and has(r)]
    if abl:
        tables["table3"] = _variant_table(ablation_entries(mains, abl, suffix), "variant", suffix)
    sweep = sorted((r for r in results if run_kind(r["config"]) == "main" and has(r)), key=_num_experts)
    if len({_num_experts(r) for r in sweep}) > 1:
        tables["experts"] = _variant_table([({"num_experts": _num_experts(r)}, r) for r in sweep], "num_experts",
                                           suffix)
    return tables


def decoded_title(name: str, suffix: str) -> str:
    """A per-decoding table's title, naming its decoding."""
    return f"{TABLE_TITLES[name]} [decoding: {DECODING_NAMES.get(suffix, suffix)}]"


def build_tables(results: Sequence[dict]) -> dict[str, dict]:
    """All tables (see the module doc) from evaluated runs' results; empty tables are left out.

    Tables 1-3 and the expert sweep come once per decoding suffix among the methods
    (:func:`decoding_suffixes`): ``table1`` over the freely generated methods,
    ``table1@labels`` over the ``@labels`` ones and so on, each with its ``decoding``
    and a title naming it; they come in :data:`DECODED_TABLES` order, each table's
    decodings together.
    """
    per = {s: decoding_tables(results, s) for s in decoding_suffixes(m for r in results for m in r["methods"])}
    tables: dict[str, dict] = {}
    for name in DECODED_TABLES:
        for suffix, got in per.items():
            if name in got:
                tables[name + suffix] = {**got[name], "title": decoded_title(name, suffix), "decoding": suffix}
    mains = main_runs(results)
    eff = []
    for task, r in mains.items():
        if Path(r["run_dir"]).exists():
            eff += [{"task": task, **row} for row in efficiency_rows(r["run_dir"])]
    if eff:
        tables["efficiency"] = {"columns": ["task", *_EFFICIENCY_COLUMNS], "rows": eff,
                                "title": TABLE_TITLES["efficiency"]}
    return tables


#: The grid's stages in the order they run (``copy``: stages copied from the main run; ``oppu-*``: the
#: OPPU baselines' training).
TIMING_STAGES = ("copy", "population", "group", "user", "oppu-kv", "oppu-mlp", "eval-free", "eval-labels")
#: The timing table's last row.
GRID_TOTAL = "grid total"


def timing_table(timings: dict[str, dict[str, float]]) -> dict:
    """Wall seconds per variant (rows) and stage (columns: those any variant has, in
    :data:`TIMING_STAGES` order), each variant's total and a last row with the grid's totals.

    ``timings`` is ``OUT/timings.json`` of ``properlm experiments``: ``{variant: {stage: seconds}}``.
    """
    given = dict.fromkeys(s for t in timings.values() for s in t)
    stages = [s for s in TIMING_STAGES if s in given] + [s for s in given if s not in TIMING_STAGES]
    rows = [{"variant": name, **{s: t[s] for s in stages if s in t}, "total": round(sum(t.values()), 3)}
            for name, t in timings.items()]
    total = {"variant": GRID_TOTAL, **{s: round(sum(r.get(s, 0.0) for r in rows), 3) for s in [*stages, "total"]}}
    return {"columns": ["variant", *stages, "total"], "rows": [*rows, total], "digits": 1,
            "title": TABLE_TITLES["timings"]}


def decoding_suffixes(methods) -> list[str]:
    """The decoding suffixes among method names, free generation (``""``) first, then those of
    :data:`DECODING_NAMES` in its order, then any other: ``["", "@labels", "@labels-norm", "@expected"]``."""
    given = {suffix_of(m) for m in methods} - {""}
    known = [s for s in DECODING_NAMES if s in given]
    return ["", *known, *sorted(given - set(known))]
