"""One entry point for every input layout: ``load_dataset(path)`` finds the layout, loads, validates.

Layouts, as auto-detected:

* a directory with ``u.data``: movielens (100K layout);
* a directory with ``ratings.dat``: movielens (1M layout, with ``movies.dat``);
* a directory with ``ratings.csv`` and ``movies.csv``: movielens (CSV layout);
* a directory with ``user_others.json`` and/or ``user_top_100_history.json``: oppu;
* a directory with one ``*questions*.json``: lamp (its outputs file is the same name
  with ``questions`` replaced by ``outputs``);
* a ``.json`` file: lamp (a questions file); a ``.jsonl`` file: jsonl.

Every loader already names file, record and field on bad input; :func:`validate`
then checks what any dataset must satisfy, however it was built.

:func:`scan_dataset` (behind ``properlm data inspect``) and :func:`convert_dataset`
(behind ``properlm data convert``) take the same arguments and raise the same errors,
but stream JSONL logs (and, for the scan, LaMP files) instead of loading them.
"""

from __future__ import annotations

from pathlib import Path

from properlm.data.inspect import Summary, summarize
from properlm.data.jsonl import convert_jsonl, load_jsonl, scan_jsonl
from properlm.data.lamp import export_lamp, load_lamp, scan_lamp
from properlm.data.movielens import load_movielens, movielens_layout
from properlm.data.oppu import LABEL_FILE, TEST_FILE, TRAIN_FILE, is_oppu_dir, load_oppu
from properlm.data.schema import Dataset
from properlm.data.tasks import get_task, is_known_task
from properlm.errors import ConfigError, DataError

FORMATS = ("auto", "lamp", "oppu", "movielens", "jsonl")


