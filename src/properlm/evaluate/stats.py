"""Whether a difference between two methods is beyond noise: paired bootstrap over users, seed summaries.

    from properlm.evaluate.stats import compare, seed_summary
    compare("runs/demo", "proper", "oppu-mlp")      # {"metric", "diff", "ci95", "p_le_0", "n_users", ...}
    seed_summary(["runs/s0", "runs/s1", "runs/s2"], ["stage1", "proper"])

All queries of one user are answered with that user's adapter (and judged
against that user's habits), so they are not independent draws: the unit of
resampling is the user. :func:`compare` runs a paired cluster bootstrap
(:func:`cluster_bootstrap`): it draws users with replacement, keeps all their
queries, and takes the difference of the per-query means over the drawn
queries (the same draw for both methods, since both answered the same
queries): accuracy for classification, absolute error (MAE) for ratings,
ROUGE-1 / ROUGE-L for generation. :func:`paired_bootstrap` is the query-level
bootstrap (every query its own unit), which is too narrow when a user's
queries go together.
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


def query_users(run_dir: str | Path) -> dict[str, str]:
    """Query id -> user id of a run's evaluated queries.

    ``RUN/eval/golds.json`` names each query's ``user_id``; a run evaluated before
    it did has its owners read back from the run's split and data instead.
    """
    run_dir = Path(run_dir)
    golds = read_json(run_dir / "eval" / "golds.json")["golds"]
    owners = {g["id"]: g["user_id"] for g in golds if g.get("user_id") is not None}
    if len(owners) == len(golds):
        return owners
    from properlm.evaluate.evaluate import load_targets, query_owners

    try:
        owners = {**query_owners(load_targets(run_dir)[2]), **owners}
    except ProperError as e:
        raise ProperError(f"{run_dir}: eval/golds.json does not name each query's user, and the run's split "
                          f"cannot say it ({e}); evaluate the run again") from None
    missing = [g["id"] for g in golds if g["id"] not in owners]
    if missing:
        raise ProperError(f"{run_dir}: query {missing[0]} of eval/golds.json belongs to no target user")
    return owners


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


def cluster_bootstrap(a: np.ndarray, b: np.ndarray, clusters: Sequence, n: int = 10000, seed: int = 0) -> dict:
    """Mean of ``a - b`` over paired items, with a 95% interval from resampling whole clusters (users).

    Each resample draws as many clusters as there are, with replacement, keeps
    every item of each drawn cluster, and takes the mean of ``a - b`` over those
    items. ``clusters[i]`` is item i's cluster: any hashable (a user id, or a
    ``(seed, user)`` pair when runs are pooled). With one item per cluster this is
    :func:`paired_bootstrap` (the same draws for the same seed).

    Returns:
        ``{"diff", "ci95", "p_le_0", "n", "n_queries", "n_users"}``: ``n`` and
        ``n_queries`` count the items, ``n_users`` the clusters.
    """
    if len(a) != len(b) or len(a) != len(clusters) or len(a) == 0:
        raise ValueError("cluster bootstrap needs non-empty arrays and clusters of the same length")
    d = np.asarray(a, float) - np.asarray(b, float)
    index: dict = {}
    codes = np.array([index.setdefault(c, len(index)) for c in clusters])
    sums = np.bincount(codes, weights=d, minlength=len(index))
    counts = np.bincount(codes, minlength=len(index)).astype(float)
    idx = np.random.default_rng(seed).integers(0, len(index), size=(n, len(index)))
    means = sums[idx].sum(1) / counts[idx].sum(1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return {"diff": float(d.mean()), "ci95": [float(lo), float(hi)], "p_le_0": float((means <= 0).mean()),
            "n": int(len(d)), "n_queries": int(len(d)), "n_users": len(index)}


def _common(run_dir: str | Path, method: str, other: str, metric: str | None
            ) -> tuple[list[str], np.ndarray, np.ndarray, str]:
    """(query ids both methods answered, ``method``'s values, ``other``'s values, metric name), in one order."""
    ids_a, a, name = per_query(run_dir, method, metric)
    ids_b, b, _ = per_query(run_dir, other, metric)
    ib = {q: i for i, q in enumerate(ids_b)}
    common = [(i, ib[q]) for i, q in enumerate(ids_a) if q in ib]
    return [ids_a[i] for i, _ in common], a[[i for i, _ in common]], b[[j for _, j in common]], name


def aligned(run_dir: str | Path, method: str, other: str, metric: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """The two methods' per-query values on the queries both answered, in one order, and the metric name."""
    _, a, b, name = _common(run_dir, method, other, metric)
    return a, b, name


def aligned_users(run_dir: str | Path, method: str, other: str, metric: str | None = None
                  ) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """:func:`aligned` plus each query's user (see :func:`query_users`)."""
    ids, a, b, name = _common(run_dir, method, other, metric)
    owners = query_users(run_dir)
    return a, b, [owners[q] for q in ids], name


def higher_is_better(metric: str) -> bool:
    """Whether a larger per-query value is better (False for errors such as ``abs_error``)."""
    return next((h for m, h in PER_QUERY.values() if m == metric), metric not in ("abs_error", "squared_error"))


def judged(res: dict, method: str, other: str, metric: str) -> dict:
    """``res`` (a :func:`paired_bootstrap`) with the names and ``better``: the whole 95% interval on
    ``method``'s better side of zero (for errors, lower is better)."""
    higher = higher_is_better(metric)
    lo, hi = res["ci95"]
    return {**res, "method": method, "other": other, "metric": metric,
            "better": bool(lo > 0) if higher else bool(hi < 0)}


def compare(run_dir: str | Path, method: str, other: str, metric: str | None = None, n: int = 10000) -> dict:
    """Paired bootstrap over users of ``method`` against ``other`` on a run's queries (``diff`` > 0:
    ``method`` has more); see :func:`cluster_bootstrap`.

    ``better`` says whether ``method`` is better beyond noise: the whole 95% interval
    on the better side of zero (for errors, lower is better). ``n_users`` and
    ``n_queries`` say how many users and queries the interval rests on.
    """
    a, b, users, name = aligned_users(run_dir, method, other, metric)
    return judged(cluster_bootstrap(a, b, users, n=n), method, other, name)


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
