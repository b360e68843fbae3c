"""Device and precision: autocast follows the model's device, hot paths put every tensor on it, dtypes load as asked.

CI has no GPU; these tests pin down on the CPU what would break on one. The
``gpu`` tests at the end run only where CUDA is available (``scripts/gpu_check.py``
runs them with the pipeline on a lent GPU).
"""

from __future__ import annotations

import pytest
import torch

import properlm.model.device as device_mod
from properlm.errors import ProperError
from properlm.model.base import attention_for, load_base
from properlm.model.device import autocast, base_dtype, device_of, resolve_device
from properlm.model.generate import generate
from properlm.train.user import train_users


def test_resolve_device_and_dtypes(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(device_mod, "native_bf16", lambda kind: True)  # a bf16 GPU
    assert base_dtype("auto", bf16=True, device=cuda) == torch.bfloat16   # 7B in 14 GB, not 28
    assert base_dtype("auto", bf16=True, device=cpu) == torch.float32     # CPU: bf16 copies while training
    assert base_dtype("auto", bf16=False, device=cuda) == torch.float32
    assert base_dtype("bfloat16", bf16=True, device=cpu) == torch.bfloat16   # a GPU run's weights, on the CPU
    # A bf16 base needs autocast: properlm's float32 layers would meet bf16 activations without it.
    with pytest.raises(ProperError, match="bf16=true"):
        base_dtype("bfloat16", bf16=False, device=cpu)
    monkeypatch.setattr(device_mod, "native_bf16", lambda kind: False)
    with pytest.raises(ProperError, match="PROPERLM_CPU_BF16=1"):
        base_dtype("bfloat16", bf16=True, device=cpu)
    monkeypatch.setattr(device_mod, "native_bf16", lambda kind: True)
    assert attention_for("auto", cpu) == "eager" and attention_for("auto", cuda) == "sdpa"
    assert attention_for("sdpa", cpu) == "sdpa"


def test_bf16_only_where_the_hardware_computes_it(monkeypatch, capsys, tiny_base):
    """On a CPU or GPU without native bf16 (emulated: ~45x slower than float32 on an AVX2 CPU),
    ``bf16: true`` computes in float32 and says so once; PROPERLM_CPU_BF16 overrides the check."""
    from properlm.model.precision import frozen_bf16

    monkeypatch.setattr(device_mod, "native_bf16", lambda kind: False)
    device_mod._say_float32.cache_clear()
    cpu = torch.device("cpu")
    with autocast(True, cpu):
        assert not torch.is_autocast_enabled("cpu")
    lm = tiny_base[0]
    with frozen_bf16(lm, True) as swapped:
        assert swapped == 0 and {p.dtype for p in lm.parameters()} == {torch.float32}
    assert base_dtype("auto", bf16=True, device=torch.device("cuda")) == torch.float32  # a pre-Ampere GPU
    err = capsys.readouterr().err
    assert err.count("no native bfloat16") == 2 and "float32" in err  # once per device type
    monkeypatch.setattr(device_mod, "native_bf16", lambda kind: True)
    with autocast(True, cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast(False, cpu):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.undo()
    for forced, want in (("1", True), ("0", False)):
        monkeypatch.setenv("PROPERLM_CPU_BF16", forced)
        device_mod.native_bf16.cache_clear()
        assert device_mod.native_bf16("cpu") is want
    monkeypatch.delenv("PROPERLM_CPU_BF16")
    device_mod.native_bf16.cache_clear()
    assert device_mod.native_bf16("cpu") == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    monkeypatch.setenv("PROPERLM_CPU_BF16", "1")  # as the suite runs (conftest)
    device_mod.native_bf16.cache_clear()


def test_base_model_loads_in_the_asked_dtype():
    lm, _ = load_base("tiny-random", dtype=torch.bfloat16)
    assert {p.dtype for p in lm.parameters()} == {torch.bfloat16}
    assert device_of(lm) == torch.device("cpu")


def test_autocast_follows_the_model_not_the_machine(group_model, tok, h, tmp_path, monkeypatch):
    """On a machine with CUDA, a model kept on the CPU still trains under CPU autocast (bf16 frozen weights):
    choosing autocast's device from torch.cuda.is_available() made this a dtype mismatch."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = h.small_cfg(bf16=True, user=dict(max_steps=2))
    pm = group_model()
    train_users(cfg, tmp_path, pm, tok, h.make_examples({"ta": "love", "tb": "hate"}, n=2))
    with autocast(True, device_of(pm)):
        x = torch.ones(2, 2) @ torch.ones(2, 2)
    assert x.dtype == torch.bfloat16


def test_hot_paths_create_no_tensor_without_a_device(group_model, tok, h, tmp_path):
    """With torch's default device set to 'meta', any tensor created without an explicit device lands on meta
    and the first op mixing it with the model's CPU tensors fails. A training step and a generation pass."""
    pm = group_model()
    h.add_random_users(pm, ["ta", "tb"])
    cfg = h.small_cfg(user=dict(max_steps=2, dropout=0.05))
    ex = h.make_examples({"ta": "love", "tb": "hate"}, n=2)
    torch.set_default_device("meta")
    try:
        train_users(cfg, tmp_path, pm, tok, ex)
        out = generate(pm, tok, [ex[0].prompt, ex[1].prompt], lora_users=["ta", None], emb_users=["ua", None],
                       max_new_tokens=2)
    finally:
        torch.set_default_device(None)
    assert len(out) == 2


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
def test_tiny_pipeline_on_the_gpu_in_bf16(tmp_path, h):
    """The three stages, a user added and a mixed-user generation, on CUDA with bf16 base weights."""
    from properlm import load_run
    from properlm.train.run import train
    from properlm.train.users import add_users

    cfg = h.small_cfg(bf16=True, device="cuda", population=dict(max_steps=3), group=dict(max_steps=3),
                      user=dict(max_steps=3))
    run = train(cfg, tmp_path / "run")
    split = __import__("json").loads((run / "split.json").read_text())
    add_users(run, [split["train"][0]])
    lm = load_run(run)
    assert device_of(lm.model).type == "cuda"
    assert {p.dtype for n, p in lm.model.lm.named_parameters() if ".base." in n} == {torch.bfloat16}
    out = lm.generate(["hello", "there"], [split["target"][0], split["train"][0]], max_new_tokens=3)
    assert len(out) == 2
