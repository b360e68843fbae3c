"""The crash drills (scripts/crash_drills.py), one seed: SIGKILL at random points of each stage, of
``users add`` and of ``users delete``, then resume; nothing is lost, changed or left half done."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_killed_runs_resume_to_the_same_users(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "crash_drills.py"), "--seeds", "1", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=900)
    results = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    drills = [r for r in results if "drill" in r]
    assert {r["drill"] for r in drills} == {"population", "group", "user", "add", "delete"}, p.stderr[-2000:]
    assert all(r["ok"] for r in drills), drills
    assert sum(r["killed"] for r in drills) >= 4  # the kills did land (a drill whose process ended first proves less)
    assert p.returncode == 0
