"""Read and write LaMP's layout: a questions JSON plus an optional outputs (golds) JSON.

Questions: a list of ``{"id", "input", "profile": [items], "user_id"?}``. Golds:
``{"task": "LaMP_N", "golds": [{"id", "output"}]}``. In raw LaMP every question is
its own user (its profile is that user's history); when ``user_id`` is present
(LaMP's time-based split, or properlm's own export) questions of the same user
merge into one user and their profiles are de-duplicated by item id.

properlm's export adds keys LaMP readers ignore: ``user_id`` on every question,
``group`` and ``user_meta`` when a user has them, ``meta`` in the outputs file,
and, only when some user has no query (LaMP cannot express that),
``users_without_queries.json`` beside ``questions.json``.

Files are read incrementally (``properlm.data.stream``): one question or gold at a
time, never the whole parsed document. :func:`load_lamp` still builds the dataset
in memory; :func:`scan_lamp` summarizes without it (it keeps per user only counts
and the item ids it needs to de-duplicate profiles, and the question and gold ids).
:class:`LampWriter` writes the layout one user at a time.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from properlm import io
from properlm.data.inspect import Summary
from properlm.data.schema import Dataset, Item, Query, User
from properlm.data.stream import JsonReader
from properlm.data.tasks import Task, get_task
from properlm.errors import ConfigError, DataError

EXTRA_USERS_FILE = "users_without_queries.json"


def as_text(value: Any, path: str, record: str, field: str) -> str:
    """A field value as a string; numbers are accepted (some LaMP files store scores as numbers)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(path, f"expected text, got {type(value).__name__}", record=record, field=field)


def parse_item(raw: Any, task: Task, path: str, record: str) -> Item:
    """Parse one profile item, checking the task's required fields.

    Args:
        raw: the JSON object of the item.
        task: the task whose ``item_fields`` must be present.
        path: the file, for error messages.
        record: where the item sits, e.g. ``#3 (id=310) profile[2]``.

    Raises:
        DataError: not an object, no ``id``, a required field missing, a non-text value.
    """
    if not isinstance(raw, dict):
        raise DataError(path, "profile item is not a JSON object", record=record)
    if raw.get("id") is None:
        raise DataError(path, "missing item id", record=record, field="id")
    item_id = as_text(raw["id"], path, record, "id")
    for name in task.item_fields:
        if raw.get(name) is None:
            raise DataError(path, f"missing field required by {task.name}", record=f"{record} (id={item_id})",
                            field=name)
    fields = {k: as_text(v, path, record, k) for k, v in raw.items() if k not in ("id", "date") and v is not None}
    date = as_text(raw["date"], path, record, "date") if raw.get("date") is not None else None
    return Item(id=item_id, fields=fields, date=date)


def date_key(date: str) -> tuple[int, float, str]:
    """Sort key for time stamps: numeric strings by value (``"9" < "10"``), others as text (ISO dates)."""
    try:
        return (0, float(date), "")
    except ValueError:
        return (1, 0.0, date)


def sort_history(items: list[Item]) -> list[Item]:
    """Oldest first when every item has a date; file order otherwise (a partial order would be a guess)."""
    if items and all(it.date is not None for it in items):
        return sorted(items, key=lambda it: date_key(it.date))  # stable: ties keep file order
    return items


def add_unique(history: list[Item], seen: set[str], items: list[Item]) -> None:
    """Append ``items`` to ``history`` skipping ids already seen (the same item in several profiles)."""
    for it in items:
        if it.id not in seen:
            seen.add(it.id)
            history.append(it)


def task_from_path(path: str | Path) -> str | None:
    """Guess a task from a path like ``data/LaMP_2M/dev_questions.json`` (the last LaMP-ish part wins)."""
    found = re.findall(r"lamp[\s_\-]?([1-7][nm]?)", str(path), flags=re.IGNORECASE)
    return f"LaMP_{found[-1].upper()}" if found else None


