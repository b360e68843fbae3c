"""Continuous batching's decode loop: rows that join mid-decode and leave early get what they get alone."""

from __future__ import annotations

import torch

from properlm.model.decoding import DecodeBatch, Row, choose
from properlm.model.prompts import encode_prompt


def _alone(pm, tok, prompt_ids, lora, emb, n):
    b = DecodeBatch(pm, tok.pad_token_id)
    logits = b.add([Row("x", prompt_ids, lora, emb)])
    out = []
    for _ in range(n):
        t = int(logits[0].argmax())
        out.append(t)
        logits = b.step([t])
    return out


def test_rows_joining_and_leaving_decode_as_if_alone(group_model, tok, h):
    pm = group_model()
    h.add_random_users(pm, ["ta", "tb"])
    specs = [  # (prompt, LoRA user, embedding user, join at step, tokens wanted)
        (h.prompt(0), "ta", None, 0, 6), (h.prompt(1) + " with a much longer tail of words", "tb", "ua", 0, 3),
        (h.prompt(2), None, "ub", 2, 5), (h.prompt(3), "ta", "uc", 4, 4), (h.prompt(4), None, None, 4, 2),
    ]
    ids = [encode_prompt(tok, p, 512) for p, *_ in specs]
    want = [_alone(pm, tok, ids[i], s[1], s[2], s[4]) for i, s in enumerate(specs)]
    batch = DecodeBatch(pm, tok.pad_token_id)
    got = {i: [] for i in range(len(specs))}
    step = 0
    while step < 12:
        join = [Row(i, ids[i], s[1], s[2]) for i, s in enumerate(specs) if s[3] == step]
        if join:
            batch.add(join)
        if not len(batch):
            break
        picks = [int(batch.next_logits[j].argmax()) for j in range(len(batch))]
        done, keep = set(), []
        for r, t in zip(batch.rows, picks):
            got[r.key].append(t)
            (done.add(r.key) if len(got[r.key]) >= specs[r.key][4] else keep.append(t))
        batch.remove(done)
        if len(batch):
            batch.step(keep)
        step += 1
    assert [got[i] for i in range(len(specs))] == want
    assert len(set(map(tuple, want))) > 1


def test_choose_greedy_and_seeded_sampling():
    logits = torch.tensor([0.1, 3.0, 0.2, 2.9])
    assert choose(logits) == 1
    draws = lambda seed: [choose(logits, 1.0, 0.9, None, torch.Generator().manual_seed(seed)) for _ in range(1)]  # noqa: E731
    assert draws(3) == draws(3)
    g = torch.Generator().manual_seed(0)
    picks = {choose(logits, 1.0, 0.5, None, g) for _ in range(50)}
    assert picks <= {1, 3}  # top-p 0.5 keeps the two near-equal leaders only
    assert {choose(logits, 5.0, 1.0, 1, g) for _ in range(20)} == {1}  # top-k 1 is greedy
