"""Scoring candidate answers: the log-likelihood of each label string, per row's user.

For classification and rating tasks, instead of generating freely and parsing
the text, each label (``"love"``, ``"4"``, ...) is scored as the answer to the
prompt: the summed log-probability of its tokens and of the end-of-answer
token, exactly as training computes the loss on an answer. The best label is
the prediction; for ratings the probabilities over the labels also give an
expected value.
"""

from __future__ import annotations

import torch

from properlm.model.device import autocast, device_of
from properlm.model.prompts import encode_prompt, end_of_answer
from properlm.model.proper import ProperModel, completion_nll


@torch.no_grad()
def label_loglik(model, tok, prompts: list[str], labels: list[str], lora_users: list[str | None] | None = None,
                 emb_users: list[str | None] | None = None, max_prompt_tokens: int = 512, batch_size: int = 64,
                 bf16: bool = False) -> torch.Tensor:
    """Log-likelihood (n, L) of every label as the answer to every prompt, row i personalized for its users.

    Args:
        model: a :class:`ProperModel` or any HF causal LM.
        tok: the tokenizer.
        prompts: raw prompts (the chat template is applied here, as for generation).
        labels: the candidate answers.
        lora_users, emb_users: per prompt, the users whose LoRA / stage-2 embedding apply.
        max_prompt_tokens: prompts are cut to this many tokens.
        batch_size: (prompt, label) rows per forward pass.
        bf16: bfloat16 autocast.
    """
    n = len(prompts)
    lora_users = lora_users or [None] * n
    emb_users = emb_users or [None] * n
    lm = model.lm if isinstance(model, ProperModel) else model
    device = device_of(lm)
    eoa = end_of_answer(tok)
    answers = [tok(lab + eoa, add_special_tokens=False).input_ids for lab in labels]
    rows = []  # (prompt index, label index, ids, n_prompt)
    for i, p in enumerate(prompts):
        pid = encode_prompt(tok, p, max_prompt_tokens)
        rows += [(i, j, pid + a, len(pid)) for j, a in enumerate(answers)]
    out = torch.empty(n, len(labels), dtype=torch.float32)
    cpu = torch.device("cpu")
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        t = max(len(r[2]) for r in chunk)
        ids = torch.full((len(chunk), t), tok.pad_token_id, dtype=torch.long, device=cpu)
        mask = torch.zeros((len(chunk), t), dtype=torch.long, device=cpu)
        tgt = torch.full((len(chunk), t), -100, dtype=torch.long, device=cpu)
        for k, (_, _, seq, np_) in enumerate(chunk):
            ids[k, :len(seq)] = torch.tensor(seq, device=cpu)
            mask[k, :len(seq)] = 1
            tgt[k, np_:len(seq)] = torch.tensor(seq[np_:], device=cpu)
        if isinstance(model, ProperModel):
            model.bind(lora_users=[lora_users[r[0]] for r in chunk], emb_users=[emb_users[r[0]] for r in chunk])
        with autocast(bf16, device):
            nll, _ = completion_nll(lm, ids.to(device), mask.to(device), tgt.to(device))
        for (i, j, _, _), v in zip(chunk, nll.float().cpu()):
            out[i, j] = -v
    if isinstance(model, ProperModel):
        model.state.clear()
    return out


def expected_value(loglik: torch.Tensor, values: list[float]) -> torch.Tensor:
    """Expected value (n,) of numeric labels under the softmax of their log-likelihoods (n, L)."""
    p = torch.softmax(loglik, dim=-1)
    return p @ torch.tensor(values, dtype=p.dtype)