def resolve_task(from_file: str | None, given: str | None, path: str, questions: Iterable) -> Task:
    """Pick the task: the golds' ``task`` field, checked against ``task=``, else ``task=``, else the path.

    LaMP's plain ``LaMP_2`` is resolved from the profile fields (tag -> 2M, category -> 2N).
    """
    name = from_file or given or task_from_path(path)
    if name is None:
        raise DataError(path, "cannot tell the task: no outputs file with a 'task' field; pass task= (--task)",
                        field="task")
    if _is_plain_lamp2(name):
        first = next((p for q in questions if isinstance(q, dict) for p in q.get("profile") or []), {})
        name = "LaMP-2M" if isinstance(first, dict) and "tag" in first else "LaMP-2N"
    try:
        task = get_task(name)
    except ConfigError as e:  # a task named by the file is a data problem; name the file
        raise DataError(path, str(e), field="task") from None
    if from_file and given and get_task(given) != task:
        raise DataError(path, f"task {given!r} given but the outputs file says {from_file!r}", field="task")
    return task


def _is_plain_lamp2(name: Any) -> bool:
    return re.fullmatch(r"lamp[\s_\-]?2", str(name), flags=re.IGNORECASE) is not None


def _sniff_task(from_file: str | None, given: str | None, path: str,
                questions: Iterator[Any]) -> tuple[Task, Iterator[Any]]:
    """:func:`resolve_task` on a stream of questions; returns the task and the same stream.

    Only a plain ``LaMP_2`` needs to look at questions: up to the first one with a profile.
    """
    head: list[Any] = []
    if _is_plain_lamp2(from_file or given or task_from_path(path)):
        for q in questions:
            head.append(q)
            if isinstance(q, dict) and q.get("profile"):
                break
    return resolve_task(from_file, given, path, head), itertools.chain(head, questions)


def iter_json_list(path: str | os.PathLike, what: str) -> Iterator[Any]:
    """The elements of a file holding one JSON list, read one at a time.

    Raises:
        DataError: malformed JSON (line and column), bad UTF-8, or a document that is
            not a list (``expected <what>``).
    """
    with JsonReader(path) as r:
        if r.peek() != "[":
            r.value()  # malformed JSON is reported as such
            r.end()
            raise DataError(str(path), f"expected {what}")
        yield from r.array()
        r.end()


def _add_gold(g: Any, i: int, path: str, out: dict[str, str], keep_output: bool) -> None:
    rec = f"golds[{i}]"
    if not isinstance(g, dict):
        raise DataError(path, "gold is not a JSON object", record=rec)
    for name in ("id", "output"):
        if g.get(name) is None:
            raise DataError(path, "missing field", record=rec, field=name)
    gid = as_text(g["id"], path, rec, "id")
    if gid in out:
        raise DataError(path, "duplicate gold id", record=f"{rec} (id={gid})", field="id")
    output = as_text(g["output"], path, rec, "output")
    out[gid] = output if keep_output else ""


def read_golds(path: Path, keep_outputs: bool = True) -> tuple[str | None, dict[str, str], dict]:
    """Read an outputs file: (task field, {question id: gold}, properlm's extra ``meta``).

    The golds are read one at a time. With ``keep_outputs=False`` every gold maps to
    ``""`` (the ids are all a summary needs).
    """
    src = str(path)
    out: dict[str, str] = {}
    task: Any = None
    meta: Any = {}
    golds_listed = False
    with JsonReader(path) as r:
        c = r.peek()
        if c == "[":  # a bare list of golds
            golds_listed = True
            for i, g in enumerate(r.array()):
                _add_gold(g, i, src, out, keep_outputs)
        elif c == "{":
            for key in r.keys():
                if key == "golds" and r.peek() == "[":
                    golds_listed, out = True, {}  # a repeated key: the last one counts, as in json.loads
                    for i, g in enumerate(r.array()):
                        _add_gold(g, i, src, out, keep_outputs)
                    continue
                value = r.value()
                if key == "golds":
                    golds_listed = False
                elif key == "task":
                    task = value
                elif key == "meta":
                    meta = value
        else:
            r.value()
        r.end()
    if not golds_listed:
        raise DataError(src, "expected {'task': ..., 'golds': [...]}", field="golds")
    return (str(task) if task is not None else None), out, meta if isinstance(meta, dict) else {}


