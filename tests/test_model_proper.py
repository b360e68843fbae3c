"""ProperModel and its per-user banks: forward semantics, per-row users, routing records, row-sparse AdamW."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from properlm.model.proper import ProperModel, completion_nll
from properlm.model.user_params import UserParams
from properlm.train.multiuser import constraint_loss


@torch.no_grad()
def logits(pm, b, lora=None, emb=None):
    pm.bind(emb_users=emb, lora_users=lora)
    out = pm(b["input_ids"], b["attention_mask"])
    pm.state.clear()
    return out


def test_base_model_is_the_documented_tiny_llama(tiny_base):
    lm, tok = tiny_base
    c = lm.config
    assert (c.num_hidden_layers, c.hidden_size, c.vocab_size) == (2, 64, len(tok))
    assert not lm.training
    # No embedding row is zeroed as padding: the end-of-turn token (= pad) must stay learnable.
    assert lm.get_output_embeddings().weight[tok.pad_token_id].abs().max() > 0
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id


def test_fresh_adapters_leave_the_base_outputs(fresh_lm, tok, h):
    """Experts and user LoRAs start with B = 0: wrapping changes nothing until training."""
    b = h.batch(tok, h.make_examples({"ua": "love", "ta": "hate"}, n=2))
    base = fresh_lm()
    with torch.no_grad():
        want = base(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    pm = ProperModel(fresh_lm()).eval()
    assert set(pm.sites) == {f"layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
    torch.testing.assert_close(logits(pm, b), want, atol=1e-6, rtol=0)
    pm.add_group(3, 4, 8, 0.0, "user-aware", 8, ["ua"], seed=0)
    pm.add_users(["ta", "tb"], 4, 8, lora_aware_router=True, seed=0)
    pm.eval()
    torch.testing.assert_close(logits(pm, b, lora=["ta", "ta", None, "tb"], emb=["ua", None, "ua", None]), want,
                               atol=1e-6, rtol=0)
    assert not any(p.requires_grad for n, p in pm.lm.named_parameters() if ".experts." not in n and ".router." not in n)


def test_mixed_batch_equals_each_row_alone(group_model, tok, h):
    """Rows of different users in one (right-padded) batch get exactly their own user's model."""
    for lora_aware in (True, False):
        pm = group_model()
        h.add_random_users(pm, ["ta", "tb"], lora_aware_router=lora_aware)
        ex = h.make_examples({"x": "love"}, n=5)
        ex[2].prompt += " with a longer tail so that the batch needs padding"
        lora, emb = ["ta", "tb", None, "ta", None], ["ub", None, "ua", None, None]
        b = h.batch(tok, ex)
        mixed = logits(pm, b, lora, emb)
        for i, e in enumerate(ex):
            one = h.batch(tok, [e])
            n = int(one["attention_mask"].sum())
            torch.testing.assert_close(mixed[i, :n], logits(pm, one, [lora[i]], [emb[i]])[0], atol=1e-5, rtol=1e-5)
        # And the users matter: the same prompt with another user differs.
        assert (logits(pm, b, ["tb"] * 5, emb)[0] - mixed[0]).abs().max() > 1e-3
        if not lora_aware:
            assert (logits(pm, b, lora, ["ua"] * 5)[0] - mixed[0]).abs().max() > 1e-3


def test_unknown_user_rows_use_the_mean_embedding(group_model, tok, h):
    pm = group_model()
    for name, s in pm.sites.items():
        torch.testing.assert_close(s.router.fallback_emb, pm.user_embs.params[f"{name}.user_emb"].mean(0))
    b = h.batch(tok, h.make_examples({"x": "love"}, n=2))
    torch.testing.assert_close(logits(pm, b, emb=[None, None]), logits(pm, b))
    assert (logits(pm, b, emb=["ua", "ua"]) - logits(pm, b)).abs().max() > 1e-3


def test_lora_aware_router_starts_as_the_text_router(group_model, tok, h):
    """Adding users swaps in the LoRA-aware router with W_x = stage-2 W_t and W_l = 0: outputs unchanged."""
    pm = group_model(router="text")
    b = h.batch(tok, h.make_examples({"x": "love"}, n=3))
    before = logits(pm, b)
    w_text = {n: s.router.w_text.weight.clone() for n, s in pm.sites.items()}
    pm.add_users(["ta", "tb"], 4, 8, lora_aware_router=True, seed=0)
    for n, s in pm.sites.items():
        assert s.router.kind == "lora-aware"
        assert torch.equal(s.router.w_text.weight, w_text[n])
        assert s.router.w_user.weight.abs().max() == 0
    torch.testing.assert_close(logits(pm.eval(), b, lora=["ta", None, "tb"]), before, atol=1e-6, rtol=0)


def test_completion_nll_counts_only_labelled_tokens(fresh_lm, tok, h):
    lm = fresh_lm(10)
    b = h.batch(tok, h.make_examples({"ua": "love", "ub": "a longer answer here"}, n=2))
    with torch.no_grad():
        nll, n = completion_nll(lm, b["input_ids"], b["attention_mask"], b["labels"])
        full = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    ce = F.cross_entropy(full[:, :-1].transpose(1, 2), b["labels"][:, 1:], ignore_index=-100, reduction="none")
    torch.testing.assert_close(nll, ce.sum(1), atol=1e-4, rtol=1e-5)
    assert n.tolist() == (b["labels"][:, 1:] != -100).sum(1).tolist()
    assert min(n.tolist()) >= 2  # the answer and the end-of-turn token


