"""Whether a difference between two methods is beyond noise: paired bootstrap on per-query scores, seed summaries.

    from properlm.evaluate.stats import compare, seed_summary
    compare("runs/demo", "proper", "oppu-mlp")      # {"metric", "diff", "ci95", "p_le_0", ...}
    seed_summary(["runs/s0", "runs/s1", "runs/s2"], ["stage1", "proper"])

The paired bootstrap resamples the evaluated queries with replacement (the
same resample for both methods, since both answered the same queries) and
reports the difference of the per-query means: accuracy for classification,
absolute error (MAE) for ratings, ROUGE-1 / ROUGE-L for generation.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from properlm.data.tasks import get_task
from properlm.errors import ProperError
from properlm.evaluate.metrics import per_example_scores
from properlm.io import read_json

#: The per-query value each task kind is compared on, and whether higher is better.
PER_QUERY = {"classification": ("correct", True), "rating": ("abs_error", False), "generation": ("rouge-1", True)}


def per_query(run_dir: str | Path, method: str, metric: str | None = None) -> tuple[list[str], np.ndarray, str]:
    """(query ids, per-query values, metric name) of an evaluated method."""
    run_dir = Path(run_dir)
    summary = read_json(run_dir / "eval" / "summary.json")
    task = get_task(summary["task"])
    golds = {g["id"]: g["output"] for g in read_json(run_dir / "eval" / "golds.json")["golds"]}
    path = run_dir / "eval" / method / "predictions.json"
    if not path.exists():
        raise ProperError(f"{run_dir}: method {method} is not evaluated (no {path})")
    preds = {p["id"]: p["output"] for p in read_json(path)["golds"]}
    ids = [q for q in preds if q in golds]
    name = metric or PER_QUERY[task.kind][0]
    vals = per_example_scores(task.kind, [preds[q] for q in ids], [golds[q] for q in ids], task.labels)[name]
    return ids, np.asarray(vals, dtype=float), name


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n: int = 10000, seed: int = 0) -> dict:
    """Mean of ``a - b`` over paired items, its 95% bootstrap interval and the share of resamples with diff <= 0."""
    if len(a) != len(b) or len(a) == 0:
        raise ValueError("paired bootstrap needs two non-empty arrays of the same length")
    d = np.asarray(a, float) - np.asarray(b, float)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n, len(d)))
    means = d[idx].mean(1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return {"diff": float(d.mean()), "ci95": [float(lo), float(hi)], "p_le_0": float((means <= 0).mean()),
            "n": int(len(d))}


def aligned(run_dir: str | Path, method: str, other: str, metric: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """The two methods' per-query values on the queries both answered, in one order, and the metric name."""
    ids_a, a, name = per_query(run_dir, method, metric)
    ids_b, b, _ = per_query(run_dir, other, metric)
    ib = {q: i for i, q in enumerate(ids_b)}
    common = [(i, ib[q]) for i, q in enumerate(ids_a) if q in ib]
    return a[[i for i, _ in common]], b[[j for _, j in common]], name


def judged(res: dict, method: str, other: str, metric: str) -> dict:
    """``res`` (a :func:`paired_bootstrap`) with the names and ``better``: the whole 95% interval on
    ``method``'s better side of zero (for errors, lower is better)."""
    higher = next((h for m, h in PER_QUERY.values() if m == metric), metric != "abs_error")
    lo, hi = res["ci95"]
    return {**res, "method": method, "other": other, "metric": metric,
            "better": bool(lo > 0) if higher else bool(hi < 0)}


def compare(run_dir: str | Path, method: str, other: str, metric: str | None = None, n: int = 10000) -> dict:
    """Paired bootstrap of ``method`` against ``other`` on a run's queries (``diff`` > 0: ``method`` has more).

    ``better`` says whether ``method`` is better beyond noise: the whole 95% interval
    on the better side of zero (for errors, lower is better).
    """
    a, b, name = aligned(run_dir, method, other, metric)
    return judged(paired_bootstrap(a, b, n=n), method, other, name)


def seed_summary(runs: Sequence[str | Path], methods: Sequence[str], metric: str | None = None) -> dict:
    """Per method: the metric's mean and standard deviation over runs (seeds), and each run's value."""
    out = {}
    for m in methods:
        vals = []
        for r in runs:
            try:
                _, v, name = per_query(r, m, metric)
            except ProperError:
                continue
            vals.append(float(v.mean()))
        if vals:
            sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan
            out[m] = {"mean": float(np.mean(vals)), "std": sd, "runs": vals, "metric": name}
    return out
