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

The file is read one line at a time (binary, each line decoded on its own, so bad
UTF-8 is reported with its line). :func:`load_jsonl` builds the dataset in memory;
:func:`scan_jsonl` checks and summarizes a log in one pass keeping a few numbers per
user (plus 8 bytes per record for the duplicate-id check), and :func:`convert_jsonl`
writes LaMP's layout in bounded memory: it scans first (so nothing is written when a
record is bad), then partitions the records by user into temporary bucket files and
writes the users bucket by bucket.
"""

from __future__ import annotations

import heapq
import json
import os
import shutil
import tempfile
from array import array
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from properlm.data.inspect import Summary
from properlm.data.lamp import LampWriter, as_text, date_key, partial_golds_error
from properlm.data.schema import Dataset, Item, Query, User
from properlm.data.stream import iter_lines
from properlm.data.tasks import get_task
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


def _iter_records(path: str | Path) -> Iterator[tuple[str, _Record]]:
    """(user id, record) for every non-blank line, checked; DataError on the first bad line."""
    src = str(path)
    loads = json.loads
    for n, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            raw = loads(line)
        except json.JSONDecodeError as e:
            raise DataError(src, f"malformed JSON at column {e.colno}: {e.msg}", record=f"line {n}") from None
        yield _parse_line(raw, src, n)


def _query_flags(records: list[_Record], n_queries: int) -> tuple[list[_Record], list[bool]]:
    """A user's records in their final order (time order when all are timed) and which are queries."""
    if all(r.time is not None for r in records):
        records = sorted(records, key=lambda r: date_key(r.time))  # stable: ties keep file order
    if any(r.split is not None for r in records):
        is_query = [r.split == "query" for r in records]
    else:
        n_q = max(0, min(n_queries, len(records) - 1))
        is_query = [i >= len(records) - n_q for i in range(len(records))]
    return records, is_query


def _build_user(uid: str, records: list[_Record], n_queries: int, src: str, query_ids: set[str] | None) -> User:
    """One user from their records (in file order); checks ids unless ``query_ids`` is None."""
    records, is_query = _query_flags(records, n_queries)
    user = User(id=uid)
    if query_ids is not None:
        seen: set[str] = set()
        for r, q in sorted(zip(records, is_query), key=lambda rq: rq[0].line):  # report the later line
            if r.id in seen or (q and r.id in query_ids):
                raise DataError(src, f"duplicate id {r.id!r}", record=f"line {r.line}", field="id")
            seen.add(r.id)
            if q:
                query_ids.add(r.id)
    for r, q in zip(records, is_query):
        if q:
            user.queries.append(Query(id=r.id, input=r.prompt, gold=r.response))
        else:
            user.history.append(Item(id=r.id, fields={"prompt": r.prompt, "response": r.response}, date=r.time))
    if not user.history:
        raise _no_history(src, uid, min(r.line for r in records))
    return user


def _no_history(src: str, uid: str, first_line: int) -> DataError:
    return DataError(src, f"user {uid} has no history record (all are queries)", record=f"line {first_line}",
                     field="split")


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
    for uid, record in _iter_records(path):
        by_user.setdefault(uid, []).append(record)
    users, query_ids = [], set()
    for uid in list(by_user):
        users.append(_build_user(uid, by_user.pop(uid), n_queries, src, query_ids))
    if not users:
        raise DataError(src, "no records")
    return Dataset(task="jsonl", users=users, source=src)


