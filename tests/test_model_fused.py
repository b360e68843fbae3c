"""The fused inference path of ProperLinear and the decode batch's bound users.

Inference (autograd off, no dropout) computes each wrapped linear in three matmuls
(the base; every A with the router's text rows; every B) and a decode batch reads
its rows' users from the banks only when rows join. These tests hold the fused path
to the training path's numbers (same greedy tokens, logits within float32 / bf16
rounding), count the matmuls and the bank reads, and check that cached weights
follow every way the weights change.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from properlm.model.decoding import DecodeBatch, Row
from properlm.model.prompts import encode_prompt

MATMULS = {"linear", "matmul", "mm", "bmm", "baddbmm", "addmm", "einsum", "__matmul__"}


class CountMatmuls(TorchFunctionMode):
    """Counts the matmul-like torch calls made inside it."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in MATMULS:
            self.n += 1
        return func(*args, **(kwargs or {}))


def _stage3(group_model, h, users=("ta", "tb", "tc")):
    pm = group_model()
    h.add_random_users(pm, list(users))
    return pm


def _decode(pm, tok, h, rows, steps=6, bf16=False, fuse=True):
    """Greedy tokens per row and the logits of every step (steps, B, V)."""
    pm.state.fuse = fuse
    try:
        b = DecodeBatch(pm, tok.pad_token_id, bf16)
        b.add([Row(i, encode_prompt(tok, h.prompt(i), 512), lora, emb) for i, (lora, emb) in enumerate(rows)])
        tokens, logits = [[] for _ in rows], []
        for _ in range(steps):
            logits.append(b.next_logits.clone())
            picks = [int(t) for t in b.next_logits.argmax(-1)]
            for out, t in zip(tokens, picks):
                out.append(t)
            b.step(picks)
        return tokens, torch.stack(logits)
    finally:
        pm.state.fuse = True


ROWS = {
    "one user": [("ta", "ua")],
    "another user, no embedding": [("tb", None)],
    "one user, three rows": [("tc", "ub")] * 3,
    "mixed users": [("ta", "ua"), ("tb", "ub"), (None, "uc"), (None, None), ("tc", None)],
    "one LoRA, different embeddings": [("ta", None), ("ta", "ub")],
    "no LoRA": [(None, "ua"), (None, None)],
}


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
@pytest.mark.parametrize("rows", list(ROWS), ids=list(ROWS))
def test_fused_decoding_gives_the_training_paths_tokens(group_model, tok, h, rows, bf16):
    pm = _stage3(group_model, h)
    fused, lf = _decode(pm, tok, h, ROWS[rows], bf16=bf16)
    plain, lp = _decode(pm, tok, h, ROWS[rows], bf16=bf16, fuse=False)
    assert fused == plain
    # float32: summation order only; bf16: the logits of bf16 activations, a few bf16 ulps
    torch.testing.assert_close(lf, lp, atol=2e-2 if bf16 else 2e-6, rtol=0)


@pytest.mark.parametrize("kind", ["stage 2 (user-aware router)", "user LoRA only", "stage 3 without the LoRA-aware router"])
def test_fused_decoding_of_the_other_models(group_model, fresh_lm, tok, h, kind):
    from properlm.model.proper import ProperModel

    if kind.startswith("stage 2"):
        pm, rows = group_model(), [(None, "ua"), (None, "ub"), (None, None)]
    elif kind == "user LoRA only":
        pm = ProperModel(fresh_lm())
        h.add_random_users(pm, ["ta", "tb"], lora_aware_router=False)
        rows = [("ta", None), ("tb", None), (None, None)]
    else:
        pm = group_model()
        h.add_random_users(pm, ["ta", "tb"], lora_aware_router=False)
        rows = [("ta", "ua"), ("tb", None), (None, "ub")]
    for some in (rows, rows[:1]):
        fused, lf = _decode(pm, tok, h, some)
        plain, lp = _decode(pm, tok, h, some, fuse=False)
        assert fused == plain
        torch.testing.assert_close(lf, lp, atol=2e-6, rtol=0)


def test_a_forward_pass_runs_three_more_matmuls_per_wrapped_linear(group_model, fresh_lm, tok, h):
    """Counted on the second pass of one binding (the first derives what the binding keeps)."""
    pm = _stage3(group_model, h)
    b = h.batch(tok, h.make_examples({"u": "love"}, n=2))

    def count(model, lora=None, emb=None, shared=False, fuse=True):
        if model is pm:
            pm.state.fuse = fuse
            pm.bind(lora_users=lora, emb_users=emb)
            pm.state.lora_shared = shared
        with torch.no_grad():
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            with CountMatmuls() as m:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        pm.state.clear()
        pm.state.fuse = True
        return m.n

    sites, plain = len(pm.sites), count(fresh_lm())
    # one user: [A_1..A_K; A_u; router] on x, a 0/1 matmul spreading the gates, [B_1..B_K, B_u]
    assert count(pm, ["ta", "ta"], ["ua", "ua"], shared=True) == plain + 3 * sites
    # rows of different users: also A_u and B_u by bmm and the router's W_l (A_u x)
    assert count(pm, ["ta", "tb"], ["ua", None]) == plain + 6 * sites
    # the training path: the user's A and B, the router's text, embedding and LoRA terms, the experts' A and B
    assert count(pm, ["ta", "tb"], ["ua", None], fuse=False) == plain + 7 * sites


