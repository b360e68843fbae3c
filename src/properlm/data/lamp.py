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
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from properlm import io
from properlm.data.schema import Dataset, Item, Query, User
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


def resolve_task(from_file: str | None, given: str | None, path: str, questions: list) -> Task:
    """Pick the task: the golds' ``task`` field, checked against ``task=``, else ``task=``, else the path.

    LaMP's plain ``LaMP_2`` is resolved from the profile fields (tag -> 2M, category -> 2N).
    """
    name = from_file or given or task_from_path(path)
    if name is None:
        raise DataError(path, "cannot tell the task: no outputs file with a 'task' field; pass task= (--task)",
                        field="task")
    if re.fullmatch(r"lamp[\s_\-]?2", str(name), flags=re.IGNORECASE):
        first = next((p for q in questions if isinstance(q, dict) for p in q.get("profile") or []), {})
        name = "LaMP-2M" if isinstance(first, dict) and "tag" in first else "LaMP-2N"
    try:
        task = get_task(name)
    except ConfigError as e:  # a task named by the file is a data problem; name the file
        raise DataError(path, str(e), field="task") from None
    if from_file and given and get_task(given) != task:
        raise DataError(path, f"task {given!r} given but the outputs file says {from_file!r}", field="task")
    return task


def read_golds(path: Path) -> tuple[str | None, dict[str, str], dict]:
    """Read an outputs file: (task field, {question id: gold}, properlm's extra ``meta``)."""
    data = io.read_json(path)
    golds = data.get("golds") if isinstance(data, dict) else data
    if not isinstance(golds, list):
        raise DataError(str(path), "expected {'task': ..., 'golds': [...]}", field="golds")
    out: dict[str, str] = {}
    for i, g in enumerate(golds):
        rec = f"golds[{i}]"
        if not isinstance(g, dict):
            raise DataError(str(path), "gold is not a JSON object", record=rec)
        for name in ("id", "output"):
            if g.get(name) is None:
                raise DataError(str(path), "missing field", record=rec, field=name)
        gid = as_text(g["id"], str(path), rec, "id")
        if gid in out:
            raise DataError(str(path), "duplicate gold id", record=f"{rec} (id={gid})", field="id")
        out[gid] = as_text(g["output"], str(path), rec, "output")
    task = data.get("task") if isinstance(data, dict) else None
    meta = data.get("meta", {}) if isinstance(data, dict) else {}
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
    qs, src = io.read_json(qpath), str(qpath)
    if not isinstance(qs, list):
        raise DataError(src, "expected a JSON list of questions")
    gold_task, golds, meta = read_golds(opath) if opath else (None, {}, {})
    the_task = resolve_task(gold_task, task, str(opath or qpath), qs)

    users: dict[str, User] = {}
    seen_items: dict[str, set[str]] = {}
    seen_q: set[str] = set()
    for i, q in enumerate(qs):
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
        items = [parse_item(p, the_task, src, f"{rec} profile[{j}]") for j, p in enumerate(q["profile"])]
        uid = as_text(q["user_id"], src, rec, "user_id") if q.get("user_id") is not None else qid
        if uid not in users:
            users[uid] = _new_user(uid, q, src, rec)
            seen_items[uid] = set()
        add_unique(users[uid].history, seen_items[uid], items)
        users[uid].queries.append(Query(id=qid, input=as_text(q["input"], src, rec, "input"), gold=golds.get(qid)))
    _check_golds(golds, seen_q, src, str(opath))
    for u in users.values():
        u.history = sort_history(u.history)
    user_list = list(users.values())
    extra = qpath.with_name(EXTRA_USERS_FILE)
    if extra.exists():
        _load_extra_users(extra, the_task, user_list)
    return Dataset(task=the_task.name, users=user_list, source=src, meta=meta)


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


def _load_extra_users(path: Path, task: Task, users: list[User]) -> None:
    """Insert properlm's side file of users that have history but no query at their ``index``."""
    data, src = io.read_json(path), str(path)
    if not isinstance(data, list):
        raise DataError(src, "expected a JSON list of users")
    known = {u.id for u in users}
    for i, raw in enumerate(data):
        rec = f"#{i}"
        if not isinstance(raw, dict) or raw.get("user_id") is None or not isinstance(raw.get("profile"), list):
            raise DataError(src, "expected {'user_id', 'profile': [...], 'index'?}", record=rec, field="profile")
        uid = as_text(raw["user_id"], src, rec, "user_id")
        if uid in known:
            raise DataError(src, "duplicate user id", record=f"{rec} (user_id={uid})", field="user_id")
        known.add(uid)
        user = _new_user(uid, raw, src, rec)
        add_unique(user.history, set(), [parse_item(p, task, src, f"{rec} profile[{j}]")
                                         for j, p in enumerate(raw["profile"])])
        user.history = sort_history(user.history)
        index = raw.get("index")
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


def export_lamp(dataset: Dataset, out_dir: str | Path) -> list[Path]:
    """Write ``dataset`` as ``questions.json`` + ``outputs.json`` in ``out_dir`` (atomically).

    Every query becomes a question carrying its user's full history as ``profile``, so
    plain LaMP readers see valid data; ``load_lamp(out_dir)`` gives back an equal dataset
    (users, task and meta; ``source`` differs). Everything is serialized before the first
    write, so a bad dataset leaves ``out_dir`` untouched.

    Args:
        dataset: the dataset to write.
        out_dir: the directory (created if needed).

    Returns:
        The paths written.

    Raises:
        DataError: some queries have golds and others not (LaMP's golds pair one to one).
    """
    task = get_task(dataset.task)
    queries = [q for u in dataset.users for q in u.queries]
    with_gold = sum(q.gold is not None for q in queries)
    if 0 < with_gold < len(queries):
        missing = next(q for q in queries if q.gold is None)
        raise DataError(str(out_dir), "some queries have golds and some not; cannot write outputs.json",
                        record=f"id={missing.id}", field="gold")
    questions, extra = [], []
    for index, u in enumerate(dataset.users):
        profile = [_item_json(it) for it in u.history]
        for q in u.queries:
            questions.append({"id": q.id, "input": q.input, "profile": profile, **_user_keys(u)})
        if not u.queries:
            extra.append({**_user_keys(u), "index": index, "profile": profile})
    outputs: dict[str, Any] = {"task": task.lamp_id, "golds": [{"id": q.id, "output": q.gold} for q in queries
                                                                if q.gold is not None]}
    if dataset.meta:
        outputs["meta"] = dataset.meta
    # Serialize all first (json errors surface before anything is written); compact questions
    # because every question repeats its user's profile.
    texts = {"questions.json": json.dumps(questions, ensure_ascii=False) + "\n",
             "outputs.json": json.dumps(outputs, indent=2, ensure_ascii=False) + "\n"}
    if extra:
        texts[EXTRA_USERS_FILE] = json.dumps(extra, ensure_ascii=False) + "\n"
    out = Path(out_dir)
    stale = out / EXTRA_USERS_FILE
    if not extra and stale.exists():
        stale.unlink()  # a previous export's side file would add users that are not in this dataset
    for name, text in texts.items():
        io.write_text(out / name, text)
    return [out / name for name in texts]
