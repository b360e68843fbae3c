"""Checking a run directory's files: ``properlm store verify --run DIR [--repair]``.

What :func:`verify_run` checks, one pass over the run, reading file bytes to
hash them (no tensor is loaded, and a user bank is walked one leaf directory at
a time, so memory does not grow with the number of users):

- stage files (``population/``, ``group/``, ``user/``) against their stage's
  ``SHA256SUMS.json``, and files a stage holds that its list does not name;
- checkpoint files (``step-*/`` under ``checkpoints/`` and ``baselines/``)
  against the sha256 their ``step.json`` records;
- every user bank (``store/<bank>/``): each index entry's files for presence,
  size and sha256 against the leaf's ``index.json``; entries in a leaf their
  id does not hash to; user files no index entry names (orphans);
- files that are not part of the run's layout (strays), temporary files and
  directories of atomic writes that were killed, old copies of directories a
  killed swap left, and users deletes that were interrupted.

Each problem names a file. User ids are never printed: a store file's name
carries the sha256 of the id, not the id.

``repair=True`` removes only what is provably garbage, and says so for each:

- temporary files and directories of killed atomic writes, once nothing has
  modified them for ``min_age`` seconds (a live write renames its temporary file
  within moments); a leaf's temporary copies of its ``index.json`` at once,
  under the leaf's lock (index writes hold it);
- the old copy of a directory whose swap was killed after the new copy was in
  place (what :func:`properlm.io.recover_dir` removes too);
- a leftover scratch copy of an upload in ``serve/tmp/`` (older than ``min_age``);
- orphan user files: files no entry of their leaf's readable ``index.json``
  names (the only index that can name them), older than ``min_age``, checked
  again under the leaf's lock before each removal.

It never removes a stage file, a checkpoint file, a file an index names, a
stray, the only copy of a directory whose swap was killed, a user file in a leaf
whose ``index.json`` is missing (it may be a user's data whose index was lost),
or anything in a leaf whose ``index.json`` or bank whose ``bank.json`` does not parse.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from properlm.errors import ProperError
from properlm.io import SUMS, fsync_dir, sha256_file
from properlm.store.run import STAGES, is_run
from properlm.store.user_store import UserStore, user_hash

#: Seconds a temporary or orphan file must have been left untouched before ``repair`` removes it.
DEFAULT_MIN_AGE = 600.0

#: What a run directory holds at its top level (besides temporary files).
TOP_FILES = frozenset({"config.yaml", "split.json", "manifest.json"})
TOP_DIRS = frozenset({*STAGES, "store", "logs", "checkpoints", "baselines", "eval", "report", "serve", "forgetting"})

_HEX2 = re.compile(r"^[0-9a-f]{2}$")
_USER_FILE = re.compile(r"^([0-9a-f]{64})\.[A-Za-z0-9_-]+\.[0-9a-f]{12}\.safetensors$")
_STEP = re.compile(r"^step-\d+$")
#: ``atomic_dir``'s temporary directory (``tempfile.mkdtemp(prefix=".<name>.")``) and its aside copy.
_TMP_DIR = re.compile(r"^\.(population|group|user|step-\d+)\.[a-z0-9_]{8}$")
_ASIDE = re.compile(r"^\.(population|group|user|step-\d+)\.old$")


def _is_tmp_file(name: str) -> bool:
    """``atomic_path`` and the store's writes use ``mkstemp(prefix=".<name>.", suffix=".tmp")``."""
    return name.startswith(".") and name.endswith(".tmp")


def _sha256(path: Path) -> str | None:
    """The file's sha256, or None when it is not there (or not a file)."""
    try:
        return sha256_file(path) if path.is_file() else None
    except FileNotFoundError:
        return None


def _well_formed(part: object) -> bool:
    """An index entry's part: ``{"file": a name in the leaf, "sha256": str, "bytes": int}``."""
    return (isinstance(part, dict) and isinstance(part.get("file"), str) and isinstance(part.get("sha256"), str)
            and isinstance(part.get("bytes"), int) and part["file"] not in ("", ".", "..") and "/" not in part["file"])


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def _rmtree(path: Path) -> bool:
    shutil.rmtree(path)
    return True


