"""bf16 copies of frozen weights during training, and the attention switch."""

from __future__ import annotations

import pytest
import torch

from properlm.errors import ModelError
from properlm.model.base import load_base
from properlm.model.proper import ProperModel
from properlm.model.device import autocast
from properlm.model.precision import frozen_bf16


def test_frozen_bf16_gives_autocast_numbers_and_restores_float32(fresh_lm, tok):
    pm = ProperModel(fresh_lm())
    pm.add_users(["a", "b"], r=2, alpha=4, lora_aware_router=False)
    torch.nn.init.normal_(pm.user_loras.params["layers.0.mlp.up_proj.lora_B"])
    ids = tok(["hello there", "a longer input text here"], return_tensors="pt", padding=True)
    pm.bind(lora_users=["a", "b"])
    with autocast(True):
        ref = pm(ids["input_ids"], ids["attention_mask"])
    before = {n: p.detach().clone() for n, p in pm.lm.named_parameters()}
    head = pm.lm.get_output_embeddings()
    tied = head.weight is pm.lm.get_input_embeddings().weight
    with frozen_bf16(pm.lm, True) as n_swapped:
        assert n_swapped == 7 * len(pm.lm.get_decoder().layers) + 1  # q,k,v,o + the 3 FFN bases per layer, LM head
        assert pm.sites["layers.0.mlp.up_proj"].base.weight.dtype == torch.bfloat16
        assert pm.lm.get_output_embeddings().weight.dtype == torch.bfloat16
        assert pm.lm.get_input_embeddings().weight.dtype == torch.float32  # a tied embedding stays float32
        with autocast(True):
            out = pm(ids["input_ids"], ids["attention_mask"])
    assert torch.equal(out, ref)
    assert pm.lm.get_output_embeddings() is head
    assert (head.weight is pm.lm.get_input_embeddings().weight) == tied
    for n, p in pm.lm.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n
    with frozen_bf16(pm.lm, False) as n_swapped:
        assert n_swapped == 0


def test_eager_attention_matches_sdpa_and_bad_choice_is_refused(tok):
    sdpa, _ = load_base("tiny-random")
    eager, _ = load_base("tiny-random", attention="eager")
    assert eager.config._attn_implementation == "eager"
    ids = tok(["hello there", "a longer input text here"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = sdpa(**ids).logits
        b = eager(**ids).logits
    m = ids["attention_mask"].bool()
    torch.testing.assert_close(a[m], b[m], atol=1e-4, rtol=1e-4)
    with pytest.raises(ModelError, match="attention"):
        load_base("tiny-random", attention="flash")
