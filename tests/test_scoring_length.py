"""Length-normalised label scores: the summed log-likelihood favours short labels, the mean per token does not.

The model here is a unigram model (the tiny LM with an LM head of zero weight and a
bias), so every position predicts the same distribution and each label's
log-likelihood is a sum of known terms, computed here without the scoring code.
"""

from __future__ import annotations

import torch

from properlm.data.tasks import get_task
from properlm.model.prompts import end_of_answer
from properlm.model.scoring import label_lengths, label_loglik, per_token

SHORT, LONG = "action", "based on a book"  # two of LaMP-2M's tags: 1 and 4 tokens before the end of answer


def _unigram_lm(fresh_lm, tok, logits: dict[int, float]):
    """The tiny LM whose next-token logits are ``logits`` (others -20) at every position, whatever the input."""
    lm = fresh_lm()
    head = torch.nn.Linear(lm.config.hidden_size, lm.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-20.0)
        for t, v in logits.items():
            head.bias[t] = v
    lm.lm_head = head
    assert lm.get_output_embeddings() is head
    return lm, torch.log_softmax(head.bias.detach(), -1)


def _tokens(tok, label: str) -> list[int]:
    return tok(label + end_of_answer(tok), add_special_tokens=False).input_ids


def _planted(fresh_lm, tok):
    """Each of LONG's tokens is likelier than SHORT's one token, but LONG has more of them."""
    short, long_ = _tokens(tok, SHORT), _tokens(tok, LONG)
    eoa = short[-1]
    assert long_[-1] == eoa and len(short) == 2 and len(long_) >= 4
    logits = {eoa: 5.0, **{t: 3.0 for t in long_[:-1]}, short[0]: 0.0}
    return _unigram_lm(fresh_lm, tok, logits)


def test_sum_prefers_the_short_label_and_the_mean_per_token_the_long_one(fresh_lm, tok, h):
    lm, logp = _planted(fresh_lm, tok)
    labels = list(get_task("LaMP-2M").labels)
    prompts = [h.prompt(0), h.prompt(1) + " with more words"]
    ll = label_loglik(lm, tok, prompts, labels, batch_size=8)
    # Exact values, independently: a label's log-likelihood is the sum of its tokens' unigram log-probabilities.
    want = torch.tensor([sum(logp[t].item() for t in _tokens(tok, lab)) for lab in labels])
    torch.testing.assert_close(ll, want.expand(2, -1), atol=1e-4, rtol=0)
    lengths = label_lengths(tok, labels)
    assert lengths.tolist() == [len(_tokens(tok, lab)) for lab in labels]
    mean = per_token(ll, lengths)
    torch.testing.assert_close(mean, ll / lengths)
    assert [labels[i] for i in ll.argmax(-1)] == [SHORT, SHORT]
    assert [labels[i] for i in mean.argmax(-1)] == [LONG, LONG]
    s, lo = labels.index(SHORT), labels.index(LONG)
    assert ll[0, s] > ll[0, lo] and mean[0, lo] > mean[0, s]


def test_label_decoding_files_both_the_summed_and_the_per_token_prediction(fresh_lm, tok, h):
    from properlm.evaluate.evaluate import _label_decode, decoding_of

    lm, _ = _planted(fresh_lm, tok)
    rows = [("q0", h.prompt(0), None, None), ("q1", h.prompt(3), None, None)]
    settings = {"max_prompt_tokens": 512, "bf16": False}
    out = _label_decode(lm, tok, rows, get_task("LaMP-2M"), settings, 4, "stage1")
    assert out == {"stage1@labels": {"q0": SHORT, "q1": SHORT}, "stage1@labels-norm": {"q0": LONG, "q1": LONG}}
    assert [decoding_of(m) for m in out] == ["labels", "labels-norm"]
    assert decoding_of("proper@expected") == "expected" and decoding_of("proper") == "free"
