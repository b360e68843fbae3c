"""Paired bootstrap: a clear difference is beyond noise, equal methods are not; seed summaries."""

from __future__ import annotations

import json

import numpy as np
import pytest

from properlm.evaluate.stats import compare, paired_bootstrap, seed_summary


def test_paired_bootstrap_sees_a_real_difference_and_not_a_fake_one():
    rng = np.random.default_rng(0)
    b = rng.integers(0, 2, 400).astype(float)
    a = np.maximum(b, rng.integers(0, 2, 400) * (rng.random(400) < 0.3))   # a is right wherever b is, and more
    res = paired_bootstrap(a, b)
    assert res["diff"] > 0 and res["ci95"][0] > 0 and res["p_le_0"] < 0.01
    same = paired_bootstrap(b, b[rng.permutation(400)])
    assert same["ci95"][0] < 0 < same["ci95"][1]
    with pytest.raises(ValueError):
        paired_bootstrap(a, b[:3])


def _fake_run(root, name, task, golds, methods):
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "summary.json").write_text(json.dumps({"task": task, "methods": {m: {} for m in methods}}))
    (run / "eval" / "golds.json").write_text(json.dumps({"golds": [{"id": str(i), "output": g}
                                                                   for i, g in enumerate(golds)]}))
    for m, preds in methods.items():
        (run / "eval" / m).mkdir()
        (run / "eval" / m / "predictions.json").write_text(json.dumps({"golds": [{"id": str(i), "output": p}
                                                                                  for i, p in enumerate(preds)]}))
    return run


def test_compare_and_seed_summary_on_prediction_files(tmp_path):
    golds = ["4", "5", "1", "2", "3"] * 40
    good = golds
    bad = ["3"] * 200
    runs = [_fake_run(tmp_path, f"s{s}", "LaMP-3", golds, {"proper": good, "stage1": bad}) for s in range(3)]
    res = compare(runs[0], "proper", "stage1")
    assert res["metric"] == "abs_error" and res["diff"] < 0 and res["better"]  # lower error is better
    assert not compare(runs[0], "stage1", "proper")["better"]
    summary = seed_summary(runs, ["proper", "stage1"])
    assert summary["proper"]["mean"] == 0 and summary["stage1"]["mean"] == pytest.approx(1.2)
    assert summary["stage1"]["std"] == 0 and len(summary["proper"]["runs"]) == 3
