"""Paired bootstrap: a clear difference is beyond noise, equal methods are not; users, not queries, are
resampled; seed summaries."""

from __future__ import annotations

import json

import numpy as np
import pytest

from properlm.errors import ProperError
from properlm.evaluate.stats import (cluster_bootstrap, compare, paired_bootstrap, query_users,
                                     seed_summary)


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


def _fake_run(root, name, task, golds, methods, per_user=5):
    """A run's eval files: query i belongs to user ``i // per_user`` (None: no user named)."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "summary.json").write_text(json.dumps({"task": task, "methods": {m: {} for m in methods}}))
    owner = (lambda i: {}) if per_user is None else (lambda i: {"user_id": f"u{i // per_user}"})
    (run / "eval" / "golds.json").write_text(json.dumps({"golds": [{"id": str(i), "output": g, **owner(i)}
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


def _width(res):
    return res["ci95"][1] - res["ci95"][0]


def test_cluster_interval_is_wider_when_a_users_queries_go_together():
    """40 users x 25 queries; a user's difference is shared by all their queries (one adapter),
    so the queries carry far less information than 1,000 independent draws."""
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(40), 25)
    b = rng.random(1000)
    a = b + rng.normal(0.05, 0.3, 40)[users] + rng.normal(0, 0.01, 1000)
    by_user, by_query = cluster_bootstrap(a, b, users), paired_bootstrap(a, b)
    assert by_user["diff"] == pytest.approx(by_query["diff"])
    assert _width(by_user) > 3 * _width(by_query)
    assert by_user["n_users"] == 40 and by_user["n_queries"] == by_user["n"] == 1000


def test_cluster_bootstrap_with_one_query_per_user_is_the_query_bootstrap():
    rng = np.random.default_rng(2)
    a, b = rng.random(50), rng.random(50)
    by_user = cluster_bootstrap(a, b, [f"u{i}" for i in range(50)], n=2000, seed=7)
    by_query = paired_bootstrap(a, b, n=2000, seed=7)
    assert by_user["ci95"] == pytest.approx(by_query["ci95"]) and by_user["p_le_0"] == by_query["p_le_0"]
    assert by_user["n_users"] == 50


def test_cluster_bootstrap_weights_users_by_their_queries_and_checks_lengths():
    # user x: 3 queries with difference 1; user y: 1 query with difference 0 -> per-query mean 0.75
    res = cluster_bootstrap(np.array([1.0, 1, 1, 0]), np.zeros(4), ["x", "x", "x", "y"], n=4000)
    assert res["diff"] == 0.75 and res["n_users"] == 2
    assert res["ci95"] == [0.0, 1.0]  # a draw of only y, or only x
    same = cluster_bootstrap(np.ones(6), np.zeros(6), [("s0", "u"), ("s1", "u")] * 3)  # (seed, user) clusters
    assert same["ci95"] == [1.0, 1.0] and same["n_users"] == 2
    with pytest.raises(ValueError):
        cluster_bootstrap(np.ones(3), np.ones(3), ["x", "y"])


def test_compare_resamples_users_and_says_how_many(tmp_path):
    """Within each user the two methods agree on every query, but users differ: a query-level
    interval would clear zero; the user-level one must not."""
    rng = np.random.default_rng(3)
    golds = ["3"] * 200
    wins = rng.random(10) < 0.6                       # per user: does proper beat stage1 on all 20 queries?
    good = ["3" if wins[i // 20] else "5" for i in range(200)]
    bad = ["5" if wins[i // 20] else "3" for i in range(200)]
    run = _fake_run(tmp_path, "r", "LaMP-3", golds, {"proper": good, "stage1": bad}, per_user=20)
    res = compare(run, "proper", "stage1")
    assert res["n_users"] == 10 and res["n_queries"] == 200
    a, b = np.array([0.0 if w else 2.0 for w in wins]).repeat(20), np.array([2.0 if w else 0.0 for w in wins]).repeat(20)
    assert _width(res) > 2 * _width(paired_bootstrap(a, b))
    assert query_users(run)["25"] == "u1"


def test_query_users_need_a_user_per_query(tmp_path):
    run = _fake_run(tmp_path, "r", "LaMP-3", ["3"] * 4, {"proper": ["3"] * 4}, per_user=None)
    with pytest.raises(ProperError, match="does not name each query's user"):
        query_users(run)


def test_query_users_of_an_older_run_come_from_its_split(tmp_path):
    """A run evaluated before golds.json named users: the owners are read back from split.json and the data."""
    from properlm.config import save_config
    from properlm.data.splits import split_users
    from properlm.run_config import DataConfig, RunConfig
    from properlm.train.run import load_data

    cfg = RunConfig(base_model="tiny-random", data=DataConfig(synth_users=8, n_targets=3))
    train, targets = split_users(load_data(cfg), n=3)
    owners = {q.id: u.id for u in targets for q in u.queries}
    assert len(owners) == 9  # 3 targets x 3 held-out queries
    run = _fake_run(tmp_path, "old", "synth-cls", ["love"] * len(owners), {}, per_user=None)
    golds = [{"id": q, "output": "love"} for q in owners]
    (run / "eval" / "golds.json").write_text(json.dumps({"golds": golds}))
    save_config(cfg, run / "config.yaml")
    (run / "split.json").write_text(json.dumps({"task": "synth-cls", "train": [u.id for u in train],
                                                "target": [u.id for u in targets]}))
    assert query_users(run) == owners
