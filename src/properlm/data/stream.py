"""Read large inputs without holding them whole: JSONL line by line, JSON arrays element by element.

* :func:`iter_lines` yields ``(line number, text)`` for each line of a UTF-8 file, read
  in binary and decoded one line at a time, so a bad byte is reported with its line.
* :class:`JsonReader` walks one JSON document incrementally: the top-level array (or
  an array under one key of a top-level object) is read one element at a time, each
  element decoded by the standard library's own scanner (``json.JSONDecoder.raw_decode``);
  only the element being decoded and one read chunk are in memory. Errors read like
  ``json.loads``'s: ``malformed JSON at line L column C: <json's message>``.

Both raise :class:`~properlm.errors.DataError` naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from properlm.errors import DataError

CHUNK = 1 << 20  # bytes read at a time
_WS = " \t\n\r"
# A decode error this close to the end of the buffer may be the buffer's end cutting a value
# short (a number, a literal, a \uXXXX\uXXXX escape); read more and decode again.
_NEAR_END = 16
_DECODER = json.JSONDecoder()


def _open(path: Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DataError(str(path), "file not found") from None
    except IsADirectoryError:
        raise DataError(str(path), "is a directory, expected a file") from None


def _utf8_error(path: Path, start: int, chunk: bytes, e: UnicodeDecodeError, lines_before: int) -> DataError:
    line = lines_before + chunk[: e.start].count(b"\n") + 1
    return DataError(str(path), f"not valid UTF-8 (byte {start + e.start}, line {line})")


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, line)`` for every line of a UTF-8 file (1-based, ``\\n``-separated).

    The line is decoded on its own, without its end of line (``\\n`` or ``\\r\\n``).

    Raises:
        DataError: a missing file, a directory, or bytes that are not UTF-8 (naming the
            byte offset and the line, like :func:`properlm.io.read_text`).
    """
    path = Path(path)
    offset = 0
    with _open(path) as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _utf8_error(path, offset, raw, e, n - 1) from None
            offset += len(raw)
            if text.endswith("\n"):
                text = text[:-2] if text.endswith("\r\n") else text[:-1]
            yield n, text


