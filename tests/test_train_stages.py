"""The three training stages: each learns, stage 1 merges exactly, stage 2 routes by user, frozen stays frozen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file

from properlm.model.proper import ProperModel
from properlm.train.group import train_group
from properlm.model.population import merge_population
from properlm.train.population import train_population
from properlm.train.user import train_users


def logged(run_dir: Path, stage: str, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (run_dir / "logs" / f"{stage}.jsonl").read_text().splitlines()]


def clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, f"{what} changed: {changed[:5]}"


# -- 1. the loss falls in every stage ------------------------------------------------------------

def test_population_loss_falls(fresh_lm, tok, h, tmp_path):
    ex = h.make_examples({"ua": "love", "ub": "love"}, n=2)
    cfg = h.small_cfg(population=dict(max_steps=None, epochs=15, lr=1e-2))
    before = h.mean_nll(fresh_lm(10), tok, ex)
    adapter = train_population(cfg, tmp_path, fresh_lm(10), tok, ex)
    losses = logged(tmp_path, "population")
    assert len(losses) == 30  # 4 examples, batch 2, 15 epochs
    assert losses[-1] < 0.5 * losses[0], losses
    # The saved adapter holds what was learned: recompute on the merged model.
    after = h.mean_nll(merge_population(fresh_lm(10), adapter), tok, ex)
    assert after < 0.5 * before, (before, after)


def test_group_loss_falls(fresh_lm, tok, h, tmp_path):
    ex = h.make_examples({"ua": "hate", "ub": "hate", "uc": "hate"}, n=2)
    cfg = h.small_cfg(group=dict(max_steps=None, epochs=15, per_user_batch=2))
    pm = ProperModel(fresh_lm(10))
    before = h.mean_nll(pm, tok, ex)
    train_group(cfg, tmp_path, pm, tok, ex)
    losses = logged(tmp_path, "group")
    assert len(losses) == 15
    assert losses[-1] < 0.5 * losses[0], losses
    assert h.mean_nll(pm, tok, ex, emb=True) < 0.5 * before


def test_user_loss_falls(group_model, tok, h, tmp_path):
    ex = h.make_examples({"ta": "like", "tb": "dislike"}, n=2)
    cfg = h.small_cfg(user=dict(max_steps=None, epochs=15, per_user_batch=2))
    pm = group_model(head_scale=10)
    before = h.mean_nll(pm, tok, ex)
    train_users(cfg, tmp_path, pm, tok, ex)
    losses = logged(tmp_path, "user")
    assert len(losses) == 15
    assert losses[-1] < 0.5 * losses[0], losses
    assert h.mean_nll(pm, tok, ex, lora=True) < 0.5 * before
    # Each user's own LoRA does the work: another user's LoRA fits their data worse.
    own = h.mean_nll(pm, tok, ex, lora=True)
    swapped = [type(e)({"ta": "tb", "tb": "ta"}[e.user_id], e.prompt, e.answer) for e in ex]
    assert h.mean_nll(pm, tok, swapped, lora=True) > own + 1.0


# -- 2. the stage-1 merge is exact ------------------------------------------------------------------

def test_merge_gives_the_unmerged_adapter_outputs(fresh_lm, tok, h, tmp_path):
    ex = h.make_examples({"ua": "love", "ub": "hate"}, n=3)
    cfg = h.small_cfg(population=dict(max_steps=6, lr=1e-2, dropout=0.05))
    adapter = train_population(cfg, tmp_path, fresh_lm(10), tok, ex)
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    b_norms = [v.abs().max().item() for k, v in saved.items() if "lora_B" in k]
    assert b_norms and min(b_norms) > 0, "training must move every LoRA B away from zero"
    targets = {k.split(".")[-3] for k in saved if "lora_A" in k}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    b = h.batch(tok, ex)
    unmerged = PeftModel.from_pretrained(fresh_lm(10), str(adapter)).eval()
    merged = merge_population(fresh_lm(10), adapter).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        base = fresh_lm(10)(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        lu = unmerged(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        lm = merged(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    valid = b["attention_mask"].bool()
    assert (lu - base)[valid].abs().max() > 0.1, "the adapter must change the outputs"
    torch.testing.assert_close(lm[valid], lu[valid], atol=1e-4, rtol=1e-5)


# -- 3. stage 2 routes users by their data; the constraint loss separates them -----------------------

ANSWERS = {"ua": "love", "ub": "hate", "uc": "love", "ud": "hate"}


def _group_routes(pm, tok, h, examples) -> dict[str, torch.Tensor]:
    """Each user's mean routing vector (K,) over their examples (tokens, layers and sites averaged)."""
    b = h.batch(tok, examples)
    users = [e.user_id for e in examples]
    with torch.no_grad():
        pm.bind(emb_users=users, token_mask=b["attention_mask"], record=True)
        pm(b["input_ids"], b["attention_mask"])
        r = pm.routing_vectors()
    pm.state.clear()
    return {u: r[[i for i, x in enumerate(users) if x == u]].mean(0) for u in dict.fromkeys(users)}


