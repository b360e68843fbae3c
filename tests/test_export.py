"""``properlm export``: PEFT loads the export; OPPU users are exact, PROPER users exact when routing is constant."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from properlm.cli import main
from properlm.errors import UnknownUser
from properlm.export import agreement, export_user

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, h):
    from properlm.evaluate import baselines
    from properlm.evaluate.evaluate import load_targets
    from properlm.train.run import train

    root = tmp_path_factory.mktemp("export")
    cfg = h.small_cfg(data=dict(split="oppu", synth_users=10, n_targets=3), population=dict(max_steps=3),
                      group=dict(max_steps=3), user=dict(max_steps=4, lr=5e-2))
    run_dir = train(cfg, root / "run")
    cfg, task, targets = load_targets(run_dir)
    baselines.train_oppu(cfg, run_dir, "oppu-mlp", task.name, targets)
    return run_dir


def _ids(tok):
    return torch.tensor([tok("Does the user love or hate this post? post: robots again").input_ids])


def _exported(out):
    base = AutoModelForCausalLM.from_pretrained(str(out / "base"))
    return PeftModel.from_pretrained(base, str(out / "adapter")).eval()


def test_an_oppu_user_exports_exactly(run, tmp_path):
    from properlm.evaluate.baselines import load_oppu
    from properlm.store.run import read_config

    user = json.loads((run / "split.json").read_text())["target"][0]
    assert main(["export", "--run", str(run), "--user", user, "--bank", "oppu-mlp", "--out", str(tmp_path / "x")]) == 0
    cfg = json.loads((tmp_path / "x" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and set(cfg["target_modules"]) == {"gate_proj", "up_proj", "down_proj"}
    keys = list(load_file(str(tmp_path / "x" / "adapter" / "adapter_model.safetensors")))
    assert any(k.endswith("mlp.up_proj.lora_A.weight") for k in keys)
    pm, tok = load_oppu(read_config(run), run, "oppu-mlp")
    x = _ids(tok)
    with torch.no_grad():
        pm.bind(lora_users=[user])
        want = pm(x, torch.ones_like(x))
        pm.state.clear()
        got = _exported(tmp_path / "x")(input_ids=x).logits
        base = pm(x, torch.ones_like(x))
    assert (want - base).abs().max() > 1e-4, "the user's LoRA must matter for this to test anything"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_proper_user_folds_exactly_when_routing_is_constant(run, tmp_path):
    """With every router's input terms at zero, each site's gates are one constant vector per user: folding the
    experts with the mean routing weights is then exact, which checks the folding arithmetic itself."""
    from properlm import load_run

    work = tmp_path / "run"
    import shutil

    shutil.copytree(run, work)
    r = load_file(str(work / "user" / "router.safetensors"))
    for k in r:
        if k.endswith("w_text.weight") or k.endswith("w_user.weight"):  # W_x and W_l; W_e e_u stays
            r[k] = torch.zeros_like(r[k])
    save_file(r, str(work / "user" / "router.safetensors"))
    from properlm.io import SUMS, sha256_file  # a deliberate edit: record its checksum, or the load refuses it
    sums = json.loads((work / "user" / SUMS).read_text())
    sums["router.safetensors"] = sha256_file(work / "user" / "router.safetensors")
    (work / "user" / SUMS).write_text(json.dumps(sums))
    user = json.loads((work / "split.json").read_text())["target"][1]
    info = export_user(work, user, tmp_path / "x")
    assert info["kind"] == "folded-mean-routing" and info["rank"] == 3 * 4 + 4
    lm = load_run(work)
    x = _ids(lm.tok)
    want = lm.logits(x, torch.ones_like(x), [user])
    with torch.no_grad():
        got = _exported(tmp_path / "x")(input_ids=x).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_proper_user_with_real_routing_is_close(run, tmp_path):
    user = json.loads((run / "split.json").read_text())["target"][2]
    export_user(run, user, tmp_path / "x")
    prompts = [f"Does the user love, like, dislike or hate this post? post: about {t}." for t in ("jazz", "taxes")]
    got = agreement(run, tmp_path / "x", user, prompts, max_new_tokens=4)
    assert got["prompts"] == 2 and 0.0 <= got["identical"] <= 1.0
    assert 0.0 <= got["mean_kl"] < 0.05, got  # the tiny run's routing varies little over tokens
    with pytest.raises(UnknownUser):
        export_user(run, "nobody", tmp_path / "y")
