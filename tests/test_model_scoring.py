"""Label decoding: each label scored as the training loss would score it, and ratings' expected values."""

from __future__ import annotations

import json

import pytest
import torch

from properlm.model.scoring import expected_value, label_loglik
from properlm.train.examples import Example, collate, encode
from properlm.model.proper import completion_nll


def test_label_loglik_is_minus_the_answer_nll_per_user(group_model, tok, h):
    pm = group_model()
    h.add_random_users(pm, ["ta", "tb"])
    prompts = [h.prompt(0), h.prompt(3) + " and a few more words"]
    labels = ["love", "hate", "dislike"]
    ll = label_loglik(pm, tok, prompts, labels, lora_users=["ta", "tb"], emb_users=[None, "ua"])
    assert ll.shape == (2, 3)
    for i, (p, lu, eu) in enumerate(zip(prompts, ["ta", "tb"], [None, "ua"])):
        for j, lab in enumerate(labels):
            b = collate([encode(tok, Example("x", p, lab), max_len=512)], tok.pad_token_id)
            with torch.no_grad():
                pm.bind(lora_users=[lu], emb_users=[eu])
                nll, _ = completion_nll(pm.lm, b["input_ids"], b["attention_mask"], b["labels"])
            pm.state.clear()
            torch.testing.assert_close(ll[i, j], -nll[0], atol=1e-4, rtol=1e-5)
    # The user matters: the same prompt scored with another user's model differs.
    other = label_loglik(pm, tok, prompts, labels, lora_users=["tb", "ta"], emb_users=[None, "ua"])
    assert (other - ll).abs().max() > 1e-4


def test_expected_value_under_the_label_likelihoods():
    ll = torch.log(torch.tensor([[0.5, 0.5, 0.0 + 1e-12, 1e-12, 1e-12], [0.1, 0.1, 0.2, 0.2, 0.4]]))
    ev = expected_value(ll, [1, 2, 3, 4, 5])
    torch.testing.assert_close(ev, torch.tensor([1.5, 3.7]), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_rating_runs_report_the_best_label_and_the_expected_rating(tmp_path, h):
    from properlm.data import Dataset, Item, Query, User, export_lamp
    from properlm.evaluate.evaluate import evaluate_run

    users = []
    for i in range(8):
        hist = [Item(f"i{i}-{j}", {"text": f"review {j} of thing {i}", "score": str(1 + (i + j) % 5)}) for j in range(4)]
        qs = [Query(f"q{i}", "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, "
                             f"3, 4, or 5 without further explanation. review: thing {i} again", str(1 + i % 5))]
        users.append(User(f"user{i}", hist, qs))
    export_lamp(Dataset("LaMP-3", users), tmp_path / "lamp3")
    from properlm.train.run import train

    cfg = h.small_cfg(data=dict(path=str(tmp_path / "lamp3"), split="oppu", n_targets=3))
    train(cfg, tmp_path / "run")
    res = evaluate_run(tmp_path / "run", methods=["proper"], decode="labels", progress=False)
    assert set(res["methods"]) == {"proper@labels", "proper@expected"}
    labels = json.loads((tmp_path / "run" / "eval" / "proper@labels" / "predictions.json").read_text())["golds"]
    expect = json.loads((tmp_path / "run" / "eval" / "proper@expected" / "predictions.json").read_text())["golds"]
    assert all(p["output"] in {"1", "2", "3", "4", "5"} for p in labels)
    assert all(1.0 <= float(p["output"]) <= 5.0 for p in expect)
    assert set(res["methods"]["proper@expected"]["metrics"]) == {"mae", "rmse"}
