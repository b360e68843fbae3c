"""Label decoding: each label scored as the training loss would score it, and ratings' expected values."""

from __future__ import annotations

import json

import pytest
import torch

from properlm.model.scoring import expected_value, label_loglik
from properlm.train.examples import Example, collate, encode
from properlm.model.proper import completion_nll


LABELS = ["love", "science fiction", "dark comedy musical", "x"]  # 1 to 3 tokens before the end of answer


def _one_sequence_loglik(model, tok, prompt, label, lora_user, emb_user, bf16):
    """The straightforward way: ``prompt + label`` as one sequence, alone, tokenized as training does."""
    from properlm.model.device import autocast
    from properlm.model.proper import ProperModel

    b = collate([encode(tok, Example("x", prompt, label), max_len=2048)], tok.pad_token_id)
    lm = model.lm if isinstance(model, ProperModel) else model
    with torch.no_grad(), autocast(bf16):
        if isinstance(model, ProperModel):
            model.bind(lora_users=[lora_user], emb_users=[emb_user])
        nll, _ = completion_nll(lm, b["input_ids"], b["attention_mask"], b["labels"])
    if isinstance(model, ProperModel):
        model.state.clear()
    return -nll[0]


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
def test_label_loglik_equals_each_label_scored_as_one_sequence(group_model, tok, h, bf16):
    """One prefill per prompt and the labels from its cache give the numbers of scoring every prompt + label
    alone, for rows of different users (LoRA and stage-2 embedding) and labels of different token lengths,
    whichever way the prompts and (prompt, label) rows are cut into passes."""
    from properlm.model.scoring import label_token_ids

    pm = group_model()
    h.add_random_users(pm, ["ta", "tb", "tc"])
    assert len({len(a) for a in label_token_ids(tok, LABELS)}) == 3
    prompts = [h.prompt(i) + " and more" * i for i in range(5)]
    lora_users, emb_users = ["ta", "tb", None, "tc", "ta"], [None, "ua", "ub", None, "ub"]
    want = torch.stack([torch.stack([_one_sequence_loglik(pm, tok, p, lab, lu, eu, bf16) for lab in LABELS])
                        for p, lu, eu in zip(prompts, lora_users, emb_users)])
    tol = dict(atol=5e-3, rtol=0) if bf16 else dict(atol=1e-4, rtol=1e-5)
    for batch_size in (64, 6, 1):  # all together; prompts split and one prompt per continuation pass; one row
        got = label_loglik(pm, tok, prompts, LABELS, lora_users=lora_users, emb_users=emb_users,
                           batch_size=batch_size, bf16=bf16)
        assert got.shape == (5, 4)
        torch.testing.assert_close(got, want, **tol)
    # The user matters: the same prompts scored with other users' models differ by 10x the tolerance.
    other = label_loglik(pm, tok, prompts, LABELS, lora_users=lora_users[::-1], emb_users=emb_users, bf16=bf16)
    assert (other - want).abs().max() > 10 * tol["atol"]


def test_label_loglik_of_a_plain_lm_equals_one_sequence_scoring(fresh_lm, tok, h):
    lm = fresh_lm()
    prompts = [h.prompt(1), h.prompt(2) + " twice over"]
    want = torch.stack([torch.stack([_one_sequence_loglik(lm, tok, p, lab, None, None, False) for lab in LABELS])
                        for p in prompts])
    torch.testing.assert_close(label_loglik(lm, tok, prompts, LABELS, batch_size=3), want, atol=1e-4, rtol=1e-5)


def test_a_prompt_runs_once_and_each_label_only_over_its_own_tokens(group_model, tok, h, monkeypatch):
    """The work is one prompt per query plus the labels' tokens: the decoder sees each prompt's tokens once
    (not once per label), and the continuation passes hold only the labels' tokens."""
    from properlm.model.prompts import encode_prompt
    from properlm.model.scoring import label_token_ids

    pm = group_model()
    prompts = [h.prompt(i) for i in range(3)]
    decoder = pm.lm.get_decoder()
    seen = []
    real = type(decoder).forward

    def counting(self, input_ids=None, attention_mask=None, **kw):
        seen.append(int(attention_mask[:, -input_ids.shape[1]:].sum()))
        return real(self, input_ids=input_ids, attention_mask=attention_mask, **kw)

    monkeypatch.setattr(type(decoder), "forward", counting)
    label_loglik(pm, tok, prompts, LABELS, batch_size=64)
    prompt_tokens = sum(len(encode_prompt(tok, p, 512)) for p in prompts)
    label_tokens = sum(len(a) - 1 for a in label_token_ids(tok, LABELS)) * len(prompts)
    assert seen == [prompt_tokens, label_tokens]