class _UserScan:
    """What the one-pass scan keeps per user: counts and a few lines, never the records."""

    __slots__ = ("index", "first_line", "n", "has_split", "split_queries", "split_golds", "timed", "latest",
                 "last", "empties", "nogold_line", "nogold_timed")

    def __init__(self, index: int, line: int, n_queries: int):
        self.index, self.first_line, self.n = index, line, 0
        self.has_split = False
        self.split_queries = self.split_golds = 0      # records with split "query" (and a response)
        self.timed = True                              # every record so far has a time
        self.latest: list[tuple] = []                  # heap: the n_queries latest (time key, line)
        self.last: deque[int] = deque(maxlen=max(0, n_queries))  # the n_queries last lines
        self.empties: list[_Record] = []               # records with an empty prompt (rare)
        self.nogold_line: tuple | None = None          # first split-"query" record without response, by line
        self.nogold_timed: tuple | None = None         # ... by (time key, line)

    def add(self, r: _Record, n_queries: int) -> None:
        self.n += 1
        if r.split is not None:
            self.has_split = True
            if r.split == "query":
                self.split_queries += 1
                if r.response is not None:
                    self.split_golds += 1
                else:
                    if self.nogold_line is None:
                        self.nogold_line = (r.line, r.id)
                    if r.time is not None:
                        key = (date_key(r.time), r.line)
                        if self.nogold_timed is None or key < self.nogold_timed[0]:
                            self.nogold_timed = (key, r.id)
        if r.time is None:
            self.timed, self.latest = False, []
        elif self.timed and n_queries > 0:
            key = (date_key(r.time), r.line)
            if len(self.latest) < n_queries:
                heapq.heappush(self.latest, key)
            elif key > self.latest[0]:
                heapq.heapreplace(self.latest, key)
        self.last.append(r.line)
        if not r.prompt:
            self.empties.append(r)

    def n_queries(self, n_queries: int) -> int:
        return self.split_queries if self.has_split else max(0, min(n_queries, self.n - 1))

    def query_lines(self, n_queries: int) -> set[int]:
        """The lines of the records that become queries when no record has a split."""
        n_q = self.n_queries(n_queries)
        if not n_q:
            return set()
        if self.timed:
            return {line for _, line in heapq.nlargest(n_q, self.latest)}
        return set(list(self.last)[-n_q:])

    def is_query(self, r: _Record, n_queries: int, lines: set[int] | None = None) -> bool:
        if self.has_split:
            return r.split == "query"
        return r.line in (lines if lines is not None else self.query_lines(n_queries))

    def order_key(self, r: _Record) -> tuple:
        """Where ``r`` sits in the user's final order (time order when every record is timed)."""
        return (date_key(r.time), r.line) if self.timed else (r.line,)


@dataclass
class JsonlScan:
    """The result of :func:`scan_jsonl`: users (in first-appearance order) and their counts."""

    source: str
    n_queries: int
    users: dict[str, _UserScan]
    records: int

    def summary(self) -> Summary:
        lengths, queries, golds = [], 0, 0
        for u in self.users.values():
            q = u.n_queries(self.n_queries)
            lengths.append(u.n - q)
            queries += q
            golds += u.split_golds if u.has_split else q
        return Summary(task="jsonl", source=self.source, lengths=lengths, queries=queries, with_gold=golds)

    def first_query_without_gold(self) -> str | None:
        """The id of the first query (in the dataset's order) without a gold, if some have golds and some not."""
        s = self.summary()
        if not 0 < s.with_gold < s.queries:
            return None
        for u in self.users.values():
            first = u.nogold_timed if u.timed else u.nogold_line
            if first is not None:
                return first[1]
        return None  # not reached: some query lacks a gold


def scan_jsonl(path: str | Path, n_queries: int = 5) -> JsonlScan:
    """Check a JSONL log in one streaming pass, raising what :func:`load_jsonl` + ``validate`` would.

    Keeps per user a few counts and lines, and one 8-byte hash per record id. When two
    hashes agree (a duplicate id, or a hash collision) a second pass reads the records
    with those ids and replays the loader's duplicate check exactly.

    Raises:
        DataError: the same error, for the same record, as ``load_dataset`` on the log.
    """
    src = str(path)
    users: dict[str, _UserScan] = {}
    hashes = array("q")
    for uid, r in _iter_records(path):
        u = users.get(uid)
        if u is None:
            u = users[uid] = _UserScan(len(users), r.line, n_queries)
        u.add(r, n_queries)
        hashes.append(hash(r.id))
    if not users:
        raise DataError(src, "no records")
    suspects = _repeated(hashes)
    del hashes
    candidates: dict[str, list[_Record]] = {}
    if suspects:
        for uid, r in _iter_records(path):
            if hash(r.id) in suspects:
                candidates.setdefault(uid, []).append(r)
    # The loader's per-user checks, user by user in its order: duplicate ids, then history.
    query_ids: set[str] = set()
    for uid, u in users.items():
        if uid in candidates:
            lines = None if u.has_split else u.query_lines(n_queries)
            seen: set[str] = set()
            for r in candidates[uid]:  # in line order
                q = u.is_query(r, n_queries, lines)
                if r.id in seen or (q and r.id in query_ids):
                    raise DataError(src, f"duplicate id {r.id!r}", record=f"line {r.line}", field="id")
                seen.add(r.id)
                if q:
                    query_ids.add(r.id)
        if u.n == u.n_queries(n_queries):
            raise _no_history(src, uid, u.first_line)
    # validate(): the first query with an empty input.
    for uid, u in users.items():
        empty = [r for r in u.empties if u.is_query(r, n_queries)]
        if empty:
            qid = min(empty, key=u.order_key).id
            raise DataError(src, "empty query input", record=f"user_id={uid} query {qid}", field="input")
    return JsonlScan(source=src, n_queries=n_queries, users=users, records=sum(u.n for u in users.values()))


