"""Users not in stage 2: fitted into a group from their own history, and stage 3 starting exactly where stage 2 ends."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from properlm.model.proper import ProperModel
from properlm.store.run import open_bank
from properlm.train.group import fit_unseen, train_group


@torch.no_grad()
def _logits_and_routes(pm, tok, h, prompts_users, emb_users, lora_users=None):
    ex = [type(e)("x", e.prompt, e.answer) for e in h.make_examples({"x": "love"}, n=len(emb_users))]
    b = h.batch(tok, ex)
    pm.bind(emb_users=emb_users, lora_users=lora_users, token_mask=b["attention_mask"], record=True)
    out = pm(b["input_ids"], b["attention_mask"])
    routes = pm.routing_vectors()
    pm.state.clear()
    return out[b["attention_mask"].bool()], routes


@pytest.mark.parametrize("emb_user", [None, "ua"], ids=["fallback", "own-embedding"])
def test_stage_3_starts_where_stage_2_ends(group_model, tok, h, emb_user):
    """With the user's LoRA at zero (B = 0, A random as initialised), the LoRA-aware router routes exactly as
    stage 2's user-aware router did for that user (their embedding, or the fallback), and the logits are equal."""
    pm = group_model()
    users = [emb_user] * 3
    want, want_routes = _logits_and_routes(pm, tok, h, None, users)
    pm.add_user_lora(4, 8, lora_aware_router=True)
    pm.user_loras = pm.new_lora_bank(["ta"])
    assert all(s.router.kind == "lora-aware" for s in pm.sites.values())
    got, got_routes = _logits_and_routes(pm.eval(), tok, h, None, users, lora_users=["ta"] * 3)
    assert torch.equal(got_routes, want_routes)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # And the LoRA-aware term is live: once W_l is not zero, the same user routes differently.
    h.randomize_([s.router.w_user.weight for s in pm.sites.values()], 0.5, 3)
    _, moved = _logits_and_routes(pm, tok, h, None, users, lora_users=["ta"] * 3)
    assert (moved - want_routes).abs().max() > 1e-3


ANSWERS = {"ua": "love", "ub": "hate", "uc": "love", "ud": "hate"}


@pytest.fixture
def stage2(fresh_lm, tok, h, tmp_path):
    """A stage 2 where love-users and hate-users answer the same prompts differently (only e_u tells them apart)."""
    cfg = h.small_cfg(group=dict(max_steps=None, epochs=10, per_user_batch=2, users_per_step=4, constraint_weight=0.0,
                                 unseen_epochs=6))
    pm = ProperModel(fresh_lm(10))
    train_group(cfg, tmp_path, pm, tok, h.make_examples(ANSWERS, n=4))
    return cfg, pm


def _routes(pm, tok, h, users):
    """Each user's routing vector (K,) over the same prompts, averaged over tokens and sites."""
    ex = [type(e)(u, e.prompt, e.answer) for u in users for e in h.make_examples({"x": "love"}, n=4)]
    b = h.batch(tok, ex)
    with torch.no_grad():
        pm.bind(emb_users=[e.user_id for e in ex], token_mask=b["attention_mask"], record=True)
        pm(b["input_ids"], b["attention_mask"])
        r = pm.routing_vectors()
    pm.state.clear()
    return {u: r[i * 4:(i + 1) * 4].mean(0) for i, u in enumerate(users)}


def test_unseen_users_are_fitted_into_the_group_their_history_points_to(stage2, tok, h, tmp_path):
    """Two unseen users, one answering like the love-users and one like the hate-users: fitted on their own
    history, each one's embedding moves from the mean towards their group's side, they route like their
    group, and their history fits better than with the mean embedding."""
    from properlm.store.cache import UserCache

    cfg, pm = stage2
    bank0 = pm.user_embs
    keys = sorted(bank0.params)
    flat = lambda get: torch.cat([get(k) for k in keys])  # noqa: E731  (all sites' embeddings side by side)
    trained = {u: flat(lambda k: bank0.params[k][bank0.index(u)]) for u in ANSWERS}
    fallback = torch.cat([next(s.router.fallback_emb for n, s in pm.sites.items() if k.startswith(n)) for k in keys])
    unseen = h.make_examples({"tx": "love", "ty": "hate"}, n=4)
    assert fit_unseen(cfg, tmp_path, pm, tok, unseen) == ["tx", "ty"]
    bank = open_bank(tmp_path, "emb")
    emb = {u: flat(lambda k: bank.get(u)["params"][k]) for u in ("tx", "ty")}
    axis = (trained["ua"] + trained["uc"] - trained["ub"] - trained["ud"]) / 2   # the love-minus-hate direction
    assert ((emb["tx"] - fallback) @ axis) > 0 > ((emb["ty"] - fallback) @ axis)
    pm.user_embs = UserCache(bank)
    for u in ANSWERS:  # the trained users too, so that all routes come from one bank
        bank.put(u, {"params": {k: bank0.params[k][bank0.index(u)] for k in keys}})
    routes = _routes(pm, tok, h, [*ANSWERS, "tx", "ty"])
    l1 = lambda a, b: (routes[a] - routes[b]).abs().sum().item()  # noqa: E731
    assert (l1("tx", "ua") + l1("tx", "uc")) < (l1("tx", "ub") + l1("tx", "ud"))
    assert (l1("ty", "ub") + l1("ty", "ud")) < (l1("ty", "ua") + l1("ty", "uc"))
    fitted_nll = h.mean_nll(pm, tok, unseen, emb=True)
    fallback_nll = h.mean_nll(pm, tok, unseen, emb=False)
    assert fitted_nll < fallback_nll - 0.1, (fitted_nll, fallback_nll)