@dataclass
class Problem:
    """One thing wrong in a run directory.

    ``kind`` is one of ``corrupt``, ``wrong size``, ``missing``, ``orphan``, ``stray``,
    ``temporary``, ``misplaced``, ``unchecked``, ``interrupted``; ``removed`` is true when
    ``repair`` removed it.
    """

    path: Path
    kind: str
    detail: str
    removed: bool = False

    def line(self) -> str:
        return f"{'removed ' if self.removed else ''}{self.path}: {self.kind}: {self.detail}"


@dataclass
class Verification:
    """What :func:`verify_run` checked and found."""

    run_dir: Path
    repair: bool = False
    stage_files: int = 0
    checkpoint_files: int = 0
    users: int = 0  #: index entries, summed over the banks (a user in two banks counts twice)
    shards: int = 0  #: leaf directories
    banks: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def left(self) -> list[Problem]:
        """The problems that are still there (not removed by ``repair``)."""
        return [p for p in self.problems if not p.removed]

    @property
    def ok(self) -> bool:
        return not self.left

    def summary(self) -> str:
        n = len(self.problems)
        s = (f"checked {_n(self.stage_files, 'stage file')}, {_n(self.checkpoint_files, 'checkpoint file')}, "
             f"{_n(self.users, 'user')} in {_n(self.shards, 'shard')} of {_n(self.banks, 'bank')}: {_n(n, 'problem')}")
        if self.repair:
            s += f" ({n - len(self.left)} removed, {len(self.left)} left)"
        return s


def verify_run(run_dir: str | Path, repair: bool = False, min_age: float = DEFAULT_MIN_AGE,
               on_problem: Callable[[Problem], None] | None = None) -> Verification:
    """Check every file of a run directory (see the module's doc); with ``repair``, remove what is garbage.

    Args:
        run_dir: the run directory.
        repair: remove what is provably garbage (each such problem comes back with ``removed``).
        min_age: seconds a temporary or orphan file must have gone unmodified before it is removed.
        on_problem: called with each problem as it is found (the CLI prints it).

    Raises:
        ProperError: ``run_dir`` is not a run directory.
    """
    run_dir = Path(run_dir)
    if not is_run(run_dir):
        raise ProperError(f"{run_dir}: not a properlm run directory (no config.yaml)")
    v = _Verifier(run_dir, repair, min_age, on_problem)
    v.run()
    return v.result