def _train_routing(fresh_lm, tok, h, tmp_path, constraint_weight: float, seed: int = 0):
    ex = h.make_examples(ANSWERS, n=4)  # the same prompts for all users: only e_u can tell them apart
    cfg = h.small_cfg(seed=seed, group=dict(max_steps=None, epochs=10, per_user_batch=2, users_per_step=4,
                                            constraint_weight=constraint_weight))
    pm = ProperModel(fresh_lm(10))
    train_group(cfg, tmp_path, pm, tok, ex)
    return _group_routes(pm, tok, h, ex)


def test_user_aware_router_routes_users_by_their_data(fresh_lm, tok, h, tmp_path):
    routes = _train_routing(fresh_lm, tok, h, tmp_path, constraint_weight=0.0)
    l1 = lambda u, v: (routes[u] - routes[v]).abs().sum().item()  # noqa: E731
    different = [l1("ua", "ub"), l1("ua", "ud"), l1("uc", "ub"), l1("uc", "ud")]
    same = [l1("ua", "uc"), l1("ub", "ud")]
    assert min(different) > 0.04, different
    assert min(different) > 4 * max(same), (different, same)


def _mean_pairwise_cosine(routes: dict[str, torch.Tensor]) -> float:
    v = F.normalize(torch.stack(list(routes.values())), dim=-1)
    c = v @ v.T
    return c[torch.triu(torch.ones_like(c, dtype=torch.bool), diagonal=1)].mean().item()


@pytest.mark.parametrize("seed", [0, 1])
def test_constraint_loss_lowers_cross_user_routing_similarity(fresh_lm, tok, h, tmp_path, seed):
    without = _mean_pairwise_cosine(_train_routing(fresh_lm, tok, h, tmp_path / "off", 0.0, seed))
    with_loss = _mean_pairwise_cosine(_train_routing(fresh_lm, tok, h, tmp_path / "on", 10.0, seed))
    assert with_loss < without - 0.02, (without, with_loss)
    cons = logged(tmp_path / "on", "group", "constraint")
    assert cons[-1] < cons[0]
    assert set(logged(tmp_path / "off", "group", "constraint")) == {0.0}


# -- 8. frozen parameters never change ---------------------------------------------------------------

def _base_weights(pm: ProperModel) -> dict[str, torch.Tensor]:
    """The wrapped LM's own weights, under their unwrapped names (``mlp.up_proj.base.weight`` -> ``mlp.up_proj.weight``)."""
    return {k.replace(".base.", "."): v.detach().clone() for k, v in pm.lm.state_dict().items()
            if ".experts." not in k and ".router." not in k}


def _site_state(pm: ProperModel, part: str) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.detach().clone() for n, s in pm.sites.items() for k, v in getattr(s, part).state_dict().items()}


def _bank_state(bank) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bank.state_tensors("", optimizer=True).items()}


@pytest.mark.parametrize("lora_aware_router", [True, False])
def test_frozen_parameters_never_change(fresh_lm, tok, h, tmp_path, lora_aware_router):
    cfg = h.small_cfg(population=dict(max_steps=4), group=dict(max_steps=4, dropout=0.05),
                      user=dict(max_steps=4, dropout=0.05, lora_aware_router=lora_aware_router))
    # Stage 1 leaves the base model exactly as it came.
    lm = fresh_lm()
    w0 = clone_state(lm)
    adapter = train_population(cfg, tmp_path, lm, tok, h.make_examples({"ua": "love", "ub": "hate"}, n=4))
    assert_same(clone_state(lm), w0, "stage 1: base weights")
    assert not any("lora" in k for k in lm.state_dict())

    # Stage 2 trains experts, routers and embeddings, never W1.
    pm = ProperModel(merge_population(fresh_lm(), adapter))
    w1 = _base_weights(pm)
    assert w1.keys() == w0.keys()
    assert any(not torch.equal(w1[k], w0[k]) for k in w0), "the merge must change W0"
    train_group(cfg, tmp_path, pm, tok, h.make_examples({"ua": "love", "ub": "hate", "uc": "like"}, n=4))
    assert_same(_base_weights(pm), w1, "stage 2: W1")
    assert not any(p.requires_grad for p in pm.parameters())
    experts, routers, embs = _site_state(pm, "experts"), _site_state(pm, "router"), _bank_state(pm.user_embs)
    assert any(v.abs().max() > 0 for k, v in experts.items() if k.endswith("lora_B")), "stage 2 must train"

    # Stage 3 trains user LoRAs (and the shared LoRA-aware router), nothing of stages 1-2.
    stage2_routers = [s.router for s in pm.sites.values()]
    train_users(cfg, tmp_path, pm, tok, h.make_examples({"ta": "dislike", "tb": "hate"}, n=4))
    assert_same(_base_weights(pm), w1, "stage 3: W1")
    assert_same(_site_state(pm, "experts"), experts, "stage 3: group experts")
    assert_same(_bank_state(pm.user_embs), embs, "stage 3: stage-2 user embeddings")
    if lora_aware_router:
        assert all(s.router.kind == "lora-aware" for s in pm.sites.values())
        # The stage-2 routers are replaced (their saved file is what later loads), not trained.
        old = {f"{n}.{k}": v for n, r in zip(pm.sites, stage2_routers) for k, v in r.state_dict().items()}
        assert_same(old, routers, "stage 3: stage-2 routers")
        assert all(r.kind == "user-aware" for r in stage2_routers)
    else:
        assert_same(_site_state(pm, "router"), routers, "stage 3: stage-2 routers")
    assert not any(p.requires_grad for p in pm.parameters())
