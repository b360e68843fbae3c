"""The chunked cross-entropy against torch's, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import properlm.model.cross_entropy as ce_mod
from properlm.model.cross_entropy import cross_entropy


def _loss_and_grad(fn, logits, target, weights):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, target)
    (loss * weights).sum().backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("chunk", [1 << 20, 64])  # 64 elements: 1 row per chunk at V=50, every row its own chunk
def test_matches_torch_in_float32(monkeypatch, chunk):
    monkeypatch.setattr(ce_mod, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 50, generator=g) * 4
    target = torch.randint(0, 50, (37,), generator=g)
    weights = torch.rand(37, generator=g)  # a non-uniform upstream gradient
    ours = _loss_and_grad(cross_entropy, logits, target, weights)
    ref = _loss_and_grad(lambda x, t: F.cross_entropy(x, t, reduction="none"), logits, target, weights)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    torch.testing.assert_close(ours[0], ref[0], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(ours[1], ref[1], atol=1e-6, rtol=1e-5)


def test_bf16_logits_give_float32_losses_and_a_bf16_gradient():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(9, 3000, generator=g) * 5).bfloat16()
    target = torch.randint(0, 3000, (9,), generator=g)
    weights = torch.ones(9)
    ours = _loss_and_grad(cross_entropy, logits, target, weights)
    ref = _loss_and_grad(lambda x, t: F.cross_entropy(x.float(), t, reduction="none"), logits, target, weights)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.bfloat16
    torch.testing.assert_close(ours[0], ref[0], atol=1e-5, rtol=1e-6)  # same float32 arithmetic
    torch.testing.assert_close(ours[1].float(), ref[1].float(), atol=1e-3, rtol=1e-2)  # bf16 rounding only
    assert ours[1].float().sum(1).abs().max() < 0.02  # softmax - onehot sums to 0 per row


def test_under_autocast_and_with_no_rows():
    logits = torch.randn(4, 11, requires_grad=True)
    target = torch.tensor([0, 3, 10, 5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cross_entropy(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, reduction="none"))
    empty = torch.zeros(0, 11, requires_grad=True)
    out = cross_entropy(empty, torch.zeros(0, dtype=torch.long))
    out.sum().backward()
    assert out.shape == (0,) and empty.grad.shape == (0, 11)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="logits"):
        cross_entropy(torch.zeros(3, 5), torch.zeros(4, dtype=torch.long))
