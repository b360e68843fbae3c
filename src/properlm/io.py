"""Atomic file writes and strict JSON reading.

Every file properlm writes goes to a temporary file in the same directory,
is flushed to disk (fsync) and renamed into place, and the directory is
fsynced, so neither an interrupted run nor a power cut leaves a half-written
file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from properlm.errors import DataError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a written file gets the usual mode
    try:
        yield Path(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's bytes to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def read_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 file, raising :class:`DataError` on a missing file or bad bytes."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(str(path), "file not found") from None
    except IsADirectoryError:
        raise DataError(str(path), "is a directory, expected a file") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(str(path), f"not valid UTF-8 (byte {e.start}, line {line})") from None


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file, raising :class:`DataError` with the line on malformed input."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(str(path), f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


SUMS = "SHA256SUMS.json"


def sha256_file(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_dir(path: str | os.PathLike) -> None:
    """Check every file listed in a directory's ``SHA256SUMS.json`` (written by ``atomic_dir(checksums=True)``).

    Raises:
        CorruptFile: a listed file missing, or whose bytes differ from its checksum (naming it).
    """
    from properlm.errors import CorruptFile

    path = Path(path)
    sums = path / SUMS
    if not sums.exists():
        return  # written before checksums were kept
    try:
        listed = json.loads(sums.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CorruptFile(sums, f"unreadable: {e}") from None
    for name, want in listed.items():
        f = path / name
        if not f.exists():
            raise CorruptFile(f, "missing")
        if sha256_file(f) != want:
            raise CorruptFile(f)


@contextmanager
def atomic_dir(path: str | os.PathLike, checksums: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; it replaces ``path`` on success.

    The old directory is renamed aside first, the new one renamed in, and only
    then is the old one deleted: at every moment either the old or the new
    directory is complete under some name, and an interruption between the two
    renames is repaired by :func:`recover_dir` (``path`` missing, its aside copy
    present). With ``checksums``, the sha256 of every file is written to
    ``SHA256SUMS.json`` inside it, for :func:`verify_dir`.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        files = sorted(f for f in tmp.rglob("*") if f.is_file())
        if checksums:
            sums = {str(f.relative_to(tmp)): sha256_file(f) for f in files}
            (tmp / SUMS).write_text(json.dumps(sums, indent=1) + "\n", encoding="utf-8")
            files.append(tmp / SUMS)
        for f in files:
            fsync_file(f)
        aside = _aside(path)
        if path.exists():
            os.replace(path, aside)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _aside(path: Path) -> Path:
    return path.parent / f".{path.name}.old"


def recover_dir(path: str | os.PathLike) -> None:
    """Finish an :func:`atomic_dir` swap that was interrupted between its two renames.

    If ``path`` is missing but its aside copy exists, the aside copy (the old,
    complete directory) is put back; if both exist, the aside copy is stale and
    removed.
    """
    import shutil

    path = Path(path)
    aside = _aside(path)
    if aside.exists():
        if path.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, path)
