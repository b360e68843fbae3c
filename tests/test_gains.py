"""Who gains: gains over stage 1 per tercile of history length, with user-level intervals, in the report."""

from __future__ import annotations

import csv
import json

import pytest
from test_report import write_eval_run

from properlm.evaluate.gains import gain_pairs, gain_rows, terciles
from properlm.evaluate.evaluate import load_results
from properlm.evaluate.report import report
from properlm.run_config import DataConfig

PNG = b"\x89PNG\r\n\x1a\n"
HISTORY = [2, 3, 4, 5, 20, 22, 24, 26, 60, 70, 80, 90]   # sparse, middle and dense thirds of 4 users each


def _users(history=HISTORY, queries=3):
    return {f"u{i:02d}": (h, ["love", "hate", "like"][:queries]) for i, h in enumerate(history)}


def _answers(users, wrong):
    """Each user's answers: the gold, except the first ``wrong(index)`` queries answered "dislike"."""
    return {u: ["dislike"] * wrong(i) + golds[wrong(i):] for i, (u, (_, golds)) in enumerate(users.items())}


def _grouped_run(tmp_path, name="main", data=None):
    """Stage 1 misses 2-3 of a sparse user's 3 queries, 1 of a middle user's and none of a dense user's;
    stage 2 and PROPER answer everything; OPPU-mlp fixes only the middle users."""
    users = _users()
    stage1 = _answers(users, lambda i: (3 - i % 2) if i < 4 else 1 if i < 8 else 0)
    oppu = _answers(users, lambda i: (3 - i % 2) if i < 4 else 0)
    right = _answers(users, lambda i: 0)
    return write_eval_run(tmp_path, name, users, {"stage1": stage1, "stage2": right, "proper": right,
                                                  "oppu-mlp": oppu, "stage1@labels": stage1, "proper@labels": right},
                          task="synth-cls", data=data)


def test_terciles_keep_equal_histories_together(tmp_path):
    assert terciles({f"u{i}": h for i, h in enumerate([1, 2, 3, 4, 5, 6])}) == [
        ("sparsest third", ["u0", "u1"]), ("middle third", ["u2", "u3"]), ("densest third", ["u4", "u5"])]
    assert terciles({"a": 1, "b": 1, "c": 1, "d": 5}) == [("sparsest third", ["a", "b", "c"]), ("densest third", ["d"])]
    assert terciles({"a": 95, "b": 95, "c": 95}) == []  # one length for all: no thirds to compare
    rows = gain_rows(load_results(write_eval_run(
        tmp_path, "flat", {u: (95, g) for u, (_, g) in _users().items()},
        {"stage1": _answers(_users(), lambda i: 1), "proper": _answers(_users(), lambda i: 0)}, task="synth-cls")))
    assert [r["group"] for r in rows] == ["all targets"]


def test_gain_pairs_compare_each_decoding_with_stage_1_decoded_alike():
    methods = ["stage1", "proper", "stage1@labels", "proper@labels", "oppu-mlp", "stage2@labels", "rag",
               "oppu-kv@expected"]
    assert gain_pairs(methods) == [("proper", "stage1"), ("oppu-mlp", "stage1"), ("stage2@labels", "stage1@labels"),
                                   ("proper@labels", "stage1@labels")]


def test_sparse_users_gain_and_dense_users_do_not(tmp_path):
    rows = gain_rows(load_results(_grouped_run(tmp_path)), "main", n=2000)
    got = {(r["method"], r["group"]): r for r in rows}
    assert {m for m, _ in got} == {"stage2", "proper", "oppu-mlp", "proper@labels"}
    sparse, middle, dense, every = (got["proper", g] for g in ("sparsest third", "middle third", "densest third",
                                                                 "all targets"))
    assert [(r["history"], r["users"], r["queries"]) for r in (sparse, middle, dense, every)] == [
        ("2-5", 4, 12), ("20-26", 4, 12), ("60-90", 4, 12), ("2-90", 12, 36)]
    assert sparse["gain"] == pytest.approx(10 / 12) and sparse["ci_low"] > 0.5 and sparse["beyond_noise"]
    assert middle["gain"] == pytest.approx(1 / 3) and middle["ci_low"] == middle["ci_high"]
    assert dense["gain"] == 0 and (dense["ci_low"], dense["ci_high"]) == (0, 0) and not dense["beyond_noise"]
    assert sparse["gain"] > middle["gain"] > dense["gain"]
    # a user's queries go together: sparse users miss 2 or 3 of 3, so the interval is over 4 users
    assert sparse["ci_low"] == pytest.approx(2 / 3) and sparse["ci_high"] == pytest.approx(1.0)
    assert got["oppu-mlp", "sparsest third"]["gain"] == 0 and got["oppu-mlp", "middle third"]["gain"] > 0
    assert got["proper@labels", "sparsest third"]["vs"] == "stage1@labels"