def find_lamp_files(path: str | Path) -> tuple[Path, Path | None]:
    """Locate (questions, outputs) from a questions file or a directory holding one pair.

    In a directory the questions file is the one ``*questions*.json``; its outputs file is the
    same name with ``questions`` replaced by ``outputs`` (LaMP's ``dev_questions.json`` /
    ``dev_outputs.json``).
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*questions*.json"))
        if len(found) != 1:
            what = "no *questions*.json" if not found else f"several: {', '.join(p.name for p in found)}"
            raise DataError(str(path), f"expected one *questions*.json file, found {what}; pass the file")
        path = found[0]
    outputs = path.with_name(path.name.replace("questions", "outputs"))
    return path, (outputs if outputs != path and outputs.exists() else None)


def load_lamp(path: str | Path, task: str | None = None, outputs: str | Path | None = None) -> Dataset:
    """Load a LaMP questions file (and its outputs file, found beside it if not given).

    Args:
        path: the questions JSON, or a directory holding one ``*questions*.json``.
        task: the task name, needed when there is no outputs file (checked against it otherwise).
        outputs: the outputs JSON, if not the one beside the questions file.

    Returns:
        The dataset; history sorted by date when every item has one.

    Raises:
        DataError: malformed files, missing fields, duplicate question ids, golds that do not
            match the questions one to one.
    """
    qpath, found_outputs = find_lamp_files(path)
    opath = Path(outputs) if outputs is not None else found_outputs
    src = str(qpath)
    gold_task, golds, meta = read_golds(opath) if opath else (None, {}, {})
    the_task, questions = _sniff_task(gold_task, task, str(opath or qpath), _questions_of(qpath))

    users: dict[str, User] = {}
    seen_items: dict[str, set[str]] = {}
    seen_q: set[str] = set()
    for q, rec, qid, uid, items in _parse_questions(questions, the_task, src, seen_q):
        if uid not in users:
            users[uid] = _new_user(uid, q, src, rec)
            seen_items[uid] = set()
        add_unique(users[uid].history, seen_items[uid], items)
        users[uid].queries.append(Query(id=qid, input=as_text(q["input"], src, rec, "input"), gold=golds.get(qid)))
    del seen_items
    _check_golds(golds, seen_q, src, str(opath))
    for u in users.values():
        u.history = sort_history(u.history)
    user_list = list(users.values())
    extra = qpath.with_name(EXTRA_USERS_FILE)
    if extra.exists():
        _load_extra_users(extra, the_task, user_list)
    return Dataset(task=the_task.name, users=user_list, source=src, meta=meta)


def _questions_of(qpath: Path) -> Iterator[Any]:
    return iter_json_list(qpath, "a JSON list of questions")


def _parse_questions(questions: Iterable[Any], task: Task, src: str,
                     seen_q: set[str]) -> Iterator[tuple[dict, str, str, str, list[Item]]]:
    """Check each question; yield (raw question, record label, question id, user id, profile items).

    Adds every question id to ``seen_q`` (a repeated one is an error).
    """
    for i, q in enumerate(questions):
        rec = f"#{i}"
        if not isinstance(q, dict):
            raise DataError(src, "question is not a JSON object", record=rec)
        for name in ("id", "input", "profile"):
            if q.get(name) is None:
                raise DataError(src, "missing field", record=rec, field=name)
        qid = as_text(q["id"], src, rec, "id")
        rec = f"#{i} (id={qid})"
        if qid in seen_q:
            raise DataError(src, "duplicate question id", record=rec, field="id")
        seen_q.add(qid)
        if not isinstance(q["profile"], list):
            raise DataError(src, "expected a list of items", record=rec, field="profile")
        if not q["profile"]:
            raise DataError(src, "empty profile: a user needs history", record=rec, field="profile")
        items = [parse_item(p, task, src, f"{rec} profile[{j}]") for j, p in enumerate(q["profile"])]
        uid = as_text(q["user_id"], src, rec, "user_id") if q.get("user_id") is not None else qid
        yield q, rec, qid, uid, items


class _UserCount:
    """What :func:`scan_lamp` keeps per user."""

    __slots__ = ("items", "history", "group", "split", "empty_query")

    def __init__(self, user: User):
        self.items: set[str] = set()
        self.history = 0
        self.group = user.group
        self.split = user.meta.get("oppu_split")
        self.empty_query: str | None = None  # the first query with an empty input, for validate's message

    def add_items(self, items: list[Item]) -> None:
        for it in items:
            if it.id not in self.items:
                self.items.add(it.id)
                self.history += 1


def scan_lamp(path: str | Path, task: str | None = None, outputs: str | Path | None = None) -> Summary:
    """Summarize a LaMP questions file (and outputs) in one pass, as ``summarize(load_lamp(...))`` would.

    It checks everything :func:`load_lamp` and ``validate`` check, raising the same
    :class:`DataError`, but keeps only per-user counts, each user's item ids (to
    de-duplicate merged profiles as the loader does) and the question and gold ids.
    """
    qpath, found_outputs = find_lamp_files(path)
    opath = Path(outputs) if outputs is not None else found_outputs
    src = str(qpath)
    gold_task, golds, _ = read_golds(opath, keep_outputs=False) if opath else (None, {}, {})
    the_task, questions = _sniff_task(gold_task, task, str(opath or qpath), _questions_of(qpath))

    users: dict[str, _UserCount] = {}
    seen_q: set[str] = set()
    queries = with_gold = 0
    for q, rec, qid, uid, items in _parse_questions(questions, the_task, src, seen_q):
        if uid not in users:
            users[uid] = _UserCount(_new_user(uid, q, src, rec))
        u = users[uid]
        u.add_items(items)
        if not as_text(q["input"], src, rec, "input") and u.empty_query is None:
            u.empty_query = qid
        queries += 1
        with_gold += qid in golds
    _check_golds(golds, seen_q, src, str(opath))
    del seen_q, golds
    order = list(users)
    extra = qpath.with_name(EXTRA_USERS_FILE)
    if extra.exists():
        for index, uid, user, items in _parse_extra_users(extra, the_task, users.keys()):
            users[uid] = _UserCount(user)
            users[uid].add_items(items)
            order.insert(index if isinstance(index, int) else len(order), uid)
    if not order:
        raise DataError(src, "no users")
    for uid in order:  # what validate() would find first, in the loaded dataset's user order
        u = users[uid]
        u.items = set()
        if not u.history:
            raise DataError(src, "user has no history items", record=f"user_id={uid}", field="profile")
        if u.empty_query is not None:
            raise DataError(src, "empty query input", record=f"user_id={uid} query {u.empty_query}", field="input")
    us = [users[uid] for uid in order]
    return Summary(task=the_task.name, source=src, lengths=[u.history for u in us], queries=queries,
                   with_gold=with_gold, groups=[u.group for u in us if u.group is not None],
                   splits=[u.split for u in us if u.split is not None])


def _new_user(uid: str, raw: dict, path: str, rec: str) -> User:
    """A user from the first record naming them, with properlm's optional ``group``/``user_meta``."""
    group = raw.get("group")
    if group is not None and (not isinstance(group, int) or isinstance(group, bool)):
        raise DataError(path, "expected an integer group", record=rec, field="group")
    meta = raw.get("user_meta") or {}
    if not isinstance(meta, dict):
        raise DataError(path, "expected an object", record=rec, field="user_meta")
    return User(id=uid, group=group, meta={str(k): as_text(v, path, rec, "user_meta") for k, v in meta.items()})


