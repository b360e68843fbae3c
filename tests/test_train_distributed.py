"""Two training processes (gloo, CPU) against one: the same adapters for the same data order, and --resume works;
the same with the base sharded over the two (FSDP2).

Dropout is off: a rank draws the dropout masks of its own rows only, which is a
different stream from one process drawing them for the whole batch.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from properlm.store.run import banks

pytestmark = pytest.mark.slow
ARGS = ["base_model=tiny-random", "progress=false", "data.synth_users=12", "data.n_targets=4", "data.split=oppu",
        "population.max_steps=4", "group.max_steps=6", "user.max_steps=6", "population.dropout=0", "group.dropout=0",
        "user.dropout=0", "group.unseen_epochs=1", "checkpoint_every=2", "user.cohort_size=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# One row per step: in every step one of two ranks has nothing of its own to train.
ONE_ROW = ["population.batch_size=1", "group.users_per_step=1", "user.users_per_step=1"]


def train(out: Path, *extra: str, processes: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "properlm.cli", "train", "--all", "--out", str(out), *extra, *ARGS]
    if processes > 1:
        cmd[4:4] = ["--processes", str(processes)]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def assert_close_runs(a: Path, b: Path) -> None:
    for f in ("population/adapter_model.safetensors", "group/experts.safetensors", "user/router.safetensors"):
        x, y = load_file(str(a / f)), load_file(str(b / f))
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], atol=5e-5, rtol=1e-4, msg=f"{f} {k}")
    for name, bank in banks(a).items():
        other = banks(b)[name]
        assert sorted(bank.users()) == sorted(other.users()), name
        for u in bank.users():
            p, q = bank.get(u)["params"], other.get(u)["params"]
            for k in p:
                torch.testing.assert_close(p[k], q[k], atol=5e-5, rtol=1e-4, msg=f"{name} {u} {k}")


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "one"
    train(out)
    return out


def test_two_processes_train_the_same_adapters_as_one(one, tmp_path):
    two = tmp_path / "two"
    train(two, processes=2)
    assert_close_runs(one, two)
    # Rank 0 alone logs: one record per step, not two.
    assert len((two / "logs" / "group.jsonl").read_text().splitlines()) == 6


def test_accelerate_launch_of_python_m_properlm_trains_the_same_adapters(one, tmp_path):
    """The documented ``accelerate launch --multi_gpu --num_processes 2 -m properlm train ...`` (gloo
    without GPUs) equals one process, like ``--processes 2``."""
    two = tmp_path / "acc"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "properlm", "train", "--all", "--out", str(two), *ARGS]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("trained population, group, user") == 1  # rank 0 alone reports
    assert_close_runs(one, two)


def test_two_processes_killed_mid_stage_resume_to_the_same_adapters(one, tmp_path):
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "properlm.cli", "train", "--all", "--out", str(two), "--processes", "2", *ARGS]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = two / "logs" / "user.jsonl"
    t_end = time.time() + 300
    while time.time() < t_end and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:  # inside stage 3, past a checkpoint
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert not (two / "user").exists()
    train(two, "--resume", processes=2)
    assert_close_runs(one, two)
    p = train(two, "--resume", processes=1, check=False)  # a finished run: nothing to do, whatever the count
    assert p.returncode == 0


@pytest.fixture(scope="module")
def one_row(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "one-row"
    train(out, *ONE_ROW)
    return out


def assert_sharded(stderr: str) -> None:
    """Rank 0 reported sharding the decoder layers in each stage, and holds about half their weights."""
    found = re.findall(r"properlm: fsdp: (\d+) decoder layers sharded over 2 processes; "
                       r"this process holds ([\d,]+) of their ([\d,]+) frozen weights", stderr)
    assert len(found) == 3, stderr[-3000:]  # stages 1, 2 and 3, once each (rank 0)
    for layers, held, full in found:
        held, full = int(held.replace(",", "")), int(full.replace(",", ""))
        assert int(layers) == 2 and full > 0 and held <= full // 2 + 2 * int(layers) * 8


def test_fsdp_shards_the_base_and_trains_the_same_adapters_as_one_process(one_row, tmp_path):
    """``fsdp=true`` with 2 processes: each holds half of the decoder layers' frozen weights, and the
    adapters equal one process's. With one row per step the idle rank must still join every gather
    of the sharded layers (forward and backward, in order), or the run hangs."""
    two = tmp_path / "fsdp"
    p = train(two, *ONE_ROW, "fsdp=true", processes=2)
    assert_sharded(p.stderr)
    assert_close_runs(one_row, two)


def test_accelerate_launch_with_the_fsdp_config_shards_the_base(one_row, tmp_path):
    """The documented ``accelerate launch --config_file configs/accelerate/fsdp.yaml -m properlm train``
    (here 2 CPU processes) shards the base like ``fsdp=true`` and trains the same adapters."""
    two = tmp_path / "acc-fsdp"
    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
           "-m", "properlm", "train", "--all", "--out", str(two), *ARGS, *ONE_ROW]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_sharded(p.stderr)
    assert_close_runs(one_row, two)