class JsonReader:
    """An incremental reader of one JSON document (see the module docstring).

    Use :meth:`peek` to see the next non-space character, :meth:`array` to iterate the
    elements of the array that starts there, :meth:`keys` to walk an object key by key
    (read or stream each value before asking for the next key), :meth:`value` for any
    one value, and :meth:`end` to check nothing follows the document. Use it as a
    context manager (or call :meth:`close`).
    """

    def __init__(self, path: str | os.PathLike, chunk: int | None = None):
        self.path = Path(path)
        self._f = _open(self.path)
        self._chunk = chunk or CHUNK
        self._buf = ""          # decoded text not yet consumed starts at self._pos
        self._pos = 0
        self._eof = False
        self._carry = b""       # the bytes of a UTF-8 sequence cut by the last read
        self._offset = 0        # bytes of the file decoded so far (for UTF-8 errors)
        self._lines = 0         # newlines in the decoded text dropped from the buffer
        self._col = 0           # characters after the last newline of that dropped text
        self._byte_lines = 0    # newlines in the bytes decoded so far (for UTF-8 errors)
        self._started = False

    def __enter__(self) -> "JsonReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    # -- buffer -------------------------------------------------------------------------

    def _fill(self, at_least: int = 0) -> bool:
        """Read at least one more chunk (``at_least`` more bytes); False at end of file."""
        if self._eof:
            return False
        if self._pos:  # drop consumed text, remembering where it ended (line, column)
            dropped = self._buf[: self._pos]
            nl = dropped.count("\n")
            if nl:
                self._lines += nl
                self._col = len(dropped) - dropped.rfind("\n") - 1
            else:
                self._col += len(dropped)
            self._buf, self._pos = self._buf[self._pos:], 0
        data = self._f.read(max(self._chunk, at_least))
        if not data:
            self._eof = True
            data, cut = self._carry, len(self._carry)
        else:
            data = self._carry + data
            cut = len(data)  # cut before a UTF-8 sequence the read may have split
            for back in range(1, min(4, len(data)) + 1):
                b = data[-back]
                if b < 0x80:
                    break
                if b >= 0xC0:  # a lead byte: keep its sequence for the next read
                    cut = len(data) - back
                    break
        part, self._carry = data[:cut], data[cut:]
        try:
            text = part.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _utf8_error(self.path, self._offset, part, e, self._byte_lines) from None
        self._offset += len(part)
        self._byte_lines += part.count(b"\n")
        self._buf += text
        return True

    def _where(self, pos: int) -> tuple[int, int]:
        """(line, column), 1-based as ``json`` counts them, of buffer position ``pos``."""
        nl = self._buf.count("\n", 0, pos)
        if nl:
            return self._lines + nl + 1, pos - self._buf.rfind("\n", 0, pos)
        return self._lines + 1, self._col + pos + 1

    def _error(self, msg: str, pos: int) -> DataError:
        line, col = self._where(pos)
        return DataError(str(self.path), f"malformed JSON at line {line} column {col}: {msg}")

    def _skip(self) -> str | None:
        """Move past whitespace; the next character, or None at the end of the document."""
        if not self._started:
            self._started = True
            while not self._buf and self._fill():
                pass
            if self._buf.startswith("\ufeff"):  # as json.loads says of a str
                raise self._error("Unexpected UTF-8 BOM (decode using utf-8-sig)", 0)
        while True:
            buf, pos = self._buf, self._pos
            while pos < len(buf) and buf[pos] in _WS:
                pos += 1
            self._pos = pos
            if pos < len(buf):
                return buf[pos]
            if not self._fill():
                return None

    # -- reading ------------------------------------------------------------------------

    def peek(self) -> str | None:
        """The next non-space character (not consumed), or None at the end of the file."""
        return self._skip()

    def value(self) -> Any:
        """Decode the next value (any JSON value) and move past it."""
        if self._skip() is None:
            raise self._error("Expecting value", self._pos)
        while True:
            try:
                obj, end = _DECODER.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as e:
                incomplete = e.msg.startswith("Unterminated string") or e.pos >= len(self._buf) - _NEAR_END
                if incomplete and self._fill(len(self._buf) - self._pos):
                    continue
                raise self._error(e.msg, e.pos) from None
            if end > len(self._buf) - _NEAR_END and self._fill(len(self._buf) - self._pos):
                continue  # a number near the buffer's end may go on ("12" of "12.5e3", "1" of "1.")
            self._pos = end
            return obj

    def _expect(self, ch: str, msg: str) -> None:
        if self._skip() != ch:
            raise self._error(msg, self._pos)
        self._pos += 1

    def array(self) -> Iterator[Any]:
        """Yield the elements of the array that starts at the next character."""
        self._expect("[", "Expecting '['")
        if self._skip() == "]":
            self._pos += 1
            return
        while True:
            yield self.value()
            c = self._skip()
            if c == "]":
                self._pos += 1
                return
            if c != ",":
                raise self._error("Expecting ',' delimiter", self._pos)
            self._pos += 1

    def keys(self) -> Iterator[str]:
        """Yield the keys of the object that starts at the next character.

        After each key the caller reads its value (:meth:`value`, :meth:`array`, ...)
        before asking for the next key.
        """
        self._expect("{", "Expecting '{'")
        if self._skip() == "}":
            self._pos += 1
            return
        while True:
            if self._skip() != '"':
                raise self._error("Expecting property name enclosed in double quotes", self._pos)
            key = self.value()
            self._expect(":", "Expecting ':' delimiter")
            yield key
            c = self._skip()
            if c == "}":
                self._pos += 1
                return
            if c != ",":
                raise self._error("Expecting ',' delimiter", self._pos)
            self._pos += 1

    def end(self) -> None:
        """Check that only whitespace follows the document."""
        if self._skip() is not None:
            raise self._error("Extra data", self._pos)