def test_the_mean_embedding_when_fitting_is_off(fresh_lm, tok, h, tmp_path):
    from properlm.train.run import train

    cfg = h.small_cfg(data=dict(split="oppu"), group=dict(unseen="mean"))
    train(cfg, tmp_path, stages=("population", "group"))
    split = __import__("json").loads((tmp_path / "split.json").read_text())
    bank = open_bank(tmp_path, "emb")
    assert not any(u in bank for u in split["target"]) and all(u in bank for u in split["train"])
    cfg = h.small_cfg(data=dict(split="oppu"))
    train(cfg, tmp_path / "fit", stages=("population", "group"))
    assert all(u in open_bank(tmp_path / "fit", "emb") for u in split["target"])


def test_stage_3_trains_with_the_targets_fitted_stage_2_embeddings(stage2, tok, h, tmp_path):
    """Stage 3 binds each target's fitted stage-2 embedding (the LoRA-aware router's carried-over term reads it).
    With the LoRAs at zero its first step is stage 2 with those embeddings: the first logged loss is the targets'
    loss with their fitted embeddings, not with the fallback (the mean embedding), and the LoRAs it trains
    depend on the embedding."""
    from properlm.model.device import autocast
    from properlm.store.cache import UserCache
    from properlm.train.user import train_users

    cfg, pm = stage2
    unseen = h.make_examples({"tx": "love", "ty": "hate"}, n=4)
    fit_unseen(cfg, tmp_path, pm, tok, unseen)
    pm.user_embs = None
    pm_again = copy.deepcopy(pm)  # stage 3 trains the shared router in place: a second run starts from a copy
    pm.user_embs = UserCache(open_bank(tmp_path, "emb"))
    with autocast(True):  # training's precision (bf16 autocast, as in every test here)
        fitted = (h.mean_nll(pm, tok, unseen[:4], emb=True) + h.mean_nll(pm, tok, unseen[4:], emb=True)) / 2
        fallback = (h.mean_nll(pm, tok, unseen[:4]) + h.mean_nll(pm, tok, unseen[4:])) / 2
    assert fitted < fallback - 0.1, (fitted, fallback)
    ucfg = h.small_cfg(user=dict(max_steps=1, users_per_step=2, per_user_batch=4))
    store = train_users(ucfg, tmp_path / "s3", pm, tok, unseen)
    first = json.loads((tmp_path / "s3" / "logs" / "user.jsonl").read_text().splitlines()[0])["loss"]
    assert first == pytest.approx(fitted, abs=0.02), (first, fitted, fallback)  # bf16 rounding; fallback: > 0.1 away
    # The same training with tx's embedding moved elsewhere in the bank trains another LoRA for tx (and the same for ty).
    bank = open_bank(tmp_path, "emb")
    bank.put("tx", {"params": {k: v + 0.5 for k, v in bank.get("tx")["params"].items()}})
    pm_again.user_embs = UserCache(bank)
    other = train_users(ucfg, tmp_path / "s3-moved", pm_again, tok, unseen)
    lora = lambda st, u: torch.cat([v.flatten() for v in st.get(u)["params"].values()])  # noqa: E731
    assert (lora(other, "tx") - lora(store, "tx")).abs().max() > 1e-4
    torch.testing.assert_close(lora(other, "ty"), lora(store, "ty"), atol=1e-6, rtol=0)


def test_a_user_without_a_lora_routes_as_in_stage_2_however_stage_3_trained_its_router(group_model, tok, h):
    """Stage 3 trains the LoRA-aware router's text part ``W_x`` away from stage 2's ``W_t``. A row without a
    user LoRA (a user with only a stage-2 embedding, or none) must still be answered exactly as the stage-2
    model answers them, alone or beside rows that have a LoRA; rows with a LoRA use the trained ``W_x``."""
    pm = group_model()
    want_ua, routes_ua = _logits_and_routes(pm, tok, h, None, ["ua"] * 3)
    want_fb, routes_fb = _logits_and_routes(pm, tok, h, None, [None] * 3)
    pm.add_user_lora(4, 8, lora_aware_router=True)
    pm.user_loras = pm.new_lora_bank(["ta"])
    h.randomize_([s.router.w_text.weight for s in pm.sites.values()], 0.5, 7)   # W_x as stage 3 left it
    pm.eval()
    got, routes = _logits_and_routes(pm, tok, h, None, ["ua"] * 3)
    assert torch.equal(routes, routes_ua)
    torch.testing.assert_close(got, want_ua, atol=1e-6, rtol=0)
    _, routes = _logits_and_routes(pm, tok, h, None, [None] * 3)
    assert torch.equal(routes, routes_fb)
    # Mixed with a row that has a LoRA: the rows without one are unchanged, the LoRA row routes with W_x.
    _, mixed = _logits_and_routes(pm, tok, h, None, ["ua", "ua", "ua"], lora_users=[None, "ta", None])
    torch.testing.assert_close(mixed[[0, 2]], routes_ua[[0, 2]], atol=1e-6, rtol=0)
    assert (mixed[1] - routes_ua[1]).abs().max() > 1e-3
