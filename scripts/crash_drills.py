"""Crash drills: SIGKILL properlm at random points, then resume, and check that no user's model was lost or changed.

    .venv/bin/python scripts/crash_drills.py --seeds 3 [--drills population,group,user,add,delete] [--out DIR]

On a tiny random model (seconds per run):

- ``population``, ``group``, ``user``: ``properlm train --all`` is killed when the
  stage's log reaches a random step (plus a random few milliseconds, so the kill
  also lands inside checkpoint writes); ``--resume`` must end with stage files
  and user banks bit-identical to an uninterrupted run's.
- ``add``: ``properlm users add`` of two users (one new, one refreshed) killed
  at a random step of its log: each user must be exactly as before or exactly as after
  an uninterrupted add, the run must load, and ``users add --resume`` must end
  where the uninterrupted add ends.
- ``delete``: ``properlm users delete`` of three users SIGKILLed at a random one
  of its steps (``PROPERLM_DRILL_KILL_AT``: each bank entry or file kind removed is
  a step): after the run is loaded (which finishes an interrupted delete), each
  user is either untouched or has no byte left in any file of the run.

Prints one JSON line per drill and a summary; exits 1 if any drill fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["base_model=tiny-random", "progress=false", "data.synth_users=16", "data.n_targets=4", "data.split=oppu",
        "population.max_steps=8", "group.max_steps=8", "user.max_steps=8", "checkpoint_every=1",
        "population.dropout=0.05", "group.dropout=0.05", "user.dropout=0.05"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def properlm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "properlm.cli", *args], cwd=ROOT, env=ENV, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"properlm {' '.join(args)} failed:\n{p.stderr[-2000:]}")
    return p


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "properlm.cli", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def digest(run: Path) -> dict[str, str]:
    """sha256 of what a run has learned: stage files, and every user's tensors in every bank (not timestamps)."""
    sys.path.insert(0, str(ROOT / "src"))
    from properlm.store.run import banks

    out = {}
    for f in ("population/adapter_model.safetensors", "group/experts.safetensors", "user/router.safetensors"):
        if (run / f).exists():
            out[f] = hashlib.sha256((run / f).read_bytes()).hexdigest()
    for name, bank in banks(run).items():
        for u in bank.users():
            for part, tensors in bank.get(u, ("params", "adamw")).items():
                h = hashlib.sha256()
                for k in sorted(tensors):
                    h.update(k.encode() + tensors[k].numpy().tobytes())
                out[f"{name}/{u}/{part}"] = h.hexdigest()
    return out


def lines(path: Path) -> int:
    try:
        return sum(1 for _ in open(path))
    except OSError:
        return 0


def kill_at_step(proc: subprocess.Popen, log: Path, step: int, extra_ms: float, timeout: float = 300) -> bool:
    """SIGKILL ``proc`` once ``log`` has ``step`` records (and ``extra_ms`` more); False if it ended first."""
    t_end = time.time() + timeout
    while time.time() < t_end and proc.poll() is None:
        if lines(log) >= step:
            time.sleep(extra_ms / 1000)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    return False


def drill_stage(stage: str, seed: int, ref: Path, work: Path) -> dict:
    rng = random.Random(f"{stage}-{seed}")
    run = work / f"{stage}-{seed}"
    shutil.rmtree(run, ignore_errors=True)
    step = rng.randint(1, 7)
    extra = rng.uniform(0, 40)
    proc = start("train", "--all", "--out", str(run), *TINY)
    killed = kill_at_step(proc, run / "logs" / f"{stage}.jsonl", step, extra)
    properlm("train", "--all", "--out", str(run), "--resume")
    ok = digest(run) == digest(ref)
    return {"drill": stage, "seed": seed, "kill_at_step": step, "extra_ms": round(extra, 1), "killed": killed, "ok": ok}


