"""The grid's wall time per variant and stage: ``OUT/timings.json``, kept across resumed calls, and the
timing table of the report and of the seeds report."""

from __future__ import annotations

import json

import pytest

from properlm.evaluate.report import markdown_table, report
from properlm.evaluate.tables import timing_table
from tests.test_grid_decodings import _seed_grid

_TIMES = {"main": {"population": 10.0, "group": 20.0, "user": 30.0, "eval-free": 5.0, "eval-labels": 1.25},
          "text-router": {"eval-labels": 1.0, "copy": 0.5, "group": 15.0, "user": 25.0}}


def test_timing_table_has_a_column_per_stage_in_running_order_and_the_grids_total():
    t = timing_table(_TIMES)
    assert t["columns"] == ["variant", "copy", "population", "group", "user", "eval-free", "eval-labels", "total"]
    rows = {r["variant"]: r for r in t["rows"]}
    assert list(rows) == ["main", "text-router", "grid total"]
    assert rows["main"]["total"] == 66.25 and "copy" not in rows["main"]
    assert rows["grid total"] == {"variant": "grid total", "copy": 0.5, "population": 10.0, "group": 35.0,
                                  "user": 55.0, "eval-free": 5.0, "eval-labels": 2.25, "total": 107.75}
    assert "| text-router | 0.5 |  | 15.0 | 25.0 |  | 1.0 | 41.5 |" in markdown_table(t)


def test_report_prints_the_timing_table_only_when_given_timings(tmp_path):
    grid = _seed_grid(tmp_path, 0)
    out = report([grid / "main"], tmp_path / "rep", figures=False, timings=_TIMES)
    assert out["tables"]["timings"]["title"].startswith("Wall time of the grid")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| grid total | 0.5 | 10.0 | 35.0 | 55.0 | 5.0 | 2.2 | 107.8 |" in md  # 2.25 and 107.75 to 1 decimal
    assert (tmp_path / "rep" / "timings.csv").exists()
    assert "timings" not in report([grid / "main"], tmp_path / "rep2", figures=False)["tables"]


def test_report_finds_a_grids_timings_beside_its_runs(tmp_path):
    """``OUT/timings.json`` gives each run ``OUT/<variant>`` its entry; other runs and bad entries give none."""
    from properlm.evaluate.report import grid_timings

    grid = tmp_path / "grid"
    grid.mkdir()
    (grid / "timings.json").write_text(json.dumps({**_TIMES, "broken": {"user": "slow"}}))
    assert grid_timings([grid / "main", grid / "broken", grid / "absent", {"methods": {}}]) == {"main": _TIMES["main"]}
    assert grid_timings([grid / "text-router"]) == {"text-router": _TIMES["text-router"]}
    assert grid_timings([tmp_path / "elsewhere" / "main"]) is None


def test_seeds_report_gives_mean_times_and_each_seeds_wall_time(tmp_path):
    from properlm.evaluate.seeds import seeds_report

    grids = {}
    for s, scale in ((0, 1.0), (1, 3.0)):
        grids[s] = _seed_grid(tmp_path, s)
        report([grids[s] / "main"], grids[s] / "report", figures=False,
               timings={"main": {"population": 10.0 * scale, "user": 2.0}})
    res = seeds_report(grids, tmp_path / "report")
    rows = {r["variant"]: r for r in res["tables"]["timings"]["rows"]}
    assert rows["main"]["population"]["mean"] == 20.0 and rows["main"]["user"]["std"] == 0.0
    assert res["wall_seconds"] == {"0": 12.0, "1": 32.0}
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| main | 20.0 ± 14.1 | 2.0 ± 0.0 | 22.0 ± 14.1 |" in md
    assert "Wall time of the grids: 44.0 s in all (seed 0: 12.0 s, seed 1: 32.0 s)." in md


class Killed(Exception):
    """Stands for the grid being stopped part way."""


@pytest.mark.slow
def test_a_killed_grid_resumes_without_retraining_and_keeps_the_first_calls_times(tmp_path, monkeypatch):
    import properlm.train.run as run_mod
    from properlm.config import save_config
    from properlm.experiments import run_experiments
    from tests.conftest import small_cfg

    cfg_path = tmp_path / "cfg.yaml"
    save_config(small_cfg(data=dict(synth_users=8, n_targets=2)), cfg_path)
    out = tmp_path / "grid"
    real = run_mod.train

    def stopped_at_k2_stage_3(cfg, run_dir, stages=run_mod.STAGES, resume=False):
        if run_dir.name == "experts-2" and tuple(stages) == ("user",):
            raise Killed
        return real(cfg, run_dir, stages=stages, resume=resume)

    monkeypatch.setattr(run_mod, "train", stopped_at_k2_stage_3)
    with pytest.raises(Killed):
        run_experiments(out, cfg_path, only="experts-2", log=lambda m: None)
    first = json.loads((out / "timings.json").read_text())
    assert set(first["main"]) == {"population", "group", "user", "oppu-kv", "oppu-mlp", "eval-free", "eval-labels"}
    assert set(first["experts-2"]) == {"copy", "group", "user"}  # user: the interrupted call's share
    assert all(v > 0 for v in first["main"].values())
    files = [*out.glob("main/*/*.safetensors"), *out.glob("main/eval/*/predictions.json"),
             *out.glob("main/baselines/*/baseline.json"), *out.glob("main/store/oppu-*/**/*"),
             *out.glob("experts-2/group/*.safetensors"), *out.glob("experts-2/store/emb/**/*")]
    stamp = {p: p.stat().st_mtime_ns for p in files if p.is_file()}
    assert not (out / "experts-2" / "user").exists()

    monkeypatch.setattr(run_mod, "train", real)
    res = run_experiments(out, cfg_path, only="experts-2", log=lambda m: None)
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp  # nothing trained or evaluated again
    after = json.loads((out / "timings.json").read_text())
    assert after["main"] == first["main"]
    for stage in ("copy", "group"):
        assert after["experts-2"][stage] == first["experts-2"][stage]
    assert after["experts-2"]["user"] > first["experts-2"]["user"] and "eval-labels" in after["experts-2"]
    assert "eval-free" not in after["experts-2"]  # label scoring only, by default
    assert res["timings"] == after
    rows = {r["variant"]: r for r in res["tables"]["timings"]["rows"]}
    assert rows["grid total"]["total"] == pytest.approx(sum(sum(t.values()) for t in after.values()), abs=1e-2)
    # Resuming once more changes no time at all.
    run_experiments(out, cfg_path, only="experts-2", log=lambda m: None)
    assert json.loads((out / "timings.json").read_text()) == after
    # `properlm report` on the grid's runs prints the same timing table as the grid's own report.
    from properlm.cli import main

    assert main(["report", str(out / "main"), str(out / "experts-2"), "--out", str(tmp_path / "rep"), "--no-figures"]) == 0
    mine = json.loads((tmp_path / "rep" / "report.json").read_text())["tables"]["timings"]
    assert mine == res["tables"]["timings"]
