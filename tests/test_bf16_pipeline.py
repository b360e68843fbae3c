"""The whole pipeline with the base in bf16 and autocast on, on the CPU, as a GPU run holds it.

``base_dtype=bfloat16 bf16=true`` loads the frozen base weights in bfloat16 (on a
GPU, ``base_dtype=auto`` does the same), while properlm's own layers (routers,
experts, user LoRAs) keep float32 weights and meet the base's bf16 activations
under autocast. A path that runs the model without autocast fails there with a
dtype error ("expected m1 and m2 to have the same dtype"); this test walks every
command a user runs after training: evaluate (every method, free and label
decoding), report with figures, users add and delete, one served request, export.
The tests' conftest sets ``PROPERLM_CPU_BF16=1``, so autocast is on whatever this
CPU computes natively.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_serve import RemoteServer  # the live-server harness (tests/ is on the path)

from properlm.cli import main

pytestmark = pytest.mark.slow

BF16 = ["base_model=tiny-random", "progress=false", "data.synth_users=16", "data.n_targets=4",
        "population.max_steps=3", "group.max_steps=3", "user.max_steps=3", "checkpoint_every=2",
        "bf16=true", "base_dtype=bfloat16"]


def _losses(run, stage):
    return [json.loads(line)["loss"] for line in (run / "logs" / f"{stage}.jsonl").read_text().splitlines()
            if '"loss"' in line]


def test_every_command_runs_with_a_bf16_base(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--all", "--out", str(run), *BF16]) == 0
    for stage in ("population", "group", "user"):
        losses = _losses(run, stage)
        assert losses and all(math.isfinite(x) for x in losses), stage

    from properlm import load_run
    lm = load_run(run)
    decoder = lm.model.lm.get_decoder()
    assert decoder.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16  # the base really is bf16
    del lm

    assert main(["evaluate", "--run", str(run), "--quiet", "--max-new-tokens", "3"]) == 0
    assert main(["evaluate", "--run", str(run), "--quiet", "--decode", "labels"]) == 0
    summary = json.loads((run / "eval" / "summary.json").read_text())["methods"]
    for method in ("stage1", "stage2", "proper", "rag", "pag", "oppu-kv", "oppu-mlp"):
        for name in (method, f"{method}@labels"):
            assert name in summary, name
            assert summary[name]["n_queries"] > 0
            assert all(math.isfinite(v) for v in summary[name]["metrics"].values()), name

    report = tmp_path / "report"
    assert main(["report", str(run), "--out", str(report)]) == 0  # its figures run the model (routing)
    for png in ("tsne.png", "expert_density.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

    split = json.loads((run / "split.json").read_text())
    newcomer, target = split["train"][0], split["target"][0]
    assert main(["users", "add", "--run", str(run), "--users", newcomer]) == 0
    assert main(["generate", "--run", str(run), "--user", newcomer, "--max-new-tokens", "2", "hello"]) == 0
    assert main(["users", "delete", "--run", str(run), "--users", newcomer]) == 0
    assert main(["generate", "--run", str(run), "--user", newcomer, "--max-new-tokens", "2", "hello"]) == 2

    srv = RemoteServer(run)
    try:
        raw = srv.client().completions.with_raw_response.create(model=target, prompt="hello", max_tokens=3,
                                                                temperature=0)
        body = json.loads(raw.text)
        assert raw.headers["x-properlm-model"] == "user-lora" and body["usage"]["completion_tokens"] >= 1
    finally:
        srv.stop()

    out = tmp_path / "export"
    assert main(["export", "--run", str(run), "--user", target, "--out", str(out)]) == 0  # folds mean routing
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(str(out / "base"))
    assert base.get_decoder().layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    peft = PeftModel.from_pretrained(base, str(out / "adapter"))
    assert any("lora_A" in n for n, _ in peft.named_parameters())
