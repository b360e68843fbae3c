"""Training examples: the loss covers the answer and the end of the turn, nothing of the prompt."""

from __future__ import annotations

from properlm.train.examples import Example, collate, encode, end_of_answer, format_prompt


def test_labels_cover_the_answer_and_end_of_turn_only(tok):
    ex = Example("u", "Does the user love, like, dislike or hate this post? post: jazz all day.", "dislike")
    e = encode(tok, ex, max_len=128)
    prompt_ids = tok(format_prompt(tok, ex.prompt), add_special_tokens=False).input_ids
    answer_ids = tok("dislike<|im_end|>", add_special_tokens=False).input_ids
    assert e.ids == prompt_ids + answer_ids
    assert e.labels == [-100] * len(prompt_ids) + answer_ids
    assert end_of_answer(tok) == "<|im_end|>" and answer_ids[-1] == tok.eos_token_id


def test_long_prompts_are_cut_to_fit_and_the_answer_kept(tok):
    ex = Example("u", "word " * 500, "love")
    e = encode(tok, ex, max_len=64)
    assert len(e.ids) <= 64 + 8  # the chat wrapper is outside the cut
    assert [t for t in e.labels if t != -100] == tok("love<|im_end|>", add_special_tokens=False).input_ids


def test_collate_right_pads(tok):
    a = encode(tok, Example("u", "short", "love"), 64)
    b = encode(tok, Example("u", "a somewhat longer prompt than the other one", "hate"), 64)
    out = collate([a, b], tok.pad_token_id)
    n = len(a.ids)
    assert out["attention_mask"][0].tolist() == [1] * n + [0] * (len(b.ids) - n)
    assert out["labels"][0, n:].eq(-100).all() and out["input_ids"][0, n:].eq(tok.pad_token_id).all()