class _Verifier:
    def __init__(self, run_dir: Path, repair: bool, min_age: float, on_problem):
        self.run_dir, self.repair, self.min_age, self.on_problem = run_dir, repair, min_age, on_problem
        self.result = Verification(run_dir, repair)

    # -- reporting and removing ------------------------------------------------------------
    def found(self, path: Path, kind: str, detail: str, remove: Callable[[], bool] | None = None) -> None:
        p = Problem(path, kind, detail)
        if self.repair and remove is not None:
            try:
                p.removed = bool(remove())
                if not p.removed:
                    p.detail += " (not removed: it changed while it was checked)"
            except OSError as e:
                p.detail += f" (could not remove it: {e.strerror or e})"
        self.result.problems.append(p)
        if self.on_problem is not None:
            self.on_problem(p)

    def age(self, path: Path) -> float:
        """Seconds since anything in ``path`` (a file, or a directory and everything under it) was modified."""
        try:
            newest = path.lstat().st_mtime
            if path.is_dir() and not path.is_symlink():
                for d, dirs, files in os.walk(path):
                    for n in dirs + files:
                        try:
                            newest = max(newest, os.lstat(os.path.join(d, n)).st_mtime)
                        except FileNotFoundError:
                            pass
        except FileNotFoundError:
            return float("inf")
        return max(0.0, time.time() - newest)

    def old_enough(self, path: Path) -> tuple[bool, str]:
        """Whether ``path`` is past ``min_age``, and what to add to the problem's detail when it is not."""
        a = self.age(path)
        if a >= self.min_age:
            return True, ""
        return False, (f"; modified {a:.0f} s ago, a write may be in progress "
                       f"(--repair removes it once untouched for {self.min_age:.0f} s)")

    def temporary(self, path: Path, what: str) -> None:
        """A temporary file or directory: removed by ``repair`` once untouched for ``min_age``."""
        ok, note = self.old_enough(path)

        def remove() -> bool:
            if not self.old_enough(path)[0]:
                return False
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            return True

        self.found(path, "temporary", what + note, remove if ok else None)

    def stray(self, path: Path, what: str = "not part of a run directory's layout") -> None:
        self.found(path, "stray", what + " (not removed)")

    def aside(self, path: Path) -> None:
        """``.<name>.old``: the old copy of a directory an ``atomic_dir`` swap renamed aside."""
        target = path.parent / path.name[1:-len(".old")]
        if target.exists():
            self.found(path, "temporary", f"the replaced copy of {target.name}/ that a killed swap left",
                       lambda: _rmtree(path))
        else:
            self.found(path, "interrupted", f"a swap of {target.name}/ was killed: this is its last complete copy, "
                       "which the next training or load of the run puts back (not removed)")

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> None:
        for e in sorted(os.scandir(self.run_dir), key=lambda e: e.name):
            p = Path(e.path)
            is_dir = e.is_dir(follow_symlinks=False)
            if is_dir and e.name in STAGES:
                self.stage(p)
            elif is_dir and e.name == "store":
                self.store(p)
            elif is_dir and e.name in TOP_DIRS:
                self.tree(p)
            elif not is_dir and e.name in TOP_FILES:
                pass
            elif is_dir and _TMP_DIR.match(e.name):
                self.temporary(p, f"the temporary directory of a killed write of {e.name[1:].split('.')[0]}/")
            elif is_dir and _ASIDE.match(e.name):
                self.aside(p)
            elif not is_dir and _is_tmp_file(e.name):
                self.temporary(p, "the temporary file of a killed write")
            else:
                self.stray(p)

    def stage(self, d: Path) -> None:
        """A stage directory: every file against ``SHA256SUMS.json``; files it does not list are strays."""
        sums = d / SUMS
        if not sums.exists():
            self.found(d, "unchecked", f"no {SUMS}: the stage's files cannot be checked")
            return
        try:
            listed = json.loads(sums.read_text(encoding="utf-8"))
            if not isinstance(listed, dict) or not all(isinstance(x, str) for x in listed.values()):
                raise ValueError("not a JSON object of file -> sha256")
        except (OSError, ValueError) as e:
            self.found(sums, "corrupt", f"unreadable checksum list ({' '.join(str(e).split())})")
            return
        self.result.stage_files += self.listed_files(d, SUMS, listed, "stage")

    def checkpoint(self, d: Path) -> None:
        """A checkpoint ``step-*/``: its files against the sha256 in ``step.json``."""
        info = d / "step.json"
        try:
            sums = json.loads(info.read_text(encoding="utf-8")).get("sha256", {})
            if not isinstance(sums, dict):
                raise ValueError("'sha256' is not an object")
        except FileNotFoundError:
            self.found(info, "missing", "a checkpoint without its step.json")
            return
        except (OSError, ValueError, AttributeError) as e:
            self.found(info, "corrupt", f"unreadable ({' '.join(str(e).split())})")
            return
        self.result.checkpoint_files += self.listed_files(d, "step.json", sums, "checkpoint")

    def listed_files(self, d: Path, listing: str, sums: dict, what: str) -> int:
        """Each file ``sums`` lists (name -> sha256) against its bytes; files of ``d`` it does not list
        are strays. Returns how many files were listed."""
        for name, want in sums.items():
            f = d / name
            got = _sha256(f)
            if got is None:
                self.found(f, "missing", f"listed in {listing}")
            elif got != want:
                self.found(f, "corrupt", f"its sha256 differs from {listing}")
        for f in sorted(d.rglob("*")):
            rel = f.relative_to(d).as_posix()
            if f.is_file() and rel != listing and rel not in sums:
                self.stray(f, f"a file of the {what} that {listing} does not list")
        return len(sums)

    def tree(self, top: Path) -> None:
        """logs/, checkpoints/, baselines/, eval/, report/, serve/, forgetting/: checkpoints, temporaries, intents."""
        for d, dirnames, filenames in os.walk(top):
            here = Path(d)
            parts = here.relative_to(self.run_dir).parts
            keep = []
            for n in sorted(dirnames):
                p = here / n
                if "checkpoints" in parts and _STEP.match(n) and not p.is_symlink():
                    self.checkpoint(p)
                elif _TMP_DIR.match(n):
                    self.temporary(p, f"the temporary directory of a killed write of {n[1:].split('.')[0]}/")
                elif _ASIDE.match(n):
                    self.aside(p)
                else:
                    keep.append(n)
            dirnames[:] = keep
            for n in sorted(filenames):
                p = here / n
                if _is_tmp_file(n):
                    self.temporary(p, "the temporary file of a killed write")
                elif parts[:2] == ("serve", "tmp"):
                    self.temporary(p, "the scratch copy of an upload that a killed server left")
                elif parts == ("forgetting",) and n.endswith(".json"):
                    self.found(p, "interrupted", "a users delete was interrupted; finish it with "
                               f"properlm users delete --run {self.run_dir} --resume")

    # -- user banks --------------------------------------------------------------------------
    def store(self, root: Path) -> None:
        for e in sorted(os.scandir(root), key=lambda e: e.name):
            p = Path(e.path)
            if e.is_dir(follow_symlinks=False):
                if UserStore.exists(p):
                    self.bank(p)
                else:
                    self.stray(p, "a directory of store/ that is not a user bank (no bank.json)")
            elif e.name == "deleted":
                pass  # the stamp of the last users delete (store.run.mark_deleted)
            elif _is_tmp_file(e.name):
                self.temporary(p, "the temporary file of a killed write")
            else:
                self.stray(p)

    def bank(self, root: Path) -> None:
        self.result.banks += 1
        try:
            store: UserStore | None = UserStore(root)
        except ProperError as e:
            self.found(root / "bank.json", "corrupt", f"{' '.join(str(e).split())} (nothing of this bank is removed)")
            store = None
        for e in sorted(os.scandir(root), key=lambda e: e.name):
            p = Path(e.path)
            if e.name == "bank.json":
                continue
            if e.name == "shards" and e.is_dir(follow_symlinks=False):
                for a in sorted(os.scandir(p), key=lambda e: e.name):
                    if not (a.is_dir(follow_symlinks=False) and _HEX2.match(a.name)):
                        self.stray(Path(a.path))
                        continue
                    for b in sorted(os.scandir(a.path), key=lambda e: e.name):
                        if b.is_dir(follow_symlinks=False) and _HEX2.match(b.name):
                            self.leaf(store, Path(b.path), a.name + b.name)
                        else:
                            self.stray(Path(b.path))
            elif _is_tmp_file(e.name) and store is not None:
                self.temporary(p, "the temporary file of a killed write")
            elif _is_tmp_file(e.name):
                self.found(p, "temporary", "the temporary file of a killed write (not removed: bank.json unreadable)")
            else:
                self.stray(p)

    @staticmethod
    def read_index(leaf: Path) -> tuple[dict | None, str]:
        """``(index, state)``: state ``ok``, ``none`` (no index.json) or the reason it is unreadable."""
        try:
            raw = (leaf / "index.json").read_bytes()
        except FileNotFoundError:
            return {}, "none"
        try:
            index = json.loads(raw)
            if not isinstance(index, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            return None, " ".join(str(e).split())
        return index, "ok"

    @staticmethod
    def referenced(index: dict | None) -> set[str]:
        out = set()
        for entry in (index or {}).values():
            parts = entry.get("parts") if isinstance(entry, dict) else None
            for part in (parts.values() if isinstance(parts, dict) else ()):
                if isinstance(part, dict) and isinstance(part.get("file"), str):
                    out.add(part["file"])
        return out

    def entry_problems(self, leaf: Path, prefix: str, index: dict) -> list[tuple[Path, str, str]]:
        """Each entry's files against the index (size, then sha256); entries outside their leaf."""
        out = []
        for user, entry in index.items():
            h = user_hash(user)
            if h[:4] != prefix:  # readers look for the user elsewhere: its files here are not checked
                out.append((leaf / "index.json", "misplaced", f"an entry of the user whose id hashes to {h[:16]}... "
                            f"belongs in shards/{h[:2]}/{h[2:4]}/ (unreachable here)"))
                continue
            parts = entry.get("parts") if isinstance(entry, dict) else None
            if not isinstance(parts, dict):
                out.append((leaf / "index.json", "corrupt", f"a malformed entry (user hash {h[:16]}...)"))
                continue
            for name, part in parts.items():
                if not _well_formed(part):
                    out.append((leaf / "index.json", "corrupt", f"a malformed {name!r} part (user hash {h[:16]}...)"))
                    continue
                f = leaf / part["file"]
                try:
                    size = os.stat(f).st_size
                    got = sha256_file(f) if size == part["bytes"] else None
                except FileNotFoundError:  # (a concurrent writer may have replaced the user: checked again)
                    out.append((f, "missing", f"the index names this file ({name!r} part of a user) but it is not there"))
                    continue
                if size != part["bytes"]:
                    out.append((f, "wrong size", f"{size} bytes, the index says {part['bytes']}"))
                elif got != part["sha256"]:
                    out.append((f, "corrupt", "its sha256 differs from the index"))
        return out

    def leaf(self, store: UserStore | None, leaf: Path, prefix: str) -> None:
        """One leaf directory: its index's entries, then its files (orphans, temporaries, strays)."""
        self.result.shards += 1
        index, state = self.read_index(leaf)
        if index is None:
            self.found(leaf / "index.json", "corrupt", f"unreadable index ({state}); "
                       "its users cannot be read and nothing in this directory is removed")
            return
        problems = self.entry_problems(leaf, prefix, index)
        for _ in range(2):  # a concurrent writer may have replaced a user between our reads: check the new index
            if not problems:
                break
            again, state = self.read_index(leaf)
            if again == index or again is None:
                break
            index, problems = again, self.entry_problems(leaf, prefix, again)
        self.result.users += len(index)
        for path, kind, detail in problems:
            self.found(path, kind, detail)

        names = sorted(os.listdir(leaf))
        later, _ = self.read_index(leaf)  # a file written and indexed while we listed is not an orphan
        known = self.referenced(index) | self.referenced(later)
        for n in names:
            p = leaf / n
            if n in ("index.json", ".lock") or n in known:
                continue
            if p.is_dir() and not p.is_symlink():
                self.stray(p)
            elif _is_tmp_file(n):
                if n.startswith(".index.json.") and store is not None:
                    # Index writes hold the leaf's lock: under it, no index write is in progress.
                    self.found(p, "temporary", "a temporary copy of the index that a killed write left",
                               lambda p=p: self.remove_in_leaf(store, leaf, p, need_age=False, orphan=False))
                elif store is not None:
                    ok, note = self.old_enough(p)
                    self.found(p, "temporary", "the temporary file of a killed write" + note,
                               (lambda p=p: self.remove_in_leaf(store, leaf, p, orphan=False)) if ok else None)
                else:
                    self.found(p, "temporary", "the temporary file of a killed write (not removed: bank.json unreadable)")
            elif (m := _USER_FILE.match(n)) is None:
                self.stray(p)
            elif m.group(1)[:4] != prefix:
                self.stray(p, f"a user file outside its shard (belongs in shards/{n[:2]}/{n[2:4]}/)")
            elif state != "ok" or store is None:
                why = "its shard has no index.json" if state == "none" else "bank.json is unreadable"
                self.found(p, "orphan", f"no index entry names it, but {why}: it may be a user's data whose index "
                           "was lost (not removed)")
            else:
                ok, note = self.old_enough(p)
                self.found(p, "orphan", "a user file that no index entry names" + note,
                           (lambda p=p: self.remove_in_leaf(store, leaf, p)) if ok else None)

    def remove_in_leaf(self, store: UserStore, leaf: Path, path: Path, need_age: bool = True,
                       orphan: bool = True) -> bool:
        """Remove ``path`` under the leaf's lock (an orphan: if the leaf's readable index still does not name it)."""
        with store._locked(leaf):
            if orphan:
                index, state = self.read_index(leaf)
                if state != "ok" or path.name in self.referenced(index):
                    return False
            if need_age and not self.old_enough(path)[0]:
                return False
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            fsync_dir(leaf)
        return True
