"""Summaries of a dataset: counts, how history lengths spread over users, planted groups.

``inspect_dataset`` returns plain JSON-able data (for ``--json`` and for reports);
``inspect_path`` gives the same for a path, streaming JSONL and LaMP files;
``format_inspect`` renders it for a terminal.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from properlm.data.schema import Dataset
from properlm.data.tasks import get_task, is_known_task

# History lengths are heavy-tailed (most users short, a few long): log-like bins read best.
_EDGES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def _percentile(sorted_values: list[int], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), without numpy."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _histogram(lengths: list[int]) -> list[dict[str, Any]]:
    """Counts of users per history-length bin, from the first to the last non-empty bin."""
    edges = [0, *_EDGES, math.inf]
    bins = []
    for lo, hi in zip(edges, edges[1:]):
        count = sum(lo <= n < hi for n in lengths)
        label = f"{lo}" if hi - lo == 1 else (f"{lo}+" if hi == math.inf else f"{lo}-{hi - 1}")
        bins.append({"bin": label, "users": count})
    used = [i for i, b in enumerate(bins) if b["users"]]
    return bins[used[0]: used[-1] + 1] if used else []


@dataclass
class Summary:
    """What a summary is computed from: one number per user, never the records themselves.

    Streaming readers (``properlm.data.jsonl.scan_jsonl``, ``properlm.data.lamp.scan_lamp``)
    fill it in one pass over a file; :func:`summarize` fills it from a loaded dataset.

    Attributes:
        task: the task name.
        source: where the data came from.
        lengths: the history length of every user.
        queries: the number of queries.
        with_gold: how many of them have a gold.
        groups: the planted group of every user that has one.
        splits: the ``oppu_split`` of every user that has one.
    """

    task: str
    source: str
    lengths: list[int] = field(default_factory=list)
    queries: int = 0
    with_gold: int = 0
    groups: list[int] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)


def summarize(ds: Dataset) -> Summary:
    """The :class:`Summary` of a loaded dataset."""
    queries = [q for u in ds.users for q in u.queries]
    return Summary(task=ds.task, source=ds.source, lengths=[len(u.history) for u in ds.users],
                   queries=len(queries), with_gold=sum(q.gold is not None for q in queries),
                   groups=[u.group for u in ds.users if u.group is not None],
                   splits=[u.meta["oppu_split"] for u in ds.users if "oppu_split" in u.meta])


def summary_info(s: Summary) -> dict[str, Any]:
    """The JSON-able summary (see :func:`inspect_dataset`) of a :class:`Summary`."""
    lengths = sorted(s.lengths)
    info: dict[str, Any] = {
        "task": s.task,
        "kind": get_task(s.task).kind if is_known_task(s.task) else None,
        "source": s.source,
        "users": len(lengths),
        "items": sum(lengths),
        "queries": s.queries,
        "queries_with_gold": s.with_gold,
    }
    if lengths:
        info["history"] = {
            "min": lengths[0], "median": statistics.median(lengths), "mean": round(statistics.fmean(lengths), 2),
            "p90": round(_percentile(lengths, 0.9), 1), "max": lengths[-1],
        }
        info["histogram"] = _histogram(lengths)
    if s.groups:
        counts = Counter(s.groups)
        info["groups"] = {str(g): counts[g] for g in sorted(counts)}
    if s.splits:
        counts = Counter(s.splits)
        info["oppu_split"] = {k: counts[k] for k in sorted(counts)}
    return info


def inspect_dataset(ds: Dataset) -> dict[str, Any]:
    """Summarize a dataset.

    Args:
        ds: the dataset.

    Returns:
        ``task``, ``kind``, ``source``, ``users``, ``items``, ``queries``,
        ``queries_with_gold``, ``history`` (min/median/mean/p90/max of history lengths),
        ``histogram`` (list of ``{"bin", "users"}``), and ``groups`` (``{group: users}``)
        when users carry planted groups.
    """
    return summary_info(summarize(ds))


def inspect_path(path: str | Path, task: str | None = None, fmt: str = "auto", n_queries: int = 5) -> dict[str, Any]:
    """Summarize the data at ``path`` like ``inspect_dataset(load_dataset(...))``, streaming where it can.

    JSONL logs and LaMP files are read in one pass without building the dataset (memory
    grows with the number of users, not of records; see docs/data.md); other layouts
    are loaded. The same bad input raises the same :class:`~properlm.errors.DataError`.
    """
    from properlm.data.load import scan_dataset

    return summary_info(scan_dataset(path, task=task, fmt=fmt, n_queries=n_queries))


def format_inspect(info: dict[str, Any], width: int = 40) -> str:
    """Render ``inspect_dataset``'s summary as text lines with a bar histogram."""
    kind = f" ({info['kind']})" if info.get("kind") else ""
    lines = [
        f"task      {info['task']}{kind}",
        f"source    {info['source']}",
        f"users     {info['users']}",
        f"items     {info['items']} history items",
        f"queries   {info['queries']} ({info['queries_with_gold']} with gold)",
    ]
    h = info.get("history")
    if h:
        lines.append(f"history   min {h['min']}  median {h['median']:g}  mean {h['mean']:g}  "
                     f"p90 {h['p90']:g}  max {h['max']}")
        top = max(b["users"] for b in info["histogram"])
        lines.append("history length  users")
        for b in info["histogram"]:
            bar = "#" * max(1 if b["users"] else 0, round(width * b["users"] / top))
            lines.append(f"  {b['bin']:>9}  {b['users']:>5}  {bar}")
    if "groups" in info:
        per = ", ".join(f"{g}: {n}" for g, n in info["groups"].items())
        lines.append(f"groups    {len(info['groups'])} planted (users per group: {per})")
    if "oppu_split" in info:
        lines.append("oppu      " + ", ".join(f"{s}: {n} users" for s, n in info["oppu_split"].items()))
    return "\n".join(lines)
