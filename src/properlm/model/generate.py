"""Generation for a batch of queries from different users in one forward pass per token.

Each row carries its own user: the rows' LoRA factors (stage 3) or embeddings
(stage 2) are gathered once and applied with batched matmuls at every decoding
step, so 32 queries of 32 users decode together. Prompts are left-padded.
"""

from __future__ import annotations

import torch

from properlm.model.proper import ProperModel
from properlm.model.prompts import encode_prompt
from properlm.model.device import autocast, device_of


@torch.no_grad()
def generate(model, tok, prompts: list[str], lora_users: list[str | None] | None = None,
             emb_users: list[str | None] | None = None, max_new_tokens: int = 16, max_prompt_tokens: int = 512,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None, batch_size: int = 32,
             bf16: bool = False, seed: int = 0) -> list[str]:
    """Answer ``prompts``; row i is personalized for ``lora_users[i]`` / ``emb_users[i]``.

    Args:
        model: a :class:`ProperModel` or any HF causal LM (then users are ignored).
        tok: the tokenizer.
        prompts: raw prompts (the chat template is applied here).
        lora_users: per row, a stage-3 user or None (no user LoRA).
        emb_users: per row, a stage-2 training user or None (fallback routing).
        max_new_tokens: answer length limit.
        max_prompt_tokens: prompts are cut to this many tokens.
        do_sample, temperature, top_p, top_k: sampling (greedy by default).
        batch_size: rows per forward pass.
        bf16: bfloat16 autocast.
        seed: sampling seed.

    Returns:
        The decoded answers, stripped.
    """
    n = len(prompts)
    lora_users = lora_users or [None] * n
    emb_users = emb_users or [None] * n
    if not (len(lora_users) == len(emb_users) == n):
        raise ValueError("prompts, lora_users and emb_users must have the same length")
    lm = model.lm if isinstance(model, ProperModel) else model
    device = device_of(lm)
    stop = [tok.eos_token_id] + ([tok.convert_tokens_to_ids("<|im_end|>")] if "<|im_end|>" in tok.get_vocab() else [])
    out: list[str] = []
    torch.manual_seed(seed)
    for s in range(0, n, batch_size):
        enc = [encode_prompt(tok, p, max_prompt_tokens) for p in prompts[s:s + batch_size]]
        t = max(len(e) for e in enc)
        cpu = torch.device("cpu")
        ids = torch.full((len(enc), t), tok.pad_token_id, dtype=torch.long, device=cpu)
        mask = torch.zeros((len(enc), t), dtype=torch.long, device=cpu)
        for i, e in enumerate(enc):  # left padding, so every row's next token is at the end
            ids[i, t - len(e):] = torch.tensor(e, device=cpu)
            mask[i, t - len(e):] = 1
        ids, mask = ids.to(device), mask.to(device)
        if isinstance(model, ProperModel):
            model.bind(emb_users=emb_users[s:s + batch_size], lora_users=lora_users[s:s + batch_size])
        with autocast(bf16, device):
            gen = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                              do_sample=do_sample, temperature=temperature if do_sample else None,
                              top_p=top_p if do_sample else None, top_k=top_k if do_sample else None,
                              eos_token_id=stop, pad_token_id=tok.pad_token_id)
        out += [tok.decode(g[t:], skip_special_tokens=True).strip() for g in gen]
    if isinstance(model, ProperModel):
        model.state.clear()
    return out
