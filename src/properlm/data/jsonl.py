"""The engineer's own format: one JSON record per line, task ``jsonl``.

Each non-blank line is an object::

    {"user_id": "u17", "prompt": "...", "response": "...", "time": "2024-05-01T10:00:00", "split": "history"}

* ``user_id``, ``prompt`` and ``response`` are required (``response`` may be left out
  on a record whose ``split`` is ``"query"``: its gold is then unknown);
* ``time`` (optional): any sortable stamp, a number or a string (ISO dates sort
  correctly). A user's records are put in time order when every one of them has a
  time, and kept in file order otherwise;
* ``split`` (optional): ``"history"`` or ``"query"``. A user none of whose records has a
  split gets their latest ``n_queries`` records as queries (always leaving one history
  item); records without a split, of a user that has some, are history;
* ``id`` (optional): the record's id, unique within its user (and across the file for
  queries); the default is ``<user_id>-<line number>``.

Unknown keys are ignored. Errors name the file, the line and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from properlm import io
from properlm.data.lamp import as_text, date_key
from properlm.data.schema import Dataset, Item, Query, User
from properlm.errors import DataError

SPLITS = ("history", "query")


@dataclass
class _Record:
    line: int
    id: str
    prompt: str
    response: str | None
    time: str | None
    split: str | None


def _parse_line(raw: Any, path: str, line: int) -> tuple[str, _Record]:
    """Check one record and return (user id, record)."""
    rec = f"line {line}"
    if not isinstance(raw, dict):
        raise DataError(path, "expected a JSON object", record=rec)
    split = raw.get("split")
    if split is not None and split not in SPLITS:
        raise DataError(path, f"expected 'history' or 'query', got {split!r}", record=rec, field="split")
    required = ("user_id", "prompt") if split == "query" else ("user_id", "prompt", "response")
    for name in required:
        if raw.get(name) is None:
            raise DataError(path, "missing field", record=rec, field=name)
    uid = as_text(raw["user_id"], path, rec, "user_id")
    response = as_text(raw["response"], path, rec, "response") if raw.get("response") is not None else None
    time = as_text(raw["time"], path, rec, "time") if raw.get("time") is not None else None
    rid = as_text(raw["id"], path, rec, "id") if raw.get("id") is not None else f"{uid}-{line}"
    return uid, _Record(line, rid, as_text(raw["prompt"], path, rec, "prompt"), response, time, split)


def load_jsonl(path: str | Path, n_queries: int = 5) -> Dataset:
    """Load a JSONL log of (user, prompt, response, time) records.

    Args:
        path: the ``.jsonl`` file.
        n_queries: for users without explicit splits, how many latest records become queries.

    Returns:
        Users in order of first appearance, task ``jsonl``.

    Raises:
        DataError: on the first bad line (malformed JSON, a missing field, a bad split, a
            duplicate id), naming the file, the line and the field.
    """
    src = str(path)
    by_user: dict[str, list[_Record]] = {}
    for n, line in enumerate(io.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(src, f"malformed JSON at column {e.colno}: {e.msg}", record=f"line {n}") from None
        uid, record = _parse_line(raw, src, n)
        by_user.setdefault(uid, []).append(record)

    users, query_ids = [], set()
    for uid, records in by_user.items():
        if all(r.time is not None for r in records):
            records = sorted(records, key=lambda r: date_key(r.time))  # stable: ties keep file order
        if any(r.split is not None for r in records):
            is_query = [r.split == "query" for r in records]
        else:
            n_q = max(0, min(n_queries, len(records) - 1))
            is_query = [i >= len(records) - n_q for i in range(len(records))]
        user, seen = User(id=uid), set()
        for r, q in sorted(zip(records, is_query), key=lambda rq: rq[0].line):  # report the later line
            if r.id in seen or (q and r.id in query_ids):
                raise DataError(src, f"duplicate id {r.id!r}", record=f"line {r.line}", field="id")
            seen.add(r.id)
            query_ids.update([r.id] if q else [])
        for r, q in zip(records, is_query):
            if q:
                user.queries.append(Query(id=r.id, input=r.prompt, gold=r.response))
            else:
                user.history.append(Item(id=r.id, fields={"prompt": r.prompt, "response": r.response}, date=r.time))
        if not user.history:
            first = min(r.line for r in records)
            raise DataError(src, f"user {uid} has no history record (all are queries)", record=f"line {first}",
                            field="split")
        users.append(user)
    if not users:
        raise DataError(src, "no records")
    return Dataset(task="jsonl", users=users, source=src)
