"""Onboarding jobs: a user's uploaded history trained into their LoRA in the background.

``POST /v1/users/{id}/history`` checks every record (nothing is stored when
one is bad), writes the history to ``RUN/serve/uploads/<job id>.jsonl`` (each
upload its own file, named by its job) and queues a job; a user has at most one
queued or running job (:meth:`Jobs.reserve`: a second upload meanwhile is
refused). One worker thread runs the jobs in turn with
:func:`properlm.train.users.add_users`, the same code as ``properlm users add``
(their stage-2 embedding, instant or fitted as the run's ``group.unseen`` says,
then their LoRA against the frozen stages). From the moment the embedding is
stored the user is answered by their group; the job's record says so
(``group_ready``). A job's record ``RUN/serve/jobs/<id>.json`` reports its state
and progress. Jobs
that a restart interrupted are queued again at start and resume from their
checkpoint. When a job ends its upload is removed; cancelling (the user
deleted) stops it between steps.

Nothing derived from a user or their data goes to the log: a failed job logs
its id, the exception's type and the code lines of its traceback, and its
record says what failed without the server's paths.
"""

from __future__ import annotations

import logging
import queue
import re
import shutil
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Callable

from properlm.data.jsonl import load_jsonl
from properlm.errors import ProperError
from properlm.io import read_json, write_json, write_text
from properlm.serve.settings import log_failure
from properlm.store.user_store import user_hash
from properlm.train.examples import Example

log = logging.getLogger("properlm.serve")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
#: A job id: 32 lowercase hex digits (``uuid4().hex``); anything else names no job.
JOB_ID = re.compile(r"[0-9a-f]{32}")


def is_job_id(text: str) -> bool:
    """Whether ``text`` has the form of a job id (checked before any file is looked up)."""
    return JOB_ID.fullmatch(text) is not None


def check_record(rec: object, n: int) -> None:
    """The server's stricter checks of one uploaded record (beyond the JSONL format's):
    ``prompt`` and ``response`` are strings, ``time`` a number or an ISO 8601 date or time.

    Raises:
        ProperError: ``line N: field 'f': what``.
    """
    if not isinstance(rec, dict):
        return  # the format's own check names it
    for name in ("prompt", "response"):
        v = rec.get(name)
        if v is not None and not isinstance(v, str):
            raise ProperError(f"line {n}: field '{name}': expected a string, got {_kind(v)}")
    t = rec.get("time")
    if t is not None and not _is_time(t):
        raise ProperError(f"line {n}: field 'time': expected a number or an ISO 8601 date or time "
                          f"(e.g. 2024-05-01T10:00:00), got {'a ' + _kind(t) if not isinstance(t, str) else 'text'}")


def _kind(v: object) -> str:
    """A JSON value's kind, in words (never the value: it is the user's data)."""
    kinds = {bool: "boolean", int: "number", float: "number", list: "list", dict: "object"}
    return kinds.get(type(v), type(v).__name__)


def _is_time(t: object) -> bool:
    """A number, a numeric string or an ISO 8601 date / date and time (what sorts as a time)."""
    if isinstance(t, bool):
        return False
    if isinstance(t, (int, float)):
        return t == t and abs(t) != float("inf")
    if not isinstance(t, str):
        return False
    try:
        float(t)
        return True
    except ValueError:
        pass
    try:
        datetime.fromisoformat(t.replace("Z", "+00:00") if t.endswith("Z") else t)
        return True
    except ValueError:
        return False


def parse_history(body: bytes, user: str, scratch: Path) -> list[Example]:
    """The training pairs of an uploaded JSONL history (the documented format; ``user_id`` optional).

    Raises:
        ProperError: the first bad record, as ``line N: field 'f': what``; a record of another user.
    """
    import json

    from properlm.errors import DataError

    scratch.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for n, raw in enumerate(body.decode("utf-8", errors="strict").splitlines(), 1):
        if not raw.strip():
            lines.append(raw)
            continue
        try:
            rec = json.loads(raw)
        except ValueError as e:
            raise ProperError(f"line {n}: malformed JSON: {e}") from None
        check_record(rec, n)
        if isinstance(rec, dict):
            if rec.setdefault("user_id", user) != user:
                raise ProperError(f"line {n}: field 'user_id': {rec['user_id']!r} is not the user of this upload "
                                  f"({user!r})")
        lines.append(json.dumps(rec))
    write_text(scratch, "\n".join(lines) + "\n")
    try:
        ds = load_jsonl(scratch, n_queries=0)
    except DataError as e:
        where = ": ".join(x for x in (e.record, f"field '{e.field}'" if e.field else None) if x)
        raise ProperError(f"{where}: {e.message}" if where else e.message) from None
    finally:
        scratch.unlink(missing_ok=True)
    items = [it for u in ds.users for it in u.history]
    if not items:
        raise ProperError("no history record to train on")
    return [Example(user, it.fields["prompt"], it.fields["response"]) for it in items]


