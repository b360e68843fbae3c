"""``scripts/gpu_check.py --device cpu``: the GPU check's own rehearsal, so the script cannot rot while no GPU is at hand.

On the CPU the checks compare the CPU with itself (float32 exactly, bf16 within
its bound), so this tests the script's plumbing and its verdicts, not a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def _run(*args):
    p = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", *args], capture_output=True, text=True,
                       timeout=600)
    return p.returncode, json.loads(p.stdout)


def test_rehearsal_checks_numbers_and_cleans_its_scratch(tmp_path):
    rc, report = _run("--out", str(tmp_path / "scratch"))
    assert rc == 0 and report["ok"], report
    assert report["logits"]["fp32"]["rel_max_diff"] == 0.0          # the CPU against itself
    assert 0 < report["logits"]["bf16"]["rel_max_diff"] <= report["logits"]["bf16"]["bound"]  # bf16 really ran
    assert report["stage3_start"]["max_abs_diff"] <= report["stage3_start"]["bound"]
    assert report["commands"]["serve"]["status"] == 200
    assert not (tmp_path / "scratch").exists()  # a passing run leaves nothing behind


def test_a_bound_that_cannot_hold_fails_the_run(tmp_path):
    rc, report = _run("--out", str(tmp_path / "scratch"), "--rtol-bf16", "1e-9")
    assert rc == 1 and not report["ok"] and not report["logits"]["bf16"]["ok"]
    assert (tmp_path / "scratch").exists()  # kept for a look
    rc, report = _run("--out", str(tmp_path / "scratch"))  # never reuses a scratch directory
    assert rc == 2 and "exists" in report["error"]
