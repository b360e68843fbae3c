"""Instant group routing: a new user's stage-2 embedding predicted from their history, with no gradient step."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from properlm.model.proper import ProperModel
from properlm.store.cache import UserCache
from properlm.store.run import open_bank

#: Love-users and hate-users answer the same prompts differently: only e_u tells them apart in stage 2.
ANSWERS = {f"u{i}": ("love" if i % 2 == 0 else "hate") for i in range(8)}
NEW = {"tx": "love", "ty": "hate"}


@pytest.fixture
def stage2(fresh_lm, tok, h, tmp_path):
    """Stage 2 with ``group.unseen=instant`` on the planted task: the encoder is fitted on its training users."""
    from properlm.train.group import train_group

    cfg = h.small_cfg(group=dict(max_steps=None, epochs=10, per_user_batch=2, users_per_step=4, constraint_weight=0.0,
                                 unseen="instant"))
    pm = ProperModel(fresh_lm(10))
    history = h.make_examples(ANSWERS, n=4)
    train_group(cfg, tmp_path, pm, tok, history, history=history)
    return cfg, pm


def _flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([params[k].flatten() for k in sorted(params)])


def test_instant_embeddings_route_new_users_to_their_group_without_a_gradient_step(stage2, tok, h, tmp_path,
                                                                                    monkeypatch):
    """New users' history (other prompts than the training users' history) through the encoder: each one's
    embedding lands on their group's side of the mean, and their queries fit clearly better with it than with
    the mean embedding. Nothing is trained on the way: no backward pass, no optimizer step."""
    from properlm.model.user_params import UserParams
    from properlm.train import group, multiuser
    from properlm.train.group import load_encoder, store_instant

    cfg, pm = stage2
    enc = load_encoder(tmp_path)
    sums = json.loads((tmp_path / "group" / "SHA256SUMS.json").read_text())
    assert {"instant.safetensors", "instant.json"} <= set(sums), "the encoder is a checksummed stage-2 file"
    val = enc.report["validation"]
    assert val["users"] == 2 and val["mse_instant"] < val["mse_mean"], val   # held-out users: better than the mean

    def refuse(*a, **k):
        raise AssertionError("instant routing took a training step")

    for target, name in ((torch.Tensor, "backward"), (UserParams, "adamw_step"), (multiuser, "run_multiuser"),
                         (group, "run_multiuser"), (group, "fit_unseen")):
        monkeypatch.setattr(target, name, refuse)
    shared = {n: p.detach().clone() for n, p in pm.named_parameters()}
    history = h.make_examples(NEW, n=4, offset=4)
    assert store_instant(cfg, tmp_path, pm, tok, enc, history) == ["tx", "ty"]
    assert all(torch.equal(p, shared[n]) for n, p in pm.named_parameters())
    monkeypatch.undo()

    bank = open_bank(tmp_path, "emb")
    trained = {u: _flat(bank.get(u)["params"]) for u in ANSWERS}
    love = torch.stack([trained[u] for u, a in ANSWERS.items() if a == "love"]).mean(0)
    hate = torch.stack([trained[u] for u, a in ANSWERS.items() if a == "hate"]).mean(0)
    mean = (love + hate) / 2
    axis = love - hate
    got = {u: _flat(bank.get(u)["params"]) for u in NEW}
    assert ((got["tx"] - mean) @ axis) > 0.5 * (axis @ axis) / 2
    assert ((got["ty"] - mean) @ axis) < -0.5 * (axis @ axis) / 2
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a - mean, b - mean, dim=0).item()  # noqa: E731
    assert cos(got["tx"], love) > 0.8 and cos(got["ty"], hate) > 0.8
    # Their queries (the training users' prompts, which these users never answered): the instant embedding
    # scores their own answers far better than the mean embedding does.
    pm.user_embs = UserCache(bank)
    queries = h.make_examples(NEW, n=4)
    instant = h.mean_nll(pm, tok, queries, emb=True)
    fallback = h.mean_nll(pm, tok, queries, emb=False)
    assert instant < fallback - 0.1, (instant, fallback)


@pytest.mark.parametrize("bf16", [False, True])
def test_history_features_run_the_shared_prompt_start_once_with_the_same_features(stage2, tok, h, monkeypatch, bf16):
    """The items' common first tokens (chat template, instruction) run once and every item continues from
    their cache: the features equal those of running every item whole, for users of items of unequal
    lengths, and the decoder sees only the items' own tokens after the shared ones."""
    import properlm.train.instant as instant
    from properlm.train.examples import encode

    _, pm = stage2
    history = h.make_examples({"tx": "love", "ty": "hate", "tz": "love"}, n=3)
    history[1].prompt += " with a longer tail of words than the others"
    enc = [encode(tok, e, 64) for e in history]
    n = instant.shared_prefix(enc)
    assert n >= instant.MIN_SHARED_TOKENS and all(e.ids[:n] == enc[0].ids[:n] for e in enc)
    assert n <= min(sum(1 for lab in e.labels if lab == -100) for e in enc)  # within every prompt
    seen = []
    decoder = pm.lm.get_decoder()
    real = decoder.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(decoder, "forward", spy)
    shared = instant.history_features(pm, tok, history, 64, bf16=bf16)
    assert seen[0] == n and max(seen[1:]) == max(len(e.ids) for e in enc) - n
    monkeypatch.setattr(instant, "MIN_SHARED_TOKENS", 10 ** 6)  # every item whole
    whole = instant.history_features(pm, tok, history, 64, bf16=bf16)
    assert shared.keys() == whole.keys() == {"tx", "ty", "tz"}
    tol = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-4, atol=1e-5)  # bf16: rounding of other shapes
    for u in whole:
        assert shared[u].dtype == torch.float32
        torch.testing.assert_close(shared[u], whole[u], **tol)