def test_expected_value_under_the_label_likelihoods():
    ll = torch.log(torch.tensor([[0.5, 0.5, 0.0 + 1e-12, 1e-12, 1e-12], [0.1, 0.1, 0.2, 0.2, 0.4]]))
    ev = expected_value(ll, [1, 2, 3, 4, 5])
    torch.testing.assert_close(ev, torch.tensor([1.5, 3.7]), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_rating_runs_report_the_best_label_and_the_expected_rating(tmp_path, h):
    """A planted rating task: every user gives all items one rating of their own (users differ). The personalised
    model answers each target's queries with that user's rating by label decoding, where the non-personalised
    stage 1, one model for users who disagree, cannot; the files carry the predictions their metrics score."""
    from properlm.data import Dataset, Item, Query, User, export_lamp
    from properlm.evaluate.evaluate import evaluate_run, load_targets
    from properlm.train.run import train

    users = []
    for i in range(8):
        rating = str(1 + i % 5)
        hist = [Item(f"i{i}-{j}", {"text": f"review {j} of thing {i}", "score": rating}) for j in range(4)]
        qs = [Query(f"q{i}-{k}", "What is the score of the following review on a scale of 1 to 5? just answer with 1, "
                                 f"2, 3, 4, or 5 without further explanation. review: thing {i} again {k}", rating)
              for k in range(3)]
        users.append(User(f"user{i}", hist, qs))
    export_lamp(Dataset("LaMP-3", users), tmp_path / "lamp3")
    cfg = h.small_cfg(data=dict(path=str(tmp_path / "lamp3"), split="oppu", n_targets=3))
    train(cfg, tmp_path / "run")
    res = evaluate_run(tmp_path / "run", methods=["stage1", "proper"], decode="labels", progress=False)
    assert set(res["methods"]) == {f"{m}@{d}" for m in ("stage1", "proper") for d in ("labels", "labels-norm", "expected")}
    _, _, targets = load_targets(tmp_path / "run")
    golds = {q.id: float(q.gold) for u in targets for q in u.queries}
    assert len({u.queries[0].gold for u in targets}) == 3  # the targets disagree: no one answer is right for all

    def outputs(m):
        got = json.loads((tmp_path / "run" / "eval" / m / "predictions.json").read_text())["golds"]
        assert [p["id"] for p in got] == list(golds)
        return [float(p["output"]) for p in got]

    # Each target's own rating, for every query (chance: 1 in 5); one model for all users is wrong somewhere.
    assert outputs("proper@labels") == list(golds.values())
    assert res["methods"]["proper@labels"]["metrics"] == {"mae": 0.0, "rmse": 0.0}
    assert res["methods"]["stage1@labels"]["metrics"]["mae"] > 0.5
    # Ratings are one token each, so the per-token mean ranks them as the sum does.
    assert outputs("proper@labels-norm") == outputs("proper@labels")
    # The expected ratings are what their MAE and RMSE are computed from.
    ev = outputs("proper@expected")
    assert len(set(ev)) > 1
    err = [e - g for e, g in zip(ev, golds.values())]
    assert res["methods"]["proper@expected"]["metrics"] == pytest.approx(
        {"mae": sum(abs(x) for x in err) / len(err), "rmse": (sum(x * x for x in err) / len(err)) ** 0.5})
    # `instant compare --decode expected` reads the same expected ratings: stage 2's routings are filed as
    # stage2-<routing>@expected, and PROPER's row is the proper@expected just scored.
    from properlm.evaluate.unseen import compare_unseen

    cmp = compare_unseen(tmp_path / "run", routings=["mean", "proper"], decode="expected", progress=False, n_boot=100)
    assert cmp["routings"]["proper"]["metrics"] == res["methods"]["proper@expected"]["metrics"]
    assert cmp["intervals"]["proper"]["per_query"]["mean"] == pytest.approx(sum(abs(x) for x in err) / len(err))
    mean_route = outputs("stage2-mean@expected")
    assert all(1.0 <= v <= 5.0 for v in mean_route) and len(set(mean_route)) > 1