def test_rating_gain_is_the_drop_in_error(tmp_path):
    users = {f"u{i}": (i + 1, ["3", "3"]) for i in range(6)}
    run = write_eval_run(tmp_path, "r", users, {"stage1": {u: ["5", "5"] for u in users},
                                                "proper": {u: ["3", "4"] for u in users}})
    every = next(r for r in gain_rows(load_results(run), n=500) if r["group"] == "all targets")
    assert every["metric"] == "abs_error" and every["gain"] == pytest.approx(1.5) and every["beyond_noise"]


def test_report_has_the_who_gains_table_and_figure(tmp_path):
    main = _grouped_run(tmp_path)
    sparse = _users(history=[1, 1, 2, 2], queries=2)
    low = write_eval_run(tmp_path, "low", sparse, {"stage1": _answers(sparse, lambda i: 2),
                                                   "proper": _answers(sparse, lambda i: 0)},
                         task="synth-cls", data=DataConfig(split="low-resource"))
    out = report([main, low], tmp_path / "rep")
    png = tmp_path / "rep" / "gains_by_history.png"
    assert out["figures"]["gains_by_history"] == str(png) and png.read_bytes()[:8] == PNG
    assert str(tmp_path / "rep" / "gains.csv") in out["files"]
    with open(tmp_path / "rep" / "gains.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:6] == ["task", "run", "kind", "group", "history", "method"]
    lowres = [r for r in rows if r["run"] == "low" and r["group"] == "low-resource split"]
    assert [(r["method"], r["users"], r["queries"], float(r["gain"])) for r in lowres] == [("proper", "4", "8", 1.0)]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Who gains" in md and "![gains_by_history](gains_by_history.png)" in md
    line = next(x for x in md.splitlines() if x.startswith("| synth-cls | main | sparsest third | 2-5 | proper |"))
    assert line.endswith("| 4 | 12 | yes |")
    assert len(json.loads((tmp_path / "rep" / "report.json").read_text())["gains"]) == len(rows)


def test_gains_pool_over_seeds_by_seed_and_user_pairs(tmp_path):
    """Two seeds' main runs: each third pools both seeds' queries; the pairs are (seed, user), so the same
    user ids in two seeds count twice; the seeds report prints the pooled table."""
    from properlm.evaluate.gains import pooled_gain_rows
    from properlm.evaluate.seeds import seeds_report

    grids = {}
    for s in (0, 1):
        grids[s] = tmp_path / f"seed-{s}"
        run = _grouped_run(grids[s])
        report([run], grids[s] / "report", figures=False)
    one = {(r["method"], r["group"]): r for r in gain_rows(load_results(grids[0] / "main"))}
    rows = pooled_gain_rows([load_results(grids[s] / "main") for s in (0, 1)])
    got = {(r["method"], r["group"]): r for r in rows}
    assert got.keys() == one.keys()
    for key, r in got.items():
        assert r["users"] == 2 * one[key]["users"] and r["queries"] == 2 * one[key]["queries"]
        assert r["gain"] == pytest.approx(one[key]["gain"])  # the seeds are alike: the same mean gain
        assert r["run"] == "2 runs pooled"
    assert got["proper", "sparsest third"]["gain"] == pytest.approx(2.5 / 3) and got["proper", "densest third"]["gain"] == 0
    assert got["oppu-mlp", "middle third"]["beyond_noise"] and not got["oppu-mlp", "sparsest third"]["beyond_noise"]
    res = seeds_report(grids, tmp_path / "report")
    assert len(res["gains"]) == len(rows)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "over all seeds" in md and "| 2 runs pooled | sparsest third |" in md
    png = tmp_path / "report" / "gains_by_history.png"
    assert str(png) in res["files"] and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![gains_by_history](gains_by_history.png)" in md
    seeds_report(grids, tmp_path / "bare", figures=False)
    assert not (tmp_path / "bare" / "gains_by_history.png").exists()
