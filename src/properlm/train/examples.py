"""Training examples: users' data as (prompt, answer) pairs, tokenized and batched.

A history item becomes a pair through its task's template (OPPU's
``history -> query/answer`` conversion); a labelled query is a pair as is. The
prompt is wrapped in the tokenizer's chat template when it has one, and the
loss is taken on the answer tokens (plus end-of-turn) only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from properlm.data.schema import User
from properlm.data.tasks import get_task

SYSTEM_PROMPT = "You are a personalized assistant."


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


def format_prompt(tok, prompt: str) -> str:
    """The prompt as the model sees it: the chat template's user turn, ready for the answer."""
    if getattr(tok, "chat_template", None):
        msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return prompt + "\n"


def _has_token(tok, token: str) -> bool:
    """Whether ``token`` is in the vocabulary (``tok.get_vocab()`` builds a 49k-entry dict: ~20 ms a call)."""
    tid = tok.convert_tokens_to_ids(token)
    return tid is not None and (tid != tok.unk_token_id or token == tok.unk_token)


def end_of_answer(tok) -> str:
    """Text that closes an answer: the chat end-of-turn token, else EOS."""
    if getattr(tok, "chat_template", None) and _has_token(tok, "<|im_end|>"):
        return "<|im_end|>"
    return tok.eos_token or ""


def encode_prompt(tok, prompt: str, max_prompt_tokens: int) -> list[int]:
    """Token ids of a formatted prompt, the prompt text cut to ``max_prompt_tokens`` tokens."""
    ids = tok(prompt, add_special_tokens=False).input_ids
    if len(ids) > max_prompt_tokens:
        prompt = tok.decode(ids[:max_prompt_tokens])
    return tok(format_prompt(tok, prompt), add_special_tokens=False).input_ids


def encode(tok, ex: Example, max_len: int = 256, max_answer_tokens: int = 64) -> Encoded:
    """Tokenize an example; the prompt is truncated so prompt + answer fit ``max_len``."""
    ans = tok(ex.answer + end_of_answer(tok), add_special_tokens=False).input_ids[:max_answer_tokens]
    overhead = len(tok(format_prompt(tok, ""), add_special_tokens=False).input_ids)
    p = encode_prompt(tok, ex.prompt, max(8, max_len - len(ans) - overhead))
    return Encoded(ex.user_id, p + ans, [-100] * len(p) + ans)


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into (B, T) tensors."""
    t = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), t), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), t), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), t), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