def _check_golds(golds: dict[str, str], qids: set[str], qpath: str, opath: str) -> None:
    """Golds must pair with questions one to one (as LaMP's evaluator asserts); none at all is fine."""
    if not golds:
        return
    for gid in golds:
        if gid not in qids:
            raise DataError(opath, "gold id matches no question", record=f"id={gid}", field="id")
    for qid in qids:
        if qid not in golds:
            raise DataError(qpath, f"question has no gold in {Path(opath).name}", record=f"id={qid}", field="id")


def _parse_extra_users(path: Path, task: Task, known: Iterable[str]) -> Iterator[tuple[Any, str, User, list[Item]]]:
    """Check properlm's side file of users without queries; yield (index, user id, user, profile items)."""
    src = str(path)
    known = set(known)
    for i, raw in enumerate(iter_json_list(path, "a JSON list of users")):
        rec = f"#{i}"
        if not isinstance(raw, dict) or raw.get("user_id") is None or not isinstance(raw.get("profile"), list):
            raise DataError(src, "expected {'user_id', 'profile': [...], 'index'?}", record=rec, field="profile")
        uid = as_text(raw["user_id"], src, rec, "user_id")
        if uid in known:
            raise DataError(src, "duplicate user id", record=f"{rec} (user_id={uid})", field="user_id")
        known.add(uid)
        user = _new_user(uid, raw, src, rec)
        items = [parse_item(p, task, src, f"{rec} profile[{j}]") for j, p in enumerate(raw["profile"])]
        yield raw.get("index"), uid, user, items


