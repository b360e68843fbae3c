"""Generation for a batch of queries from different users in one forward pass per token.

Each row carries its own user: the rows' LoRA factors (stage 3) or embeddings
(stage 2) are gathered once and applied with batched matmuls at every decoding
step, so 32 queries of 32 users decode together. Prompts are left-padded.
Decoding goes through :class:`~properlm.model.decoding.DecodeBatch`, the same
path the server's continuous batching uses.
"""

from __future__ import annotations

import torch

from properlm.model.decoding import DecodeBatch, Row, choose
from properlm.model.prompts import encode_prompt


def stop_ids(tok) -> set[int]:
    """Token ids that end an answer: EOS and the chat template's end-of-turn."""
    out = {tok.eos_token_id}
    if "<|im_end|>" in tok.get_vocab():
        out.add(tok.convert_tokens_to_ids("<|im_end|>"))
    return {t for t in out if t is not None}


@torch.no_grad()
def generate(model, tok, prompts: list[str], lora_users: list[str | None] | None = None,
             emb_users: list[str | None] | None = None, max_new_tokens: int = 16, max_prompt_tokens: int = 512,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
             batch_size: int = 32, bf16: bool = False, seed: int = 0) -> list[str]:
    """Answer ``prompts``; row i is personalized for ``lora_users[i]`` / ``emb_users[i]``.

    Args:
        model: a :class:`ProperModel` or any HF causal LM (then users are ignored).
        tok: the tokenizer.
        prompts: raw prompts (the chat template is applied here).
        lora_users: per row, a stage-3 user or None (no user LoRA).
        emb_users: per row, a stage-2 embedding user or None (fallback routing).
        max_new_tokens: answer length limit.
        max_prompt_tokens: prompts are cut to this many tokens.
        do_sample, temperature, top_p, top_k: sampling (greedy by default).
        batch_size: rows per forward pass.
        bf16: bfloat16 autocast.
        seed: sampling seed; each row draws from its own generator seeded with it, so a
            row's sample does not depend on the other rows of its batch.

    Returns:
        The decoded answers, stripped.
    """
    n = len(prompts)
    lora_users = lora_users or [None] * n
    emb_users = emb_users or [None] * n
    if not (len(lora_users) == len(emb_users) == n):
        raise ValueError("prompts, lora_users and emb_users must have the same length")
    stops = stop_ids(tok)
    out: list[str] = [""] * n
    for s in range(0, n, batch_size):
        idx = list(range(s, min(n, s + batch_size)))
        rows = [Row(i, encode_prompt(tok, prompts[i], max_prompt_tokens), lora_users[i], emb_users[i]) for i in idx]
        gens = {i: torch.Generator().manual_seed(seed) for i in idx} if do_sample else {}
        batch = DecodeBatch(model, tok.pad_token_id, bf16)
        logits = batch.add(rows)
        answers: dict[int, list[int]] = {i: [] for i in idx}
        while len(batch):
            picks = [choose(logits[j], temperature if do_sample else 0.0, top_p, top_k, gens.get(r.key))
                     for j, r in enumerate(batch.rows)]
            done, keep = set(), []
            for r, t in zip(batch.rows, picks):
                if t in stops:
                    done.add(r.key)
                    continue
                answers[r.key].append(t)
                if len(answers[r.key]) >= max_new_tokens:
                    done.add(r.key)
                else:
                    keep.append(t)
            batch.remove(done)
            if len(batch):
                logits = batch.step(keep)
        for i in idx:
            out[i] = tok.decode(answers[i], skip_special_tokens=True).strip()
    return out
