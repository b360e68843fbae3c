"""The FFN layer pieces on their own: dropout mask, fused expert sum, autocast path."""

from __future__ import annotations

import pytest
import torch

from properlm.model.layers import GroupExperts, LoraDropout, ProperLinear, RoutingState


@pytest.mark.parametrize("p,bits", [(0.05, 8), (0.1, 8), (0.01, 16), (0.3, 8)])
def test_lora_dropout_drops_p_and_keeps_the_mean(p, bits):
    d = LoraDropout(p).train()
    assert d.bits == bits and abs(d.p_used - p) <= 0.02 * p
    x = torch.ones(400, 1001)  # odd element count: the uniforms-per-draw split must cover every element
    y = d(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - d.p_used) < 4 * (p * (1 - p) / x.numel()) ** 0.5 + 1e-4, (dropped, d.p_used)
    assert abs(y.mean().item() - 1.0) < 0.005
    values = torch.unique(y).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - d.p_used), rel=1e-6)


def test_lora_dropout_masks_are_independent_across_positions():
    """Neighbouring elements come from the bytes of one draw: they must not be correlated."""
    d = LoraDropout(0.3).train()
    keep = (d(torch.ones(200_000)) != 0).float()
    a, b = keep[:-1], keep[1:]
    corr = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
    assert abs(corr.item()) < 0.01
    q = (keep.view(-1, 4) != 0).float().mean(0)  # each byte position of a draw drops at the same rate
    assert (q - keep.mean()).abs().max() < 0.01


def test_lora_dropout_is_seeded_identity_in_eval_and_masks_gradients():
    d = LoraDropout(0.3).train()
    x = torch.randn(8, 16, 32, requires_grad=True)
    torch.manual_seed(0)
    a = d(x)
    torch.manual_seed(0)
    b = d(x)
    assert torch.equal(a, b)
    a.sum().backward()
    assert torch.equal(x.grad == 0, a == 0)  # no gradient through dropped entries
    assert torch.equal(d.eval()(x), x)
    with pytest.raises(ValueError):
        LoraDropout(1.0)


def test_experts_sum_into_out_equals_the_plain_sum():
    torch.manual_seed(0)
    ex = GroupExperts(12, 10, num_experts=3, r=2, alpha=4)
    torch.nn.init.normal_(ex.lora_B)
    x = torch.randn(2, 5, 12)
    gates = torch.softmax(torch.randn(2, 5, 3), -1)
    out = torch.randn(2, 5, 10)
    ref = out + sum(gates[..., k:k + 1] * ex.scaling * (x @ ex.lora_A[2 * k:2 * k + 2].T @ ex.lora_B[:, 2 * k:2 * k + 2].T)
                    for k in range(3))
    torch.testing.assert_close(ex(x, gates, out=out), ref)
    torch.testing.assert_close(ex(x, gates), ref - out)


def test_autocast_path_matches_fp32_within_bf16_error():
    torch.manual_seed(0)
    state = RoutingState()
    lin = ProperLinear(torch.nn.Linear(16, 24, bias=False), "s", state)
    lin.add_experts(3, 2, 4, "lora-aware", 2)
    torch.nn.init.normal_(lin.experts.lora_B)
    a, b = torch.randn(2, 2, 16), torch.randn(2, 24, 2)
    state.user_lora["s"] = (a, b)
    x = torch.randn(2, 5, 16)
    ref = lin(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.05)


