"""Who gains: each method's gain over stage 1 by the target users' history length, with intervals over users.

    from properlm.evaluate.evaluate import load_results
    from properlm.evaluate.gains import gain_rows
    gain_rows(load_results("runs/demo"), kind="main")      # one row per (method, group)

The paper's claim is that sparse users gain most from the group level. For
every evaluated run this compares stage 2, PROPER and the OPPU baselines (each
decoding alike: ``proper@labels`` against ``stage1@labels``) with stage 1 on
groups of the run's target users:

* the terciles of their history length (:func:`terciles`: sparsest, middle and
  densest third; users of equal length stay in one third), and
* all targets, named ``low-resource split`` in a run with
  ``data.split=low-resource`` (the least active users as targets).

A group's gain is the improvement over stage 1 on the per-query values of
:data:`properlm.evaluate.stats.PER_QUERY`, averaged over the group's queries:
accuracy, ROUGE-1, and for ratings stage 1's absolute error minus the
method's (so a positive gain is always better). Its 95% interval comes from a
paired bootstrap over the group's users (:func:`~properlm.evaluate.stats.cluster_bootstrap`:
each drawn user keeps all their queries), and every row says how many users
and queries it rests on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from properlm.evaluate.stats import aligned_users, cluster_bootstrap, higher_is_better

#: The methods compared with stage 1, in the order they are reported.
GAIN_METHODS = ("stage2", "proper", "oppu-mlp", "oppu-kv")
BASELINE = "stage1"
TERCILES = ("sparsest third", "middle third", "densest third")
COLUMNS = ["task", "run", "kind", "group", "history", "method", "vs", "metric", "gain", "ci_low", "ci_high",
           "users", "queries", "beyond_noise"]
TITLE = "Who gains: improvement over stage 1 by the target users' history length"


def gain_pairs(methods: Iterable[str]) -> list[tuple[str, str]]:
    """``(method, its stage-1 baseline)`` for every gain method evaluated alongside stage 1 decoded alike:
    ``proper`` with ``stage1``, ``proper@labels`` with ``stage1@labels``; free decoding first."""
    methods = list(methods)
    pairs = []
    for m in methods:
        head, at, suffix = m.partition("@")
        if head in GAIN_METHODS and f"{BASELINE}{at}{suffix}" in methods:
            pairs.append((m, f"{BASELINE}{at}{suffix}"))
    return sorted(pairs, key=lambda p: (p[0].partition("@")[2], GAIN_METHODS.index(p[0].partition("@")[0])))


def history_lengths(result: dict) -> dict[str, int]:
    """User id -> history length, from the per-user rows of every evaluated method of a run."""
    return {u["user_id"]: int(u["history_len"]) for e in result["methods"].values() for u in e.get("per_user", [])
            if "history_len" in u}


def terciles(history: dict[str, int]) -> list[tuple[str, list[str]]]:
    """The users in thirds by history length, sparsest first: ``[(name, user ids), ...]``.

    A user's third is set by how many users have a strictly shorter history, so
    users of equal length always share a third (the thirds may then be uneven,
    and an empty one is left out). When that leaves a single group (every user
    has the same length), there are no thirds to compare: the list is empty.
    """
    ids = sorted(history, key=lambda u: (history[u], u))
    lengths = np.array([history[u] for u in ids])
    third = np.minimum(3 * np.searchsorted(lengths, lengths, side="left") // max(len(ids), 1), 2)
    groups = [(name, [u for u, t in zip(ids, third) if t == k]) for k, name in enumerate(TERCILES)]
    groups = [(name, members) for name, members in groups if members]
    return groups if len(groups) > 1 else []


def _span(lengths: Sequence[int]) -> str:
    """``"3-7"`` (or ``"5"``): the range of history lengths of a group."""
    lo, hi = min(lengths), max(lengths)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _groups(history: dict[str, int], kind: str) -> list[tuple[str, set[str] | None]]:
    """The run's user groups: the terciles, then all targets (None: no filter)."""
    everyone = "low-resource split" if kind == "low-resource" else "all targets"
    return [(name, set(members)) for name, members in terciles(history)] + [(everyone, None)]


def gain(a: np.ndarray, b: np.ndarray, users: Sequence[str], metric: str, n: int = 10000) -> dict:
    """Improvement of per-query values ``a`` over ``b`` (positive: better), by a bootstrap over users."""
    return cluster_bootstrap(a, b, users, n=n) if higher_is_better(metric) else cluster_bootstrap(b, a, users, n=n)


