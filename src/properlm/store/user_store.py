"""The user store: one bank of per-user tensors on disk, sharded for millions of users.

A bank (stage-3 LoRAs, stage-2 embeddings, an OPPU baseline's LoRAs) is a
directory::

    bank.json                         what a user holds: tensor names and shapes per part
    shards/3f/a2/index.json           user id -> parts (file, sha256, bytes), updated time
    shards/3f/a2/<h>.params.<sha12>.safetensors    one user's parameters
    shards/3f/a2/<h>.adamw.<sha12>.safetensors     the same user's AdamW moments (optional)

``<h>`` is the sha256 of the user id and ``3f/a2`` its first four hex digits,
so a million users spread over 65,536 leaf directories of ~15 users each and
no file or directory grows with the number of users. Finding, reading, writing
or deleting one user touches only that user's leaf directory; only listing
walks them all.

Writes are atomic per user: the new file is written under a temporary name,
fsynced and renamed (its name carries its checksum, so it never replaces a
file a reader may be holding), the directory is fsynced, then the leaf's
``index.json`` is replaced the same way under a lock, and only then is the old
file removed. A reader that follows the index therefore sees the user either
as before or as after, never half written. Every read checks the file's
sha256 against the index and refuses a file that does not match
(:class:`~properlm.errors.CorruptFile`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from properlm.errors import CorruptFile, ProperError, UnknownUser
from properlm.io import fsync_dir, sha256_file

FORMAT = "properlm-user-store"
VERSION = 1
PARTS = ("params", "adamw")


def user_hash(user_id: str) -> str:
    """The hex sha256 of a user id: the user's file names and shard."""
    return hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()