def test_dropout_scale_on_the_adapter_outputs_equals_dropout_on_the_input():
    """ProperLinear applies dropout's 1/(1-p) after the adapters' A: the same as scaling x first."""
    torch.manual_seed(0)
    state = RoutingState()
    lin = ProperLinear(torch.nn.Linear(16, 24, bias=False), "s", state, dropout=0.3)
    lin.add_experts(3, 2, 4, "lora-aware", 2)
    torch.nn.init.normal_(lin.experts.lora_B)
    torch.nn.init.normal_(lin.router.w_user.weight)
    a, b = torch.randn(2, 2, 16, dtype=torch.float64), torch.randn(2, 24, 2, dtype=torch.float64)
    lin.double().train()
    state.user_lora["s"] = (a, b)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.manual_seed(1)
    y = lin(x)
    torch.manual_seed(1)
    xd = lin.dropout(x)                                   # the same mask, scaled on the input
    assert lin.dropout.scale != 1.0 and bool((xd == 0).any())
    h = xd @ a.transpose(1, 2)
    gates = lin.router(x, h)
    want = lin.base(x) + lin.user_scaling * h @ b.transpose(1, 2) + lin.experts(xd, gates)
    torch.testing.assert_close(y, want)


def test_zero_text_router_init_routes_uniformly_until_users_differ(fresh_lm, tok):
    from properlm.model.proper import ProperModel

    pm = ProperModel(fresh_lm())
    pm.add_group(3, 2, 4, 0.0, "user-aware", 4, ["a", "b"], text_router_init="zeros")
    assert all(float(s.router.w_text.weight.abs().sum()) == 0 for s in pm.sites.values())
    ids = tok(["hello there", "another text"], return_tensors="pt", padding=True)
    with torch.no_grad():
        pm.user_embs.params["layers.0.mlp.up_proj.user_emb"].zero_()
        pm.user_embs.params["layers.0.mlp.up_proj.user_emb"][1] = 3.0
        pm.bind(emb_users=["a", "b"], token_mask=ids["attention_mask"], record=True)
        pm.hidden_states(ids["input_ids"], ids["attention_mask"])
    routes = torch.stack(pm.state.routes)                 # (sites, B, K)
    up0 = list(pm.sites).index("layers.0.mlp.up_proj")
    torch.testing.assert_close(routes[up0, 0], torch.full((3,), 1 / 3))   # zero embedding: uniform
    assert not torch.allclose(routes[up0, 1], torch.full((3,), 1 / 3))   # the user's embedding moves it
    with pytest.raises(ValueError):
        pm.add_group(3, 2, 4, 0.0, "user-aware", 4, ["a"], text_router_init="ones")


def test_shared_user_embedding_is_one_vector_read_by_every_site(fresh_lm, tok):
    from properlm.model.proper import ProperModel

    pm = ProperModel(fresh_lm())
    pm.add_group(3, 2, 4, 0.0, "user-aware", 4, ["a", "b"], text_router_init="zeros", user_embedding="shared")
    assert list(pm.user_embs.params) == ["user_emb"]
    ids = tok(["hello there", "hello there"], return_tensors="pt", padding=True)

    def routes():
        with torch.no_grad():
            pm.bind(emb_users=["a", "b"], token_mask=ids["attention_mask"], record=True)
            pm.hidden_states(ids["input_ids"], ids["attention_mask"])
        return torch.stack(pm.state.routes)               # (sites, B, K)

    with torch.no_grad():
        pm.user_embs.params["user_emb"].zero_()
    torch.testing.assert_close(routes(), torch.full((len(pm.sites), 2, 3), 1 / 3))
    with torch.no_grad():
        pm.user_embs.params["user_emb"][1] = 3.0              # user b moves: every site's routing of b changes
    r = routes()
    torch.testing.assert_close(r[:, 0], torch.full((len(pm.sites), 3), 1 / 3))
    assert all(not torch.allclose(r[s, 1], torch.full((3,), 1 / 3)) for s in range(len(pm.sites)))
    # and the gradient of every site reaches the one embedding (experts made non-zero, so routing matters)
    with torch.no_grad():
        for site in pm.sites.values():
            torch.nn.init.normal_(site.experts.lora_B)
    bound = pm.bind(emb_users=["a", "b"], requires_grad=True)
    pm.hidden_states(ids["input_ids"], ids["attention_mask"]).sum().backward()
    g = bound.emb_leaves["user_emb"].grad
    assert g is not None and g.abs().sum() > 0
    with pytest.raises(ValueError):
        pm.add_group(3, 2, 4, 0.0, "user-aware", 4, ["a"], user_embedding="per-layer")