def test_routing_vectors_average_real_tokens_only(group_model, tok, h):
    pm = group_model()
    ex = h.make_examples({"ua": "love", "ub": "a much longer answer than the other one"}, n=1)
    b = h.batch(tok, ex)
    with torch.no_grad():
        pm.bind(emb_users=["ua", "ub"], token_mask=b["attention_mask"], record=True)
        pm(b["input_ids"], b["attention_mask"])
        r = pm.routing_vectors()
        assert len(pm.state.routes) == len(pm.sites) and r.shape == (2, 3)
        torch.testing.assert_close(r.sum(-1), torch.ones(2))
        one = h.batch(tok, ex[:1])
        pm.bind(emb_users=["ua"], token_mask=one["attention_mask"], record=True)
        pm(one["input_ids"], one["attention_mask"])
        torch.testing.assert_close(r[0], pm.routing_vectors()[0], atol=1e-6, rtol=0)  # padding not averaged in


def test_constraint_loss_is_mean_cosine_over_cross_user_pairs():
    routes = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    # pairs of different users: (0,1) (0,2) (1,3) (2,3) with users a b b a; cosines: .7071 0 .7071 0
    torch.testing.assert_close(constraint_loss(routes, ["a", "b", "b", "a"]), torch.tensor(2 ** -0.5 / 2))
    assert constraint_loss(routes, ["a"] * 4).item() == 0.0


# -- UserParams ------------------------------------------------------------------------------------------

SHAPES = {"w": (3, 4), "v": (5,)}


def test_user_rows_do_not_depend_on_who_else_is_in_the_bank():
    init = {"w": "kaiming", "v": "normal"}
    alone = UserParams(["b"], SHAPES, init, seed=3)
    crowd = UserParams(["a", "b", "c"], SHAPES, init, seed=3)
    grown = UserParams(["a"], SHAPES, init, seed=3)
    grown.add_users(["c", "b", "a"])
    assert grown.user_ids == ["a", "c", "b"]
    for bank in (crowd, grown):
        for k in SHAPES:
            assert torch.equal(bank.params[k][bank.index("b")], alone.params[k][0])
    assert not torch.equal(crowd.params["w"][0], crowd.params["w"][1])
    assert crowd.params["w"].abs().max() <= 0.5  # kaiming-uniform bound 1/sqrt(fan_in=4)
    crowd.remove_users(["a"])
    assert crowd.user_ids == ["b", "c"] and crowd.index("c") == 1 and crowd.steps.shape == (2,)


def test_row_sparse_adamw_equals_a_torch_adamw_per_user():
    """Each user's rows follow torch.optim.AdamW on that user's own parameters, steps counted per user."""
    bank = UserParams(["a", "b", "c"], SHAPES, {"w": "kaiming", "v": "normal"}, seed=0)
    ref = {u: {k: torch.nn.Parameter(bank.params[k][i].clone()) for k in SHAPES} for i, u in enumerate(bank.user_ids)}
    opts = {u: torch.optim.AdamW(list(ps.values()), lr=0.05, weight_decay=0.1) for u, ps in ref.items()}
    g = torch.Generator().manual_seed(0)
    schedule = [["a", "b"], ["a"], ["a", "c"], ["b", "c"], ["a"]]
    for present in schedule:
        rows = torch.tensor(sorted(bank.index(u) for u in present))
        leaves = bank.gather(rows, requires_grad=True)
        target = {k: torch.randn(len(rows), *s, generator=g) for k, s in SHAPES.items()}
        sum(((leaves[k] - target[k]) ** 2).sum() for k in SHAPES).backward()
        bank.adamw_step(rows, leaves, lr=0.05, weight_decay=0.1)
        for j, r in enumerate(rows.tolist()):
            u = bank.user_ids[r]
            opts[u].zero_grad()
            sum(((ref[u][k] - target[k][j]) ** 2).sum() for k in SHAPES).backward()
            opts[u].step()
    assert bank.steps.tolist() == [4, 2, 2]
    for i, u in enumerate(bank.user_ids):
        for k in SHAPES:
            torch.testing.assert_close(bank.params[k][i], ref[u][k].detach(), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(bank.exp_avg[k][i], opts[u].state[ref[u][k]]["exp_avg"], atol=1e-7, rtol=1e-5)


def test_bank_state_round_trip():
    bank = UserParams(["a", "b"], SHAPES, {"w": "kaiming"}, seed=0)
    bank.exp_avg["w"] += 1
    bank.steps += 3
    other = UserParams(["a", "b"], SHAPES, {}, seed=1)
    other.load_state_tensors("x.", bank.state_tensors("x.", optimizer=True))
    for d in ("params", "exp_avg", "exp_avg_sq"):
        for k in SHAPES:
            assert torch.equal(getattr(other, d)[k], getattr(bank, d)[k])
    assert torch.equal(other.steps, bank.steps)
    assert set(bank.state_tensors("", optimizer=False)) == set(SHAPES)
