"""An evaluation stopped while it trains an OPPU baseline goes on from the baseline's last checkpoint
and ends with the LoRAs an uninterrupted one trains."""

from __future__ import annotations

import shutil

import pytest
import torch

from properlm.evaluate.evaluate import evaluate_run
from properlm.store.run import open_bank
from properlm.train.loop import RunLogger
from properlm.train.run import train


class Stopped(Exception):
    pass


def _loras(run_dir) -> dict[str, torch.Tensor]:
    store = open_bank(run_dir, "oppu-mlp")
    return {f"{u}/{k}": v for u in store.users() for k, v in store.get(u)["params"].items()}


@pytest.mark.slow
def test_a_stopped_baseline_resumes_from_its_checkpoint(tmp_path, h, monkeypatch):
    cfg = h.small_cfg(checkpoint_every=2, data=dict(synth_users=8, n_targets=3),
                      user=dict(max_steps=None, epochs=2, users_per_step=2))
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(cfg, ref, stages=("population",))
    shutil.copytree(ref, run)
    evaluate_run(ref, methods=["oppu-mlp"], max_new_tokens=2, progress=False)
    steps, stop = [], [3]
    orig = RunLogger.log

    def log(self, step, **metrics):
        orig(self, step, **metrics)
        steps.append(step)
        if step in stop:
            raise Stopped

    monkeypatch.setattr(RunLogger, "log", log)
    with pytest.raises(Stopped):
        evaluate_run(run, methods=["oppu-mlp"], max_new_tokens=2, progress=False)
    assert (run / "baselines" / "oppu-mlp" / "checkpoints").exists()
    steps.clear()
    stop.clear()
    evaluate_run(run, methods=["oppu-mlp"], max_new_tokens=2, progress=False)
    assert steps and steps[0] == 3  # the checkpoint of step 2 was the start: steps 1-2 were not trained again
    want, got = _loras(ref), _loras(run)
    assert got.keys() == want.keys() and want
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert (run / "eval" / "oppu-mlp" / "predictions.json").read_bytes() == \
        (ref / "eval" / "oppu-mlp" / "predictions.json").read_bytes()