def _logits(pm, tok, h, lora, emb):
    b = h.batch(tok, h.make_examples({"u": "love"}, n=2))
    with torch.no_grad():
        pm.bind(lora_users=lora, emb_users=emb)
        try:
            return pm(b["input_ids"], b["attention_mask"])
        finally:
            pm.state.clear()


def _unfused(pm, tok, h, lora, emb):
    pm.state.fuse = False
    try:
        return _logits(pm, tok, h, lora, emb)
    finally:
        pm.state.fuse = True


@pytest.mark.parametrize("change", ["in place", "load_stage_state", ".data swap", "new router"])
def test_cached_weights_follow_changed_weights(group_model, tok, h, change):
    pm = _stage3(group_model, h)
    lora, emb = ["ta", "tb"], ["ua", None]
    before = _logits(pm, tok, h, lora, emb)
    with torch.no_grad():
        if change == "in place":                              # an optimizer step writes in place
            for s in pm.sites.values():
                s.experts.lora_B.mul_(-2.0)
                s.router.w_user.weight.add_(0.5)
        elif change == "load_stage_state":                    # another stage's routers loaded
            state = pm.stage_state(("router",))
            pm.load_stage_state({k: v.neg() if k.endswith("w_text.weight") else v for k, v in state.items()})
        elif change == ".data swap":                          # as precision.frozen_bf16 and Module.to do
            for s in pm.sites.values():
                s.experts.lora_A.data = s.experts.lora_A.data.flip(0).clone()
        else:                                                 # stage 3 built again on a stage-2 router
            for s in pm.sites.values():
                s.router.w_text.weight.mul_(3.0)
            pm.add_user_lora(4, 8, lora_aware_router=True)
    after = _logits(pm, tok, h, lora, emb)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, _unfused(pm, tok, h, lora, emb), atol=2e-6, rtol=0)


def test_weights_are_checked_once_per_binding(group_model, tok, h):
    """Within one binding the weights are those of its first pass; the next binding sees a change."""
    pm = _stage3(group_model, h)
    b = h.batch(tok, h.make_examples({"u": "love"}, n=2))
    pm.bind(lora_users=["ta", "tb"], emb_users=["ua", None])
    with torch.no_grad():
        first = pm(b["input_ids"], b["attention_mask"])
        for s in pm.sites.values():
            s.experts.lora_B.mul_(-2.0)
        assert torch.equal(pm(b["input_ids"], b["attention_mask"]), first)
    pm.state.clear()
    after = _logits(pm, tok, h, ["ta", "tb"], ["ua", None])
    assert (after - first).abs().max() > 1e-3
    torch.testing.assert_close(after, _unfused(pm, tok, h, ["ta", "tb"], ["ua", None]), atol=2e-6, rtol=0)


def test_a_rebind_reads_a_replaced_lora(group_model, tok, h):
    pm = _stage3(group_model, h)
    before = _logits(pm, tok, h, ["ta", "ta"], [None, None])
    i = pm.user_loras.index("ta")
    pm.user_loras.set_row_state("ta", {"params": {k: v[i] * 2 for k, v in pm.user_loras.params.items()}})
    after = _logits(pm, tok, h, ["ta", "ta"], [None, None])
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, _unfused(pm, tok, h, ["ta", "ta"], [None, None]), atol=2e-6, rtol=0)


def test_training_keeps_the_training_path(group_model, tok, h):
    """With autograd on, or with dropout on, a forward pass is the training path's, bit for bit."""
    from properlm.model.layers import lora_dropout
    from properlm.model.proper import completion_nll

    pm = _stage3(group_model, h)
    for s in pm.sites.values():
        s.router.w_text.weight.requires_grad_(True)
    b = h.batch(tok, h.make_examples({"ta": "love", "tb": "hate"}, n=2))

    def step(fuse: bool, dropout: float = 0.0, grad: bool = True):
        pm.state.fuse = fuse
        for s in pm.sites.values():
            s.dropout = lora_dropout(dropout)
            s.router.w_text.weight.grad = None
        pm.train(dropout > 0)
        torch.manual_seed(0)
        bound = pm.bind(lora_users=["ta", "ta", "tb", "tb"], requires_grad=grad)
        with torch.set_grad_enabled(grad), CountMatmuls() as m:
            nll, _ = completion_nll(pm.lm, b["input_ids"], b["attention_mask"], b["labels"])
            if grad:
                nll.sum().backward()
        fused = bool(pm.state.cache)                              # the fused path caches what it derives
        pm.state.clear()
        pm.state.fuse = True
        grads = [bound.lora_leaves[k].grad for k in sorted(bound.lora_leaves)] if grad else []
        return nll.detach(), grads, m.n, fused

    nll, grads, n, fused = step(True)
    nll0, grads0, n0, _ = step(False)
    assert torch.equal(nll, nll0) and n == n0 and not fused
    assert all(g is not None and torch.equal(g, g0) for g, g0 in zip(grads, grads0))
    nll, _, n, fused = step(True, dropout=0.1, grad=False)        # no autograd, but dropout: training path
    nll0, _, n0, _ = step(False, dropout=0.1, grad=False)
    assert torch.equal(nll, nll0) and n == n0 and not fused
    assert step(True, grad=False)[3]                              # eval mode, no autograd: fused
