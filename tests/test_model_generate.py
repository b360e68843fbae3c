"""Batched multi-user generation: each row decodes as if alone, and a user's LoRA personalizes it."""

from __future__ import annotations

import pytest
import torch

from properlm.model.generate import generate
from properlm.model.prompts import encode_prompt
from properlm.train.user import train_users

# Same prompt for several users, different lengths (left padding), rows with and without users.
ROWS = [  # (prompt index, LoRA user, stage-2 embedding user)
    (0, "ta", None), (0, "tb", "ua"), (0, None, "ub"), (0, None, None), (3, "ta", None), (5, "tb", "uc"), (6, None, None),
]


def _prompts(h):
    long_tail = " It went on and on about it, with many more words than the others."
    return [h.prompt(i) + (long_tail if i == 3 else "") for i, _, _ in ROWS]


@torch.no_grad()
def first_step_logits(pm, tok, prompts, lora_users, emb_users) -> torch.Tensor:
    """Next-token logits (B, V) after left-padded prompts, as ``generate`` computes them."""
    enc = [encode_prompt(tok, p, 512) for p in prompts]
    t = max(len(e) for e in enc)
    ids = torch.full((len(enc), t), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(enc), t), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, t - len(e):] = torch.tensor(e)
        mask[i, t - len(e):] = 1
    pm.bind(emb_users=emb_users, lora_users=lora_users)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = pm.lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
    pm.state.clear()
    return out


@pytest.mark.parametrize("lora_aware_router", [True, False], ids=["lora-aware-router", "stage2-router"])
def test_batched_generation_equals_each_row_alone(group_model, tok, h, lora_aware_router):
    pm = group_model()
    h.add_random_users(pm, ["ta", "tb"], lora_aware_router=lora_aware_router)
    prompts = _prompts(h)
    lora = [r[1] for r in ROWS]
    emb = [r[2] for r in ROWS]

    batched = first_step_logits(pm, tok, prompts, lora, emb)
    alone = torch.cat([first_step_logits(pm, tok, [p], [l], [e]) for p, l, e in zip(prompts, lora, emb)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    # The rows of prompt 0 differ by user only, and every user changes the outputs.
    same_prompt = batched[:4]
    for i in range(4):
        for j in range(i + 1, 4):
            if lora_aware_router and ROWS[i][1] == ROWS[j][1]:
                continue  # the LoRA-aware router ignores stage-2 embeddings: rows 2 and 3 are the same model
            assert (same_prompt[i] - same_prompt[j]).abs().max() > 1e-3, (i, j)

    out = generate(pm, tok, prompts, lora_users=lora, emb_users=emb, max_new_tokens=8)
    one_by_one = [generate(pm, tok, [p], lora_users=[l], emb_users=[e], max_new_tokens=8)[0]
                  for p, l, e in zip(prompts, lora, emb)]
    assert out == one_by_one
    assert generate(pm, tok, prompts, lora_users=lora, emb_users=emb, max_new_tokens=8, batch_size=3) == out
    assert not pm.state.user_lora and not pm.state.user_emb, "generate leaves no users bound"


def test_trained_user_lora_personalizes_generation(group_model, tok, h, tmp_path):
    """Two users answer the same prompts differently; after stage 3 each row gets its own user's answer."""
    pm = group_model(head_scale=10)
    ex = h.make_examples({"ta": "love", "tb": "hate"}, n=2)
    p = [ex[0].prompt] * 3
    cfg = h.small_cfg(user=dict(max_steps=None, epochs=20, per_user_batch=2))
    train_users(cfg, tmp_path, pm, tok, ex)
    after = first_step_logits(pm, tok, p, ["ta", "tb", None], None)
    assert (after[0] - after[2]).abs().max() > 1.0, "a trained user LoRA must change the outputs"
    assert (after[0] - after[1]).abs().max() > 1.0
    out = generate(pm, tok, p, lora_users=["ta", "tb", None], max_new_tokens=4)
    assert out[:2] == ["love", "hate"], out  # and it stops at the end-of-turn token