def _group_values(result: dict, kind: str) -> Iterator[tuple]:
    """Per (method, its baseline) and user group of one evaluated run: ``(method, base, metric, group,
    a, b, users, lengths)``, the group's per-query values of both, each query's user, and the group's
    history lengths (nothing when the run's predictions are not on disk)."""
    run = Path(result["run_dir"])
    if not (run / "eval" / "golds.json").exists():
        return
    history = history_lengths(result)
    for method, base in gain_pairs(result["methods"]):
        a, b, users, metric = aligned_users(run, method, base)
        for group, members in _groups(history, kind):
            keep = [i for i, u in enumerate(users) if members is None or u in members]
            if keep:
                mine = [users[i] for i in keep]
                lengths = [history[u] for u in set(mine) if u in history]
                yield method, base, metric, group, a[keep], b[keep], mine, lengths


def _row(task: str, run: str, run_dir: str, kind: str, group: str, lengths: list[int], method: str, base: str,
         metric: str, res: dict) -> dict:
    """One row of :data:`COLUMNS` from a group's bootstrap result."""
    return {"task": task, "run": run, "run_dir": run_dir, "kind": kind, "group": group,
            "history": _span(lengths) if lengths else "", "method": method, "vs": base, "metric": metric,
            "gain": res["diff"], "ci_low": res["ci95"][0], "ci_high": res["ci95"][1],
            "users": res["n_users"], "queries": res["n_queries"], "beyond_noise": res["ci95"][0] > 0}


def gain_rows(result: dict, kind: str = "main", n: int = 10000) -> list[dict]:
    """One run's gains over stage 1 per method and user group (rows of :data:`COLUMNS`).

    Args:
        result: the run's evaluation result (``evaluate_run`` or ``load_results``); its
            predictions must be on disk under ``RUN/eval`` (else no rows).
        kind: the run's kind (``main``, ``low-resource``, ``ablation``: report.run_kind).
        n: bootstrap resamples.
    """
    run = Path(result["run_dir"])
    return [_row(result["task"], run.name, str(run), kind, group, lengths, method, base, metric,
                 gain(a, b, users, metric, n))
            for method, base, metric, group, a, b, users, lengths in _group_values(result, kind)]


def pooled_gain_rows(results: Sequence[dict], kind: str = "main", n: int = 10000) -> list[dict]:
    """Gains over stage 1 pooled over several runs of one kind (a grid's seeds), rows of :data:`COLUMNS`.

    Each run's users fall in their thirds by that run's history lengths; a group's rows
    pool the group's queries over the runs, and the interval resamples (run, user) pairs
    with all their queries (the same user in two runs is two pairs, as in the seeds
    report's bootstrap). ``users`` counts the pairs; ``run`` says how many runs."""
    pooled: dict[tuple[str, str, str], dict] = {}
    task = None
    for i, result in enumerate(results):
        for method, base, metric, group, a, b, users, lengths in _group_values(result, kind):
            task = task or result["task"]
            d = pooled.setdefault((method, base, group), {"a": [], "b": [], "pairs": [], "lengths": [],
                                                          "metric": metric, "runs": 0})
            d["a"].append(a)
            d["b"].append(b)
            d["pairs"] += [(i, u) for u in users]
            d["lengths"] += lengths
            d["runs"] += 1
    return [_row(task, f"{d['runs']} runs pooled", "", kind, group, d["lengths"], method, base, d["metric"],
                 gain(np.concatenate(d["a"]), np.concatenate(d["b"]), d["pairs"], d["metric"], n))
            for (method, base, group), d in pooled.items()]


def markdown(rows: Sequence[dict]) -> str:
    """The gains as a GitHub Markdown table: gain, its 95% interval, users and queries per group."""
    lines = ["| task | run | group | history | method | metric | gain over stage 1 | 95% interval | users | "
             "queries | beyond noise |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['run']} | {r['group']} | {r['history']} | {r['method']} | {r['metric']} | "
                     f"{r['gain']:+.4f} | [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | {r['users']} | "
                     f"{r['queries']} | {'yes' if r['beyond_noise'] else 'no'} |")
    return "\n".join(lines)


def figure_rows(rows: Sequence[dict], primary: str, low: str | None = None) -> list[dict]:
    """The rows one task's figure shows: the primary run's terciles, after the low-resource run's
    targets when there is one (``primary``, ``low``: run directories); each with a ``category``
    label for the x axis."""
    out = [{**r, "category": f"low-resource split\n(own run), history {r['history']}"}
           for r in rows if low and r["run_dir"] == str(low) and r["group"] == "low-resource split"]
    out += [{**r, "category": f"{r['group']}\nhistory {r['history']}"}
            for r in rows if r["run_dir"] == str(primary) and r["group"] in TERCILES]
    return out