class Jobs:
    """The onboarding queue of one served run.

    Args:
        run_dir: the run.
        on_done: called with the user id when their job succeeded (the server evicts them
            from its caches so the new adapter is read).
        train_threads: torch threads while training (None: unchanged).
    """

    def __init__(self, run_dir: str | Path, on_done: Callable[[str], None], train_threads: int | None = None):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "serve"
        self.on_done, self.train_threads = on_done, train_threads
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._cancel: dict[str, threading.Event] = {}
        self.active: dict[str, str] = {}  # user -> their queued or running job
        self._reserved: set[str] = set()  # users whose upload is being checked (not yet a job)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="properlm-jobs", daemon=True)

    # -- records -------------------------------------------------------------------------------
    def _path(self, jid: str) -> Path:
        return self.root / "jobs" / f"{jid}.json"

    def upload_path(self, job: dict) -> Path:
        """Where a job's upload is: ``uploads/<job id>.jsonl`` (jobs of older servers: the user's hash)."""
        return self.root / "uploads" / (job.get("upload") or f"{user_hash(job['user'])}.jsonl")

    def get(self, jid: str) -> dict | None:
        """A job's record, or None (also for a string that is not a job id: no file is looked up)."""
        if not is_job_id(jid):
            return None
        p = self._path(jid)
        return read_json(p) if p.exists() else None

    def _save(self, job: dict) -> None:
        job["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json(self._path(job["id"]), job)

    def all(self) -> list[dict]:
        d = self.root / "jobs"
        return [read_json(p) for p in sorted(d.glob("*.json"))] if d.is_dir() else []

    def active_for(self, user: str) -> dict | None:
        """The user's queued or running job, if any (from memory: no file is read for a user without one)."""
        jid = self.active.get(user)
        job = self.get(jid) if jid else None
        return job if job is not None and job["state"] in (QUEUED, RUNNING) else None

    # -- submitting ----------------------------------------------------------------------------
    def start(self) -> "Jobs":
        """Start the worker; jobs a restart interrupted are queued again (they resume). Scratch copies
        of uploads that a killed process left in ``serve/tmp``, and uploads no job record names (a
        process killed between the two writes), go: users' data under names forgetting cannot attribute."""
        shutil.rmtree(self.root / "tmp", ignore_errors=True)
        jobs = self.all()
        named = {self.upload_path(j).name for j in jobs}
        for p in sorted((self.root / "uploads").glob("*")) if (self.root / "uploads").is_dir() else []:
            if p.name not in named:
                p.unlink(missing_ok=True)
        for job in jobs:
            if job["state"] in (QUEUED, RUNNING):
                job["state"], job["resume"] = QUEUED, True
                self._save(job)
                self._cancel[job["id"]] = threading.Event()
                self.active[job["user"]] = job["id"]
                self._queue.put(job["id"])
        self._thread.start()
        return self

    def close(self) -> None:
        for ev in self._cancel.values():
            ev.set()
        self._queue.put(None)
        self._thread.join(timeout=30)

    def reserve(self, user: str) -> bool:
        """Claim the user's one onboarding slot while their upload is checked; False when they already
        have a queued or running job or another upload under way. :meth:`submit` or :meth:`release` ends it."""
        with self._lock:
            if user in self._reserved or self.active_for(user) is not None:
                return False
            self._reserved.add(user)
            return True

    def release(self, user: str) -> None:
        """End a :meth:`reserve` (the upload was refused, or its job is queued)."""
        with self._lock:
            self._reserved.discard(user)

    def submit(self, user: str, body: bytes, examples: list[Example], refresh: bool) -> dict:
        """Store the upload (its own file) and queue a job; returns the job record. The record, which
        names the upload, is written first: forgetting the user finds the upload through it."""
        jid = uuid.uuid4().hex
        job = {"id": jid, "user": user, "state": QUEUED, "refresh": refresh, "records": len(examples),
               "upload": f"{jid}.jsonl", "progress": {"phase": None, "step": 0, "steps": None},
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._save(job)
        write_text(self.upload_path(job), body.decode("utf-8"))
        with self._lock:
            self._cancel[jid] = threading.Event()
            self.active[user] = jid
        self._queue.put(jid)
        return job

    def cancel_user(self, user: str, wait: float | None = 60.0) -> int:
        """Cancel the user's queued and running jobs and wait (``wait`` seconds; None: as long as it takes)
        for a running one to stop; how many. A queued one never starts."""
        jobs = [j for j in self.all() if j["user"] == user and j["state"] in (QUEUED, RUNNING)]
        for j in jobs:
            ev = self._cancel.get(j["id"])
            if ev is not None:
                ev.set()
        t_end = time.monotonic() + (wait if wait is not None else float("inf"))
        while time.monotonic() < t_end and any((self.get(j["id"]) or {}).get("state") == RUNNING for j in jobs):
            time.sleep(0.05)
        return len(jobs)

    def forget(self, user: str) -> int:
        """Remove the user's job records and upload; how many files."""
        with self._lock:
            for j in self.all():
                if j["user"] == user:
                    self._cancel.pop(j["id"], None)
            self.active.pop(user, None)
        return forget_serve_state(self.run_dir, user, keys=False)

    # -- the worker ----------------------------------------------------------------------------
    def _work(self) -> None:
        import torch

        from properlm.train.multiuser import Cancelled
        from properlm.train.users import add_users

        if self.train_threads:
            torch.set_num_threads(self.train_threads)
        while True:
            jid = self._queue.get()
            if jid is None:
                return
            job = self.get(jid)
            ev = self._cancel.get(jid)
            if job is None or ev is None:
                continue
            if ev.is_set():
                job["state"] = CANCELLED
                self._save(job)
                continue
            job["state"] = RUNNING
            self._save(job)
            last = [0.0]

            phase = ["adapter"]

            def on_step(step: int, steps: int) -> bool:
                now = time.monotonic()
                if now - last[0] > 1.0:  # the record is rewritten at most once a second
                    last[0] = now
                    job["progress"] = {"phase": phase[0], "step": step, "steps": steps}
                    self._save(job)
                return ev.is_set()

            def on_phase(name: str) -> None:  # whose steps on_step counts: the embedding fit's, then the LoRA's
                phase[0] = name
                job["progress"] = {"phase": name, "step": 0, "steps": None}
                last[0] = 0.0
                self._save(job)

            try:
                user = job["user"]
                try:
                    body = self.upload_path(job).read_bytes()
                except FileNotFoundError:
                    raise ProperError("the upload of this job is gone (send the history again)") from None
                examples = parse_history(body, user, self.root / "tmp" / f"{uuid.uuid4().hex}.jsonl")
                job["trained_records"] = len(examples)
                def on_group() -> None:
                    job["group_ready"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                    self._save(job)

                add_users(self.run_dir, [user], examples=examples, resume=bool(job.get("resume")), on_step=on_step,
                          progress=False, on_group=on_group, on_phase=on_phase)
                job["state"], job["progress"]["step"] = DONE, job["progress"].get("steps") or 0
                self.on_done(user)
            except Cancelled:
                job["state"] = CANCELLED
            except Exception as e:
                log_failure(log, f"onboarding job {jid} failed", e)
                job["state"], job["error"] = FAILED, self._error_text(e)
            self.upload_path(job).unlink(missing_ok=True)  # its purpose is over: no user data is kept
            with self._lock:
                if self.active.get(job["user"]) == jid:
                    self.active.pop(job["user"])
                if self._path(jid).exists():  # a forgotten user's job leaves no record behind
                    self._save(job)


    def _error_text(self, e: Exception) -> str:
        """What a failed job's record says: a properlm error's message (the run's path as ``RUN``),
        only the type of any other error (its message may name server paths or the user's data)."""
        if isinstance(e, ProperError):
            text = str(e).replace(str(self.run_dir.resolve()), "RUN").replace(str(self.run_dir), "RUN")
            return " ".join(f"{type(e).__name__}: {text}".split())
        return f"internal error ({type(e).__name__}); the server log has the details"


def forget_serve_state(run_dir: str | Path, user: str, keys: bool = True) -> int:
    """Remove what the server keeps of a user in ``RUN/serve``: job records, uploads, API keys; how many files."""
    root = Path(run_dir) / "serve"
    if not root.is_dir():
        return 0
    n = 0
    uploads = {f"{user_hash(user)}.jsonl"}  # an older server's upload, named by the user's hash
    for p in sorted((root / "jobs").glob("*.json")) if (root / "jobs").is_dir() else []:
        try:
            rec = read_json(p)
            mine = rec.get("user") == user
        except ProperError:
            rec, mine = {}, True  # unreadable: it may be theirs
        if mine:
            if rec.get("upload"):
                uploads.add(rec["upload"])
            p.unlink(missing_ok=True)
            n += 1
    for name in sorted(uploads):
        up = root / "uploads" / name
        if up.exists():
            up.unlink()
            n += 1
    if keys:
        from properlm.serve.keys import Keys

        n += Keys(root).forget(user)
    return n
