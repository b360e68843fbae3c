"""Read OPPU's processed per-user layout (github.com/TamSiuhin/OPPU, ``data/<task_name>/``).

A directory holds:

* ``user_others.json``: the training users, a list of
  ``{"user_id", "profile": [items], "query": [{"id", "input", "gold"}]}``;
* ``user_top_100_history.json``: the 100 most active users, OPPU's test users, in
  the same form but usually without ``gold`` on their queries;
* ``user_top_100_history_label.json``: the test users' golds. OPPU's evaluator
  (``eval/evaluation.py``, ``single_gold_json_file_addr``) reads this file as LaMP's
  gold layout ``{"task": "LaMP_2M", "golds": [{"id", "output"}]}``; a bare list of
  ``{"id", "output"}`` is accepted too.

Every user is marked in ``User.meta["oppu_split"]`` as ``"train"`` or ``"test"``, which
``split_users(mode="oppu")`` then follows exactly. A user record without ``user_id``
is named ``oppu-<split>-<index>`` (assumption: OPPU's scripts address users by position).
The task comes from the label file's ``task`` field, ``task=``, or the directory name
(OPPU's names such as ``movie_tagging`` are task aliases).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from properlm import io
from properlm.data.lamp import as_text, add_unique, parse_item, read_golds, resolve_task, sort_history
from properlm.data.schema import Dataset, Query, User
from properlm.data.tasks import Task, is_known_task
from properlm.errors import DataError

TRAIN_FILE = "user_others.json"
TEST_FILE = "user_top_100_history.json"
LABEL_FILE = "user_top_100_history_label.json"


def is_oppu_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory in OPPU's layout."""
    path = Path(path)
    return path.is_dir() and ((path / TRAIN_FILE).exists() or (path / TEST_FILE).exists())


def load_oppu(path: str | Path, task: str | None = None) -> Dataset:
    """Load an OPPU task directory.

    Args:
        path: the directory (e.g. ``data/movie_tagging``).
        task: the task, when the label file does not name it (checked against it otherwise).

    Returns:
        Training users then test users, each marked in ``meta["oppu_split"]``.

    Raises:
        DataError: a missing or malformed file, missing fields, an empty profile, golds in the
            label file that do not match the test users' queries one to one.
    """
    root = Path(path)
    if not is_oppu_dir(root):
        raise DataError(str(root), f"not an OPPU directory: expected {TRAIN_FILE} and/or {TEST_FILE}")
    raw = {split: io.read_json(root / name) for split, name in (("train", TRAIN_FILE), ("test", TEST_FILE))
           if (root / name).exists()}
    label = root / LABEL_FILE
    gold_task, golds, _ = read_golds(label) if label.exists() else (None, {}, {})
    if task is None and gold_task is None and is_known_task(root.name):
        task = root.name  # OPPU names its directories after the task (movie_tagging, ...)
    first = next(iter(raw.values()))
    the_task = resolve_task(gold_task, task, str(label if label.exists() else root), _as_questions(first))

    users: list[User] = []
    for split, data in raw.items():
        users += _parse_users(data, split, str(root / (TRAIN_FILE if split == "train" else TEST_FILE)),
                              the_task, golds if split == "test" else {})
    test_qids = {q.id for u in users if u.meta["oppu_split"] == "test" for q in u.queries}
    for gid in golds:
        if gid not in test_qids:
            raise DataError(str(label), f"gold id matches no query in {TEST_FILE}", record=f"id={gid}", field="id")
    return Dataset(task=the_task.name, users=users, source=str(root))


def _as_questions(data: Any) -> list:
    """Users shaped like LaMP questions (``profile`` key), for resolving the plain ``LaMP_2`` task."""
    return data if isinstance(data, list) else []


def _parse_users(data: Any, split: str, src: str, task: Task, golds: dict[str, str]) -> list[User]:
    """Parse one OPPU user file; ``golds`` (test users) fill in queries without an inline gold."""
    if not isinstance(data, list):
        raise DataError(src, "expected a JSON list of users")
    users = []
    for i, raw in enumerate(data):
        rec = f"#{i}"
        if not isinstance(raw, dict):
            raise DataError(src, "user is not a JSON object", record=rec)
        uid = as_text(raw["user_id"], src, rec, "user_id") if raw.get("user_id") is not None else f"oppu-{split}-{i}"
        rec = f"#{i} (user_id={uid})"
        profile, queries = raw.get("profile"), raw.get("query")
        if not isinstance(profile, list):
            raise DataError(src, "missing or not a list", record=rec, field="profile")
        if not profile:
            raise DataError(src, "empty profile: a user needs history", record=rec, field="profile")
        if not isinstance(queries, list):
            raise DataError(src, "missing or not a list", record=rec, field="query")
        user = User(id=uid, meta={"oppu_split": split})
        add_unique(user.history, set(), [parse_item(p, task, src, f"{rec} profile[{j}]")
                                         for j, p in enumerate(profile)])
        user.history = sort_history(user.history)
        for j, q in enumerate(queries):
            qrec = f"{rec} query[{j}]"
            if not isinstance(q, dict):
                raise DataError(src, "query is not a JSON object", record=qrec)
            for name in ("id", "input"):
                if q.get(name) is None:
                    raise DataError(src, "missing field", record=qrec, field=name)
            qid = as_text(q["id"], src, qrec, "id")
            gold = as_text(q["gold"], src, qrec, "gold") if q.get("gold") is not None else golds.get(qid)
            if golds and gold is None:
                raise DataError(src, f"query has no gold in {LABEL_FILE}", record=f"{qrec} (id={qid})", field="id")
            user.queries.append(Query(id=qid, input=as_text(q["input"], src, qrec, "input"), gold=gold))
        users.append(user)
    return users
