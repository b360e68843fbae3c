"""Training examples: users' data as (prompt, answer) pairs, tokenized and batched.

A history item becomes a pair through its task's template (OPPU's
``history -> query/answer`` conversion); a labelled query is a pair as is. The
prompt is wrapped in the tokenizer's chat template when it has one
(:mod:`properlm.model.prompts`), and the loss is taken on the answer tokens
(plus end-of-turn) only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from properlm.data.schema import User
from properlm.data.tasks import get_task
from properlm.model.prompts import encode_prompt, end_of_answer, format_prompt

@dataclass
class Example:
    """One training or evaluation pair for one user."""

    user_id: str
    prompt: str
    answer: str


@dataclass
class Encoded:
    """A tokenized example: ``ids`` (prompt + answer) and ``labels`` (-100 on the prompt)."""

    user_id: str
    ids: list[int]
    labels: list[int]


def user_examples(task: str, user: User, history: bool = True, queries: bool = False) -> list[Example]:
    """A user's history items (and, optionally, labelled queries) as pairs."""
    t = get_task(task)
    out = []
    if history:
        out += [Example(user.id, *t.history_pair(it)) for it in user.history]
    if queries:
        out += [Example(user.id, t.query_prompt(q), q.gold) for q in user.queries if q.gold is not None]
    return out


def encode(tok, ex: Example, max_len: int = 256, max_answer_tokens: int = 64) -> Encoded:
    """Tokenize an example; the prompt is truncated so prompt + answer fit ``max_len``."""
    ans = tok(ex.answer + end_of_answer(tok), add_special_tokens=False).input_ids[:max_answer_tokens]
    overhead = len(tok(format_prompt(tok, ""), add_special_tokens=False).input_ids)
    p = encode_prompt(tok, ex.prompt, max(8, max_len - len(ans) - overhead))
    return Encoded(ex.user_id, p + ans, [-100] * len(p) + ans)


def collate(batch: list[Encoded], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into (B, T) tensors on ``device``.

    Built on the CPU (explicitly, whatever torch's default device is) and moved
    in one copy per tensor.
    """
    t = max(len(e.ids) for e in batch)
    cpu = torch.device("cpu")
    ids = torch.full((len(batch), t), pad_id, dtype=torch.long, device=cpu)
    labels = torch.full((len(batch), t), -100, dtype=torch.long, device=cpu)
    mask = torch.zeros((len(batch), t), dtype=torch.long, device=cpu)
    for i, e in enumerate(batch):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids, device=cpu)
        labels[i, :n] = torch.tensor(e.labels, device=cpu)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
