"""Errors that reach the user as one line naming the file, record and field."""

from __future__ import annotations


class ProperError(Exception):
    """Base class for errors the CLI prints as one line and exits 2 on."""


class DataError(ProperError):
    """Bad input data: names the file, the record and the field at fault.

    Args:
        path: the file (or directory) being read.
        message: what is wrong, in a few words.
        record: which record (an index like ``#3`` or an id like ``id=310``), if known.
        field: which field of the record, if known.
    """

    def __init__(self, path: str, message: str, record: str | None = None, field: str | None = None):
        self.path, self.message, self.record, self.field = str(path), message, record, field
        where = self.path
        if record is not None:
            where += f": record {record}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")


class ConfigError(ProperError):
    """A bad configuration value or override (names the key)."""


class ModelError(ProperError):
    """A base model that cannot be found or loaded (says how to get it)."""


class UnknownUser(ProperError, KeyError):
    """A user id with no personalized adapter where one was asked for (names the id).

    Raised instead of silently answering with the non-personalized model: a
    mistyped id must not look like a personalized answer. Callers that want the
    non-personalized model for such ids ask for it explicitly (``fallback=True``).
    """

    def __init__(self, user_id: str, where: str = ""):
        self.user_id = user_id
        msg = f"unknown user {user_id!r}: no personalized adapter"
        super().__init__(msg + (f" {where}" if where else ""))

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class CorruptFile(ProperError):
    """A file whose bytes do not match their recorded checksum (or do not parse); never loaded."""

    def __init__(self, path, why: str = "checksum mismatch"):
        self.path = str(path)
        super().__init__(f"{path}: corrupt file ({why}); refusing to load it")