def detect_format(path: str | Path) -> str:
    """Name the layout at ``path`` (one of ``FORMATS`` but ``auto``).

    Raises:
        DataError: the path does not exist or holds no known layout.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), "no such file or directory")
    if path.is_dir():
        if movielens_layout(path):
            return "movielens"
        if is_oppu_dir(path):
            return "oppu"
        if any(path.glob("*questions*.json")):
            return "lamp"
        raise DataError(str(path), "cannot tell the layout: expected u.data, ratings.dat, ratings.csv + movies.csv, "
                                   f"{TRAIN_FILE}, or a *questions*.json file")
    if path.name in (TRAIN_FILE, TEST_FILE, LABEL_FILE):
        return "oppu"
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix == ".json":
        return "lamp"
    raise DataError(str(path), "cannot tell the layout: expected a directory, a .json or a .jsonl file")


def _resolve(path: str | Path, task: str | None, fmt: str) -> tuple[Path, str]:
    """Check ``fmt`` and ``task`` (before reading anything); return the path to read and its format."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if task is not None:
        get_task(task)  # an unknown --task is a usage error, reported before reading anything
    path = Path(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "oppu" and path.is_file():
        path = path.parent
    if fmt in ("movielens", "jsonl") and task is not None and get_task(task).name != fmt:
        raise ConfigError(f"the {fmt} format is always task {fmt!r}, not {task!r}")
    return path, fmt


def load_dataset(path: str | Path, task: str | None = None, fmt: str = "auto", n_queries: int = 5) -> Dataset:
    """Load any supported layout into a validated :class:`Dataset`.

    Args:
        path: a file or directory (see the module docstring).
        task: the task name, for layouts that do not record it (LaMP questions without
            an outputs file); checked against the file when it does.
        fmt: ``"auto"`` or one of ``lamp``, ``oppu``, ``movielens``, ``jsonl``.
        n_queries: latest records per user held out as queries (movielens, jsonl).

    Returns:
        The dataset.

    Raises:
        DataError: bad input, naming file, record and field.
        ConfigError: an unknown ``fmt`` or ``task``.
    """
    path, fmt = _resolve(path, task, fmt)
    if fmt == "lamp":
        ds = load_lamp(path, task=task)
    elif fmt == "oppu":
        ds = load_oppu(path, task=task)
    elif fmt == "movielens":
        ds = load_movielens(path, n_queries=n_queries)
    else:
        ds = load_jsonl(path, n_queries)
    validate(ds)
    return ds


def scan_dataset(path: str | Path, task: str | None = None, fmt: str = "auto", n_queries: int = 5) -> Summary:
    """The :class:`~properlm.data.inspect.Summary` of ``load_dataset(...)``, streaming where it can.

    JSONL logs and LaMP files are checked and summarized in one pass without building
    the dataset (:func:`~properlm.data.jsonl.scan_jsonl`, :func:`~properlm.data.lamp.scan_lamp`);
    OPPU and MovieLens are loaded. Arguments and errors are those of :func:`load_dataset`.
    """
    resolved, kind = _resolve(path, task, fmt)
    if kind == "jsonl":
        return scan_jsonl(resolved, n_queries).summary()
    if kind == "lamp":
        return scan_lamp(resolved, task=task)
    return summarize(load_dataset(path, task=task, fmt=fmt, n_queries=n_queries))


def convert_dataset(path: str | Path, out_dir: str | Path, task: str | None = None, fmt: str = "auto",
                    n_queries: int = 5) -> tuple[str, int, list[Path]]:
    """Write any loadable dataset in LaMP's layout; returns (task, number of users, paths written).

    A JSONL log is converted in bounded memory (:func:`~properlm.data.jsonl.convert_jsonl`);
    other layouts are loaded and validated whole, then written (:func:`~properlm.data.lamp.export_lamp`).
    Either way a bad input is reported before anything is written, and ``out_dir`` then stays untouched.
    """
    resolved, kind = _resolve(path, task, fmt)
    if kind == "jsonl":
        n_users, written = convert_jsonl(resolved, out_dir, n_queries)
        return "jsonl", n_users, written
    ds = load_dataset(path, task=task, fmt=fmt, n_queries=n_queries)
    return ds.task, len(ds.users), export_lamp(ds, out_dir)


def validate(dataset: Dataset, path: str | Path | None = None) -> None:
    """Check what every dataset must satisfy.

    Checks: a known task; at least one user; unique user ids; every user has history;
    history items carry the task's fields and unique ids within their user; query ids
    unique across the dataset; non-empty query inputs.

    Args:
        dataset: the dataset.
        path: the file to name in errors (default: ``dataset.source``).

    Raises:
        DataError: the first violation, naming the file, the record (user or query id) and field.
    """
    src = str(path if path is not None else dataset.source)
    if not is_known_task(dataset.task):
        raise DataError(src, f"unknown task {dataset.task!r}", field="task")
    task = get_task(dataset.task)
    if not dataset.users:
        raise DataError(src, "no users")
    user_ids: set[str] = set()
    query_ids: set[str] = set()
    for i, user in enumerate(dataset.users):
        rec = f"user_id={user.id}"
        if user.id in user_ids:
            raise DataError(src, "duplicate user id", record=f"#{i} ({rec})", field="user_id")
        user_ids.add(user.id)
        if not user.history:
            raise DataError(src, "user has no history items", record=rec, field="profile")
        item_ids: set[str] = set()
        for item in user.history:
            if item.id in item_ids:
                raise DataError(src, "duplicate item id within the user", record=f"{rec} item {item.id}", field="id")
            item_ids.add(item.id)
            for name in task.item_fields:
                if item.fields.get(name) is None:
                    raise DataError(src, f"missing field required by {task.name}", record=f"{rec} item {item.id}",
                                    field=name)
        for q in user.queries:
            if q.id in query_ids:
                raise DataError(src, "duplicate query id", record=f"{rec} query {q.id}", field="id")
            query_ids.add(q.id)
            if not q.input:
                raise DataError(src, "empty query input", record=f"{rec} query {q.id}", field="input")