def test_the_ridge_falls_back_to_the_mean_and_recovers_a_linear_map():
    """Too few users or features that do not vary: the mean embedding. A linear map with little noise:
    recovered, with a held-out error far below the mean's."""
    from properlm.train.instant import fit_encoder, fit_ridge

    rng = np.random.default_rng(0)
    x2, y2 = rng.normal(size=(2, 5)), rng.normal(size=(2, 3))
    assert not fit_ridge(x2, y2)["weight"].any()
    assert not fit_ridge(np.ones((6, 4)), rng.normal(size=(6, 3)))["weight"].any()
    x = rng.normal(size=(40, 6))
    w = rng.normal(size=(6, 3))
    y = x @ w + 0.01 * rng.normal(size=(40, 3)) + 5.0
    enc = fit_encoder({f"u{i}": torch.tensor(x[i]) for i in range(40)}, {f"u{i}": torch.tensor(y[i]) for i in range(40)},
                      [("e", (3,))])
    assert enc.report["validation"]["ratio"] < 0.01 and enc.report["validation"]["users"] == 8
    new = rng.normal(size=(3, 6))
    torch.testing.assert_close(enc.predict(torch.tensor(new)).double(), torch.tensor(new @ w + 5.0), atol=0.05,
                               rtol=0)


def test_a_run_with_instant_routing_gives_its_targets_encoder_embeddings(tmp_path, h):
    """``group.unseen=instant`` end to end: the targets' embeddings are the encoder's (not fitted), stage 3
    trains from them, and ``properlm store verify`` accepts the run's files."""
    from properlm.store.run import load_model
    from properlm.store.verify import verify_run
    from properlm.train.group import load_encoder
    from properlm.train.instant import instant_embeddings
    from properlm.train.run import load_data, stage_examples, train

    cfg = h.small_cfg(data=dict(split="oppu"), group=dict(unseen="instant"))
    run = train(cfg, tmp_path / "run")
    split = json.loads((run / "split.json").read_text())
    bank = open_bank(run, "emb")
    assert all(u in bank for u in split["target"] + split["train"])
    assert not (run / "logs" / "group" / "fit.jsonl").exists(), "nothing was fitted by gradient steps"
    pm, tok = load_model(cfg, run, "user")
    ds = load_data(cfg)
    targets = [u for u in ds.users if u.id in split["target"]]
    want = instant_embeddings(pm, tok, load_encoder(run), stage_examples(ds.task, "user", [], targets),
                              cfg.data.max_len, cfg.bf16)
    for u in split["target"]:
        got = bank.get(u)["params"]
        assert all(torch.allclose(got[k], want[u][k], atol=1e-5) for k in got), u
    assert verify_run(run).ok
    assert "group/instant.safetensors" in json.loads((run / "manifest.json").read_text())["files"]


def test_group_unseen_names_its_choices():
    from properlm.run_config import GroupConfig

    assert GroupConfig(unseen="instant").unseen == "instant"
    with pytest.raises(ValueError, match="fit, instant or mean"):
        GroupConfig(unseen="fast")