def drill_add(seed: int, ref: Path, after: Path, users: list[str], work: Path) -> dict:
    rng = random.Random(f"add-{seed}")
    run = work / f"add-{seed}"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(ref, run)
    sys.path.insert(0, str(ROOT / "src"))
    from properlm.train.users import add_stage

    # Killed at a random step of the new user's embedding fit or of the LoRA training (or in a write after it).
    log = run / "logs" / (add_stage(users) + ".jsonl")
    step, extra = rng.randint(1, 6), rng.uniform(0, 40)
    killed = kill_at_step(start("users", "add", "--run", str(run), "--users", *users), log, step, extra)
    delay = f"{log.name} step {step} + {extra:.0f} ms"
    want_before, want_after, mid = digest(ref), digest(after), digest(run)
    between = []
    for u in users:
        keys = {k for k in (*want_before, *want_after) if f"/{u}/" in k}
        state = {k: mid.get(k) for k in keys}
        if state not in ({k: want_before.get(k) for k in keys}, {k: want_after.get(k) for k in keys}):
            between.append(u)
    loads = properlm("generate", "--run", str(run), "--user", "base", "--max-new-tokens", "1", "hi", check=False)
    if killed:  # (an add that finished is not resumed: that would be a second add, a refresh)
        properlm("users", "add", "--run", str(run), "--users", *users, "--resume")
    ok = not between and loads.returncode == 0 and digest(run) == want_after
    return {"drill": "add", "seed": seed, "kill_at": delay, "killed": killed, "half_done": between,
            "ok": ok}


def drill_delete(seed: int, base: Path, users: list[str], work: Path) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from properlm import load_run

    rng = random.Random(f"delete-{seed}")
    run = work / f"delete-{seed}"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(base, run)
    before = digest(run)
    at = rng.randint(1, 9)  # killed at a random one of the delete's steps (each file or bank entry removed)
    p = subprocess.run([sys.executable, "-m", "properlm.cli", "users", "delete", "--run", str(run), "--users", *users],
                       cwd=ROOT, env={**ENV, "PROPERLM_DRILL_KILL_AT": str(at)}, capture_output=True)
    killed = p.returncode == -signal.SIGKILL
    delay = at
    load_run(run)  # finishes an interrupted delete before anything is served
    now = digest(run)
    between = []
    for u in users:
        present = [str(p) for p in run.rglob("*") if p.is_file() and u.encode() in p.read_bytes()]
        untouched = all(now.get(k) == v for k, v in before.items() if f"/{u}/" in k)
        if present and not untouched or not present and any(f"/{u}/" in k for k in now):
            between.append(u)
    return {"drill": "delete", "seed": seed, "kill_at_step": delay, "killed": killed,
            "half_done": between, "ok": not between}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--drills", default="population,group,user,add,delete")
    ap.add_argument("--out", default=None, help="work directory (default: a temporary one, removed)")
    a = ap.parse_args(argv)
    work = Path(a.out or tempfile.mkdtemp(prefix="properlm-drills-"))
    work.mkdir(parents=True, exist_ok=True)
    drills = [d.strip() for d in a.drills.split(",") if d.strip()]
    results = []
    try:
        ref = work / "ref"
        if not (ref / "user").exists():
            properlm("train", "--all", "--out", str(ref), *TINY)
        split = json.loads((ref / "split.json").read_text())
        add_users = [split["train"][0], split["target"][0]]  # a new user and a refreshed one
        after = work / "ref-after-add"
        if not after.exists():
            shutil.copytree(ref, after)
            properlm("users", "add", "--run", str(after), "--users", *add_users)
        gone = split["target"][1:]
        for seed in range(a.seeds):
            for d in drills:
                if d in ("population", "group", "user"):
                    r = drill_stage(d, seed, ref, work)
                elif d == "add":
                    r = drill_add(seed, ref, after, add_users, work)
                else:
                    r = drill_delete(seed, after, gone, work)
                print(json.dumps(r), flush=True)
                results.append(r)
    finally:
        if a.out is None:
            shutil.rmtree(work, ignore_errors=True)
    bad = [r for r in results if not r["ok"]]
    print(json.dumps({"drills": len(results), "failed": len(bad), "killed": sum(r["killed"] for r in results)}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