def _repeated(hashes: array) -> set[int]:
    """The values that occur more than once (sorts ``hashes`` in place)."""
    import numpy as np

    if len(hashes) < 2:
        return set()
    a = np.frombuffer(hashes, dtype=np.int64)  # a writable view: sorted in place, no copy
    a.sort()
    dup = a[1:][a[1:] == a[:-1]]
    return set(int(x) for x in np.unique(dup))


#: Records per bucket file in :func:`convert_jsonl` (one bucket is in memory at a time).
BUCKET_RECORDS = 100_000
MAX_BUCKETS = 512


def convert_jsonl(path: str | Path, out_dir: str | Path, n_queries: int = 5,
                  bucket_records: int = BUCKET_RECORDS) -> tuple[int, list[Path]]:
    """Write a JSONL log in LaMP's layout in bounded memory; same files as ``export_lamp(load_jsonl(...))``.

    Pass 1 (:func:`scan_jsonl`) checks every record, so a bad one anywhere is reported
    (with its line) before anything is written. Pass 2 copies each record into a
    temporary bucket file; buckets hold consecutive users (in first-appearance order)
    with about ``bucket_records`` records together. Pass 3 reads one bucket at a time,
    builds its users and appends them to the LaMP files, which are written beside
    ``out_dir`` and moved into it at the end.

    Returns:
        (number of users, paths written).

    Raises:
        DataError: a bad record (pass 1), or golds on some queries and not others.
    """
    src = str(path)
    scan = scan_jsonl(path, n_queries)
    missing = scan.first_query_without_gold()
    if missing is not None:
        raise partial_golds_error(out_dir, missing)
    per_bucket = max(bucket_records, -(-scan.records // MAX_BUCKETS))
    bucket_of: dict[str, int] = {}
    filled, bucket = 0, 0
    for uid, u in scan.users.items():
        if filled and filled + u.n > per_bucket:
            bucket, filled = bucket + 1, 0
        bucket_of[uid] = bucket
        filled += u.n
    n_buckets = bucket + 1
    index = {uid: u.index for uid, u in scan.users.items()}
    del scan

    with LampWriter(out_dir, get_task("jsonl")) as writer:
        work = Path(tempfile.mkdtemp(prefix="buckets.", dir=writer.tmp))
        try:
            files = [open(work / f"{b}.jsonl", "w", encoding="utf-8", newline="\n") for b in range(n_buckets)]
            try:
                for n, line in iter_lines(path):  # pass 2: the records of each bucket's users together
                    if line.strip():
                        uid = as_text(json.loads(line)["user_id"], src, f"line {n}", "user_id")
                        files[bucket_of[uid]].write(f"{n}\t{line}\n")
            finally:
                for f in files:
                    f.close()
            del bucket_of
            for b in range(n_buckets):  # pass 3: users bucket by bucket, in order
                by_user: dict[str, list[_Record]] = {}
                with open(work / f"{b}.jsonl", encoding="utf-8", newline="\n") as f:
                    for row in f:
                        n_text, _, line = row.partition("\t")
                        uid, r = _parse_line(json.loads(line), src, int(n_text))
                        by_user.setdefault(uid, []).append(r)
                os.unlink(work / f"{b}.jsonl")
                for uid in list(by_user):
                    writer.add(_build_user(uid, by_user.pop(uid), n_queries, src, None), index[uid])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return len(index), writer.paths