def _load_extra_users(path: Path, task: Task, users: list[User]) -> None:
    """Insert properlm's side file of users that have history but no query at their ``index``."""
    for index, _, user, items in _parse_extra_users(path, task, [u.id for u in users]):
        add_unique(user.history, set(), items)
        user.history = sort_history(user.history)
        # Entries come in ascending index order, so inserting one by one restores the user order.
        users.insert(index if isinstance(index, int) else len(users), user)


def _item_json(item: Item) -> dict:
    out: dict[str, Any] = {"id": item.id, **item.fields}
    if item.date is not None:
        out["date"] = item.date
    return out


def _user_keys(user: User) -> dict:
    out: dict[str, Any] = {"user_id": user.id}
    if user.group is not None:
        out["group"] = user.group
    if user.meta:
        out["user_meta"] = dict(user.meta)
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _indented(text: str, prefix: str) -> str:
    return prefix + text.replace("\n", "\n" + prefix)


class LampWriter:
    """Write a dataset in LaMP's layout one user at a time, byte for byte as :func:`export_lamp` does.

    The files are written in a temporary directory beside ``out_dir`` and moved into
    ``out_dir`` by :meth:`close`, all at the end; :meth:`abort` (or an exception inside
    a ``with`` block) removes them and leaves ``out_dir`` untouched. Golds must be all
    present or all absent (the caller checks: LaMP's golds pair one to one).

    Args:
        out_dir: the directory to write (created if needed).
        task: the dataset's task.
        meta: the dataset's ``meta`` (written in ``outputs.json`` when not empty).
    """

    def __init__(self, out_dir: str | Path, task: Task, meta: dict | None = None):
        self.out = Path(out_dir)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent))
        self.meta = meta or {}
        self._questions = open(self.tmp / "questions.json", "w", encoding="utf-8")
        self._outputs = open(self.tmp / "outputs.json", "w", encoding="utf-8")
        self._extra = None
        self._n_questions = self._n_golds = 0
        self.paths: list[Path] = []
        self._questions.write("[")
        self._outputs.write("{\n  \"task\": " + json.dumps(task.lamp_id, ensure_ascii=False) + ",\n  \"golds\": ")

    def __enter__(self) -> "LampWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add(self, user: User, index: int) -> None:
        """Write ``user`` (at position ``index`` in the dataset's user order)."""
        profile = [_item_json(it) for it in user.history]
        keys = _user_keys(user)
        # json.dumps({"id", "input", "profile", **keys}) with the profile serialized once per user, not per query
        dumps = json.JSONEncoder(ensure_ascii=False).encode
        tail = "".join(f", {dumps(k)}: {dumps(v)}" for k, v in keys.items()) + "}"
        profile_text = dumps(profile) if user.queries else ""
        for q in user.queries:
            question = f'{{"id": {dumps(q.id)}, "input": {dumps(q.input)}, "profile": {profile_text}{tail}'
            self._questions.write(question if not self._n_questions else ", " + question)
            self._n_questions += 1
            if q.gold is not None:
                gold = _indented(json.dumps({"id": q.id, "output": q.gold}, indent=2, ensure_ascii=False), "    ")
                self._outputs.write(("[\n" if not self._n_golds else ",\n") + gold)
                self._n_golds += 1
        if not user.queries:
            entry = json.dumps({**keys, "index": index, "profile": profile}, ensure_ascii=False)
            if self._extra is None:
                self._extra = open(self.tmp / EXTRA_USERS_FILE, "w", encoding="utf-8")
                self._extra.write("[" + entry)
            else:
                self._extra.write(", " + entry)

    def close(self) -> list[Path]:
        """Finish the files and move them into ``out_dir``; returns the paths written."""
        try:
            self._questions.write("]\n")
            self._outputs.write("\n  ]" if self._n_golds else "[]")
            if self.meta:
                self._outputs.write(",\n  \"meta\": " + json.dumps(self.meta, indent=2, ensure_ascii=False)
                                    .replace("\n", "\n  "))
            self._outputs.write("\n}\n")
            if self._extra is not None:
                self._extra.write("]\n")
            names = ["questions.json", "outputs.json"] + ([EXTRA_USERS_FILE] if self._extra is not None else [])
            for f in (self._questions, self._outputs, self._extra):
                if f is not None:
                    f.flush()
                    os.fsync(f.fileno())  # the bytes are on disk before the names are
                    f.close()
                    os.chmod(f.name, 0o666 & ~io._UMASK)  # as properlm.io's atomic files
            self.out.mkdir(parents=True, exist_ok=True)
            stale = self.out / EXTRA_USERS_FILE
            if self._extra is None and stale.exists():
                stale.unlink()  # a previous export's side file would add users that are not in this dataset
            for name in names:
                os.replace(self.tmp / name, self.out / name)
            _fsync_dir(self.out)
        except BaseException:
            self.abort()
            raise
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.paths = [self.out / name for name in names]
        return self.paths

    def abort(self) -> None:
        """Drop what was written; ``out_dir`` is left as it was."""
        for f in (self._questions, self._outputs, self._extra):
            if f is not None:
                f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def export_lamp(dataset: Dataset, out_dir: str | Path) -> list[Path]:
    """Write ``dataset`` as ``questions.json`` + ``outputs.json`` in ``out_dir`` (atomically).

    Every query becomes a question carrying its user's full history as ``profile``, so
    plain LaMP readers see valid data; ``load_lamp(out_dir)`` gives back an equal dataset
    (users, task and meta; ``source`` differs). The files are written to a temporary
    directory first and moved into ``out_dir`` once all are complete, so a bad dataset
    leaves ``out_dir`` untouched.

    Args:
        dataset: the dataset to write.
        out_dir: the directory (created if needed).

    Returns:
        The paths written.

    Raises:
        DataError: some queries have golds and others not (LaMP's golds pair one to one).
    """
    task = get_task(dataset.task)
    missing = check_golds_all_or_none((q for u in dataset.users for q in u.queries), out_dir)
    if missing is not None:
        raise missing
    with LampWriter(out_dir, task, dataset.meta) as w:
        for index, u in enumerate(dataset.users):
            w.add(u, index)
    return w.paths


def partial_golds_error(out_dir: str | Path, query_id: str) -> DataError:
    """The error for a dataset some of whose queries have golds and others not."""
    return DataError(str(out_dir), "some queries have golds and some not; cannot write outputs.json",
                     record=f"id={query_id}", field="gold")


def check_golds_all_or_none(queries: Iterable[Query], out_dir: str | Path) -> DataError | None:
    """None when every query has a gold or none has; else the error naming the first without one."""
    queries = list(queries)
    with_gold = sum(q.gold is not None for q in queries)
    if 0 < with_gold < len(queries):
        return partial_golds_error(out_dir, next(q for q in queries if q.gold is None).id)
    return None
