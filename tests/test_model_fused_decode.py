"""A decode batch keeps its rows' users between steps: the banks are read when rows join.

The users' factors travel with the rows (concatenated on a join, selected on a leave),
with what the layers derived from them for the fused path, so a step binds nothing
and a one-user batch runs three extra matmuls per wrapped linear.
"""

from __future__ import annotations

from properlm.model.decoding import DecodeBatch, Row
from properlm.model.prompts import encode_prompt
from test_model_fused import CountMatmuls, _stage3  # tests/ is on the path


def _greedy(pm, tok, h, rows, steps=5):
    b = DecodeBatch(pm, tok.pad_token_id)
    b.add([Row(i, encode_prompt(tok, h.prompt(i), 512), lora, emb) for i, (lora, emb) in enumerate(rows)])
    out = [[] for _ in rows]
    for _ in range(steps):
        picks = [int(t) for t in b.next_logits.argmax(-1)]
        for o, t in zip(out, picks):
            o.append(t)
        b.step(picks)
    return out


def _matmuls_per_step(model, tok, h, rows, fuse=True) -> int:
    model_state = getattr(model, "state", None)
    if model_state is not None:
        model_state.fuse = fuse
    b = DecodeBatch(model, tok.pad_token_id)
    b.add([Row(i, encode_prompt(tok, h.prompt(i), 512), lora, emb) for i, (lora, emb) in enumerate(rows)])
    b.step([int(t) for t in b.next_logits.argmax(-1)])  # the first step after the prefill
    with CountMatmuls() as m:
        b.step([int(t) for t in b.next_logits.argmax(-1)])
    if model_state is not None:
        model_state.fuse = True
    return m.n


def test_a_one_user_decode_step_runs_three_more_matmuls_per_wrapped_linear(group_model, fresh_lm, tok, h):
    pm = _stage3(group_model, h)
    sites = len(pm.sites)
    plain = _matmuls_per_step(fresh_lm(), tok, h, [(None, None)])
    # one user: [A_1..A_K; A_u; router] on x, a 0/1 matmul spreading the gates, [B_1..B_K, B_u]
    assert _matmuls_per_step(pm, tok, h, [("ta", "ua")]) == plain + 3 * sites
    # rows of different users: also A_u and B_u by bmm and the router's W_l (A_u x)
    assert _matmuls_per_step(pm, tok, h, [("ta", "ua"), ("tb", None)]) == plain + 6 * sites
    # the training path: the user's A and B, the router's text, embedding and LoRA terms, the experts' A and B
    assert _matmuls_per_step(pm, tok, h, [("ta", "ua")], fuse=False) == plain + 7 * sites


def test_a_decode_batch_reads_the_banks_once_per_join(group_model, tok, h, monkeypatch):
    pm = _stage3(group_model, h)
    reads = []
    for name in ("user_loras", "user_embs"):
        bank = getattr(pm, name)
        orig = bank.gather_users
        monkeypatch.setattr(bank, "gather_users", lambda users, *a, orig=orig, name=name, **k:
                            reads.append((name, tuple(users))) or orig(users, *a, **k))
    b = DecodeBatch(pm, tok.pad_token_id)
    b.add([Row(0, encode_prompt(tok, h.prompt(0), 512), "ta", "ua")])
    for _ in range(4):
        b.step([int(t) for t in b.next_logits.argmax(-1)])
    assert reads == [("user_embs", ("ua",)), ("user_loras", ("ta",))]
    b.add([Row(1, encode_prompt(tok, h.prompt(1), 512), "tb", None)])   # only the joining row is read
    for _ in range(3):
        b.step([int(t) for t in b.next_logits.argmax(-1)])
    b.remove({0})
    b.step([int(t) for t in b.next_logits.argmax(-1)])
    assert reads == [("user_embs", ("ua",)), ("user_loras", ("ta",)), ("user_loras", ("tb",))]


def test_an_answer_keeps_the_lora_it_started_with(group_model, tok, h):
    """A user's LoRA replaced in the bank mid-answer applies from their next request, not inside the answer."""
    pm = _stage3(group_model, h)
    old = _greedy(pm, tok, h, [("ta", "ua")])
    b = DecodeBatch(pm, tok.pad_token_id)
    b.add([Row(0, encode_prompt(tok, h.prompt(0), 512), "ta", "ua")])
    got = []
    for i in range(5):
        got.append(int(b.next_logits[0].argmax()))
        if i == 1:
            for k, v in pm.user_loras.params.items():   # ta's LoRA replaced (a refresh)
                if k.endswith("lora_B"):
                    v[pm.user_loras.index("ta")] *= -3.0
        b.step([got[-1]])
    assert got == old[0]
    new = _greedy(pm, tok, h, [("ta", "ua")])
    assert new != old                                       # the next request gets the new LoRA
    b.add([Row(1, encode_prompt(tok, h.prompt(0), 512), "ta", "ua")])
    assert int(b.next_logits[1].argmax()) == new[0][0]
