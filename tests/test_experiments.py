"""``properlm experiments``: variants reuse the main run's stages, one report over all, resumable."""

from __future__ import annotations

import json

import pytest

from properlm.config import save_config
from properlm.errors import ConfigError
from properlm.experiments import VARIANTS, run_experiments, select, variant_decodings
from tests.conftest import small_cfg

pytestmark = pytest.mark.slow


def test_select_expands_groups_adds_main_and_refuses_unknown_names():
    assert select(None) == list(VARIANTS)
    assert select("experts") == ["main", "experts-2", "experts-8"]
    assert select("low-resource") == ["low-resource"]  # trains everything itself: no main needed
    with pytest.raises(ConfigError, match="unknown variant 'nope'"):
        select("main,nope")


def test_decodings_by_default_main_both_ways_the_other_variants_by_labels_generation_free():
    from properlm.data.tasks import get_task

    cls, rating, gen = get_task("synth-cls"), get_task("LaMP-3"), get_task("synth-gen")
    for task in (cls, rating):
        assert variant_decodings("main", None, task) == ("free", "labels")
        assert variant_decodings("text-router", None, task) == ("labels",)
        assert variant_decodings("text-router", "both", task) == ("free", "labels")
        assert variant_decodings("main", "free", task) == ("free",)
    assert variant_decodings("main", None, gen) == ("free",) == variant_decodings("loramoe", "free", gen)
    with pytest.raises(ConfigError, match="without a label set"):
        variant_decodings("main", "labels", gen)
    with pytest.raises(ConfigError, match="choose from"):
        variant_decodings("main", "beam", cls)


def test_cli_passes_decode_through(monkeypatch, capsys):
    import argparse

    import properlm.experiments as ex

    seen = {}
    def fake(*args, decode=None, **kwargs):
        seen["decode"] = decode
        return {"tables": {}}

    monkeypatch.setattr(ex, "run_experiments", fake)
    parser = argparse.ArgumentParser(prog="properlm")
    ex.register(parser.add_subparsers())
    args = parser.parse_args(["experiments", "--out", "x", "--decode", "labels"])
    assert args.func(args) == 0 and seen == {"decode": "labels"}
    assert parser.parse_args(["experiments", "--out", "x"]).decode is None
    with pytest.raises(SystemExit):
        parser.parse_args(["experiments", "--out", "x", "--decode", "beam"])


def test_variants_reuse_main_stages_and_report_tables_3_and_sweep(tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    save_config(small_cfg(data=dict(synth_users=8, n_targets=2)), cfg_path)
    out = tmp_path / "grid"
    logs: list[str] = []
    res = run_experiments(out, cfg_path, only="no-lora-router,experts-2", log=logs.append)
    main, abl, k2 = out / "main", out / "no-lora-router", out / "experts-2"
    # Reused stages are the main run's bytes; the changed ones are trained anew.
    for f in ("population/adapter_model.safetensors", "group/experts.safetensors"):
        assert (abl / f).read_bytes() == (main / f).read_bytes()
    assert (k2 / "population/adapter_model.safetensors").read_bytes() == (main / "population/adapter_model.safetensors").read_bytes()
    assert (k2 / "group/experts.safetensors").read_bytes() != (main / "group/experts.safetensors").read_bytes()
    assert not (abl / "user/router.safetensors").exists()  # no LoRA-aware router in that ablation
    # The main run answers freely and by label scoring, the other variants by label scoring only.
    evaluated = {d.name: set(json.loads((d / "eval" / "summary.json").read_text())["methods"]) for d in (main, abl, k2)}
    assert {"proper", "stage1", "rag", "proper@labels", "proper@labels-norm", "oppu-mlp@labels"} <= evaluated["main"]
    assert evaluated["no-lora-router"] == evaluated["experts-2"] == {"proper@labels", "proper@labels-norm"}
    assert {"table3", "experts"}.isdisjoint(res["tables"])  # nothing of the variants was generated freely
    t3 = res["tables"]["table3@labels"]["rows"]
    assert [r["variant"] for r in t3] == ["PROPER (full)", "w/ no LoRA-aware router"]
    assert all(r["method"] == "proper@labels" for r in t3)
    assert [r["num_experts"] for r in res["tables"]["experts@labels-norm"]["rows"]] == [2, 3]
    assert [r["method"] for r in res["tables"]["table1"]["rows"]][:3] == ["stage1", "stage2", "proper"]
    assert "@labels)]" in res["tables"]["table1@labels"]["title"]
    assert (out / "report" / "table3@labels.csv").exists() and (out / "report" / "report.md").exists()
    # Resuming: nothing is trained or evaluated again.
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("*/user/user_loras.safetensors")}
    scores = (main / "eval" / "proper" / "scores.json").stat().st_mtime_ns
    res2 = run_experiments(out, cfg_path, only="no-lora-router,experts-2", log=logs.append)
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    assert (main / "eval" / "proper" / "scores.json").stat().st_mtime_ns == scores
    assert res2["tables"]["table3@labels"] == res["tables"]["table3@labels"]


def test_seeds_give_one_grid_each_and_a_report_of_mean_and_sd(tmp_path):
    from properlm.experiments import parse_seeds, run_seeds

    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds(None) is None
    with pytest.raises(ConfigError, match="distinct"):
        parse_seeds("1,1")
    cfg_path = tmp_path / "cfg.yaml"
    save_config(small_cfg(data=dict(synth_users=8, n_targets=2)), cfg_path)
    out = tmp_path / "seeds"
    res = run_seeds(out, [0, 1], cfg_path, only="main", log=lambda m: None, decode="free")
    assert "seed: 1" in (out / "seed-1" / "main" / "config.yaml").read_text()
    golds = [(out / f"seed-{s}" / "main" / "eval" / "golds.json").read_text() for s in (0, 1)]
    assert golds[0] != golds[1]  # a seed draws its own synthetic users
    t1 = {r["method"]: r for r in res["tables"]["table1"]["rows"]}
    per_seed = [{r["method"]: r for r in json.loads((out / f"seed-{s}" / "report" / "report.json").read_text())
                 ["tables"]["table1"]["rows"]} for s in (0, 1)]
    col = next(c for c in res["tables"]["table1"]["columns"] if c.endswith("accuracy"))
    for m, row in t1.items():
        vals = [p[m][col] for p in per_seed]
        assert row[col]["values"] == vals and row[col]["n"] == 2
        assert row[col]["mean"] == pytest.approx(sum(vals) / 2)
        assert row[col]["std"] == pytest.approx(abs(vals[0] - vals[1]) / 2 ** 0.5)
    boot = {b["other"]: b for b in res["bootstrap"]}
    n_queries = sum(len(json.loads((out / f"seed-{s}" / "main" / "eval" / "golds.json").read_text())["golds"])
                    for s in (0, 1))
    assert boot["stage1"]["n"] == n_queries and boot["stage1"]["runs"] == 2
    md = (out / "report" / "report.md").read_text()
    assert "±" in md and "10,000 resamples of (seed, user) pairs" in md
    # Each seed's wall times, kept per seed and combined over the seeds.
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == {"0", "1"} and all(set(t) == {"main"} for t in timings.values())
    assert timings["1"] == json.loads((out / "seed-1" / "timings.json").read_text())
    assert {"population", "group", "user", "eval-free"} <= set(timings["0"]["main"])
    assert res["tables"]["timings"]["rows"][0]["population"]["n"] == 2
    assert "Wall time of the grids:" in md