def _write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory: write, fsync, rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class UserStore:
    """Per-user tensors of one bank, on disk.

    Args:
        root: the bank's directory.
        schema: ``part -> {tensor name: per-user shape}``; needed to create a bank,
            checked against ``bank.json`` when given for an existing one.
        meta: free-form facts recorded in ``bank.json`` when it is created (rank, alpha ...).

    Raises:
        ProperError: ``root`` is not a bank and no schema was given to create it, or the
            given schema differs from the bank's.
    """

    def __init__(self, root: str | os.PathLike, schema: Mapping[str, Mapping[str, tuple[int, ...]]] | None = None,
                 meta: dict | None = None):
        self.root = Path(root)
        info = self.root / "bank.json"
        if info.exists():
            try:
                head = json.loads(info.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise CorruptFile(info, f"unreadable: {e}") from None
            if head.get("format") != FORMAT:
                raise ProperError(f"{info}: not a properlm user store")
            self.schema = {p: {k: tuple(v) for k, v in keys.items()} for p, keys in head["schema"].items()}
            self.meta = head.get("meta", {})
            if schema is not None and self._norm(schema) != self.schema:
                raise ProperError(f"{self.root}: the bank holds other tensors than this model's (bank.json schema differs)")
        elif schema is None:
            raise ProperError(f"{self.root}: no user store here (no bank.json)")
        else:
            self.schema, self.meta = self._norm(schema), dict(meta or {})
            self.root.mkdir(parents=True, exist_ok=True)
            body = {"format": FORMAT, "version": VERSION, "schema": self.schema, "meta": self.meta}
            _write_durable(info, (json.dumps(body, indent=1) + "\n").encode())
            fsync_dir(self.root)

    @staticmethod
    def _norm(schema: Mapping[str, Mapping[str, tuple[int, ...]]]) -> dict[str, dict[str, tuple[int, ...]]]:
        return {p: {k: tuple(int(d) for d in v) for k, v in sorted(keys.items())} for p, keys in schema.items()}

    @classmethod
    def exists(cls, root: str | os.PathLike) -> bool:
        return (Path(root) / "bank.json").exists()

    # -- layout ------------------------------------------------------------------------
    def shard(self, user_id: str) -> Path:
        """The leaf directory that holds ``user_id``."""
        h = user_hash(user_id)
        return self.root / "shards" / h[:2] / h[2:4]

    def _index(self, shard: Path) -> dict[str, dict]:
        path = shard / "index.json"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            index = json.loads(raw)
            if not isinstance(index, dict):
                raise ValueError("not a JSON object")
            return index
        except ValueError as e:
            raise CorruptFile(path, f"unreadable index: {e}") from None

    @contextlib.contextmanager
    def _locked(self, shard: Path) -> Iterator[None]:
        """Exclusive lock of one leaf (writers in other processes, e.g. other ranks, wait)."""
        shard.mkdir(parents=True, exist_ok=True)
        with open(shard / ".lock", "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # -- reading -----------------------------------------------------------------------
    def __contains__(self, user_id: object) -> bool:
        return isinstance(user_id, str) and user_id in self._index(self.shard(user_id))

    def entry(self, user_id: str) -> dict | None:
        """The index entry of a user (``{"parts": {part: {"file", "sha256", "bytes"}}, "updated"}``), or None."""
        return self._index(self.shard(user_id)).get(user_id)

    def get(self, user_id: str, parts: tuple[str, ...] = ("params",), device: torch.device | str = "cpu",
            missing_ok: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """One user's tensors, ``{part: {name: tensor}}``, read lazily from that user's files only.

        Each part's file is checked against its sha256 in the index before any of
        it is used. A part the user does not have is left out.

        Raises:
            UnknownUser: the user is not in the bank (unless ``missing_ok``: then ``{}``).
            CorruptFile: a file whose bytes do not match the index, or that does not parse.
        """
        shard = self.shard(user_id)
        for attempt in range(3):  # a concurrent writer may remove the file the index named
            entry = self._index(shard).get(user_id)
            if entry is None:
                if missing_ok:
                    return {}
                raise UnknownUser(user_id, f"in {self.root}")
            try:
                return {p: self._read_part(shard, entry["parts"][p], p, device) for p in parts if p in entry["parts"]}
            except FileNotFoundError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _read_part(self, shard: Path, part: dict, name: str, device) -> dict[str, torch.Tensor]:
        path = shard / part["file"]
        if sha256_file(path) != part["sha256"]:
            raise CorruptFile(path)
        want = self.schema.get(name, {})
        dev = torch.device(device)
        dev = "cpu" if dev.type == "cpu" else str(dev)
        try:
            with safe_open(str(path), framework="pt", device=dev) as f:
                keys = set(f.keys())
                if want and keys != set(want):
                    raise CorruptFile(path, "tensor names differ from the bank's schema")
                return {k: f.get_tensor(k) for k in sorted(keys)}
        except SafetensorError as e:  # a header that does not parse
            raise CorruptFile(path, f"not a safetensors file: {str(e).splitlines()[0]}") from None

    def users(self) -> Iterator[str]:
        """Every user id in the bank (a listing: walks all leaves)."""
        top = self.root / "shards"
        if not top.is_dir():
            return
        for a in sorted(os.scandir(top), key=lambda e: e.name):
            if not a.is_dir():
                continue
            for b in sorted(os.scandir(a.path), key=lambda e: e.name):
                if b.is_dir():
                    yield from sorted(self._index(Path(b.path)))

    def __len__(self) -> int:
        return sum(1 for _ in self.users())

    # -- writing -----------------------------------------------------------------------
    def put(self, user_id: str, parts: Mapping[str, Mapping[str, torch.Tensor]]) -> dict:
        """Write one user (exactly these parts: a part left out is dropped); returns the index entry."""
        return self.put_many({user_id: parts})[user_id]

    def put_many(self, users: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]]) -> dict[str, dict]:
        """Write several users; each one atomically, with one index update per leaf directory.

        Args:
            users: ``user id -> {part: {name: tensor}}``; a user's entry afterwards holds
                exactly the parts given.

        Raises:
            ProperError: a part or tensor that is not in the bank's schema.
        """
        by_shard: dict[Path, list[str]] = {}
        for u in users:
            by_shard.setdefault(self.shard(u), []).append(u)
        written = {}
        for shard, ids in by_shard.items():
            shard.mkdir(parents=True, exist_ok=True)
            new = {u: self._write_parts(shard, u, users[u]) for u in ids}
            fsync_dir(shard)  # the new files' names are durable before the index points at them
            with self._locked(shard):
                index = self._index(shard)
                old = {u: index.get(u) for u in ids}
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                for u in ids:
                    index[u] = {"parts": new[u], "updated": stamp}
                self._write_index(shard, index)
                for u in ids:  # the old files are unreachable now
                    keep = {p["file"] for p in new[u].values()}
                    for p in (old[u] or {}).get("parts", {}).values():
                        if p["file"] not in keep:
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(shard / p["file"])
                    written[u] = index[u]
        return written

    def _write_parts(self, shard: Path, user_id: str, parts: Mapping[str, Mapping[str, torch.Tensor]]) -> dict:
        h = user_hash(user_id)
        out = {}
        for part, tensors in parts.items():
            want = self.schema.get(part)
            if want is None:
                raise ProperError(f"{self.root}: no part {part!r} in this bank (has {', '.join(self.schema)})")
            if set(tensors) != set(want):
                extra = sorted(set(tensors) ^ set(want))[:3]
                raise ProperError(f"{self.root}: user {user_id!r} part {part!r}: tensors differ from the schema: {extra}")
            data = save({k: t.detach().to("cpu").contiguous() for k, t in sorted(tensors.items())})
            sha = hashlib.sha256(data).hexdigest()
            name = f"{h}.{part}.{sha[:12]}.safetensors"
            _write_durable(shard / name, data)
            out[part] = {"file": name, "sha256": sha, "bytes": len(data)}
        return out

    def _write_index(self, shard: Path, index: dict) -> None:
        if index:
            _write_durable(shard / "index.json", (json.dumps(index, sort_keys=True, indent=0) + "\n").encode())
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(shard / "index.json")
        fsync_dir(shard)

    def drop_part(self, user_id: str, part: str) -> bool:
        """Remove one part of a user (e.g. the AdamW moments once training is over); whether it was there."""
        shard = self.shard(user_id)
        with self._locked(shard):
            index = self._index(shard)
            entry = index.get(user_id)
            if entry is None or part not in entry["parts"]:
                return False
            gone = entry["parts"].pop(part)
            self._write_index(shard, index)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(shard / gone["file"])
        return True

    def delete(self, user_id: str) -> bool:
        """Remove everything of a user from the bank: index entry, files, stray temporaries. Whether it was there."""
        shard = self.shard(user_id)
        if not shard.is_dir():
            return False
        h = user_hash(user_id)
        with self._locked(shard):
            index = self._index(shard)
            found = index.pop(user_id, None) is not None
            if found:
                self._write_index(shard, index)
            # Files of an interrupted write are not in the index: remove them by name too, and
            # temporary copies of the index (written only under this lock: none is in progress).
            for f in os.scandir(shard):
                stray_index = f.name.startswith(".index.json.") and f.name.endswith(".tmp")
                mine = f.name.startswith(h) or f.name.startswith(f".{h}")
                if mine or stray_index:
                    os.unlink(f.path)
                    found = found or mine
            fsync_dir(shard)
        return found

    def user_bytes(self, part: str = "params") -> int:
        """Bytes of one user's ``part`` in memory (float32), from the schema."""
        return sum(4 * _numel(s) for s in self.schema.get(part, {}).values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
