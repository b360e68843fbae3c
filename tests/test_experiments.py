"""``properlm experiments``: variants reuse the main run's stages, one report over all, resumable."""

from __future__ import annotations

import pytest

from properlm.config import save_config
from properlm.errors import ConfigError
from properlm.experiments import VARIANTS, run_experiments, select
from tests.conftest import small_cfg

pytestmark = pytest.mark.slow


def test_select_expands_groups_adds_main_and_refuses_unknown_names():
    assert select(None) == list(VARIANTS)
    assert select("experts") == ["main", "experts-2", "experts-8"]
    assert select("low-resource") == ["low-resource"]  # trains everything itself: no main needed
    with pytest.raises(ConfigError, match="unknown variant 'nope'"):
        select("main,nope")


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
    t3 = res["tables"]["table3"]["rows"]
    assert [r["variant"] for r in t3] == ["PROPER (full)", "w/ no LoRA-aware router"]
    assert all(r["method"] == "proper" for r in t3)
    assert [r["num_experts"] for r in res["tables"]["experts"]["rows"]] == [2, 3]
    assert set(res["tables"]["table1"]["rows"][0]) >= {"method"}
    assert (out / "report" / "table3.csv").exists() and (out / "report" / "report.md").exists()
    # Resuming: nothing is trained or evaluated again.
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("*/user/user_loras.safetensors")}
    scores = (main / "eval" / "proper" / "scores.json").stat().st_mtime_ns
    res2 = run_experiments(out, cfg_path, only="no-lora-router,experts-2", log=logs.append)
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    assert (main / "eval" / "proper" / "scores.json").stat().st_mtime_ns == scores
    assert res2["tables"]["table3"] == res["tables"]["table3"]
