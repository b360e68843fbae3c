"""Scoring candidate answers: the log-likelihood of each label string, per row's user.

For classification and rating tasks, instead of generating freely and parsing
the text, each label (``"love"``, ``"4"``, ...) is scored as the answer to the
prompt: the summed log-probability of its tokens and of the end-of-answer
token, exactly as training computes the loss on an answer. The best label is
the prediction; for ratings the probabilities over the labels also give an
expected value. A sum of log-probabilities favours labels of fewer tokens (each
token adds a negative term), which matters where labels differ in length
(LaMP-2M's tags: "action" against "based on a book"), so :func:`per_token` also
gives the length-normalised score, the mean log-probability per scored token.

Each prompt runs through the model once: its last position predicts every
label's first token, and the labels' remaining tokens run as continuations
from the prompt's KV cache, one row per (prompt, label), each with its prompt's
users. A query then costs about one prompt plus its labels' few tokens, not one
prompt per label. The numbers are those of scoring each ``prompt + label`` as
one sequence (the tests compare them), and the label's tokens are those of
``tok(label + end_of_answer)``, tokenized apart from the prompt as training does.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from properlm.model.cross_entropy import cross_entropy
from properlm.model.device import autocast, device_of
from properlm.model.prompts import encode_prompt, end_of_answer
from properlm.model.proper import ProperModel


def label_token_ids(tok, labels: list[str]) -> list[list[int]]:
    """The scored tokens of each label: the label and the end-of-answer token, tokenized without the prompt.

    Raises:
        ValueError: a label with no token to score.
    """
    eoa = end_of_answer(tok)
    out = [tok(lab + eoa, add_special_tokens=False).input_ids for lab in labels]
    empty = [lab for lab, a in zip(labels, out) if not a]
    if empty:
        raise ValueError(f"label {empty[0]!r} has no token to score")
    return out


def label_lengths(tok, labels: list[str]) -> torch.Tensor:
    """How many tokens (L,) each label's log-likelihood sums over: its own and the end-of-answer token."""
    return torch.tensor([len(a) for a in label_token_ids(tok, labels)], dtype=torch.float32)


def per_token(loglik: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Length-normalised scores (n, L): each label's summed log-likelihood (n, L) over its token count (L,)."""
    return loglik / lengths.to(loglik.dtype)


def _pad_right(seqs: list[list[int]], pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of right-padded sequences, built on the CPU."""
    cpu = torch.device("cpu")
    t = max(1, max(len(s) for s in seqs)) if width is None else width
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long, device=cpu)
    mask = torch.zeros((len(seqs), t), dtype=torch.long, device=cpu)
    for k, s in enumerate(seqs):
        if s:
            ids[k, :len(s)] = torch.tensor(s, device=cpu)
            mask[k, :len(s)] = 1
    return ids, mask


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
        batch_size: prompts per prefill pass, and (prompt, label) continuation rows per pass
            (at least one prompt's labels). A pass keeps its prompts' KV cache, and a continuation
            pass a copy of it per row: about twice the keys and values of ``batch_size`` prompts.
        bf16: bfloat16 autocast.
    """
    n = len(prompts)
    lora_users = lora_users or [None] * n
    emb_users = emb_users or [None] * n
    if not (len(lora_users) == len(emb_users) == n):
        raise ValueError("prompts, lora_users and emb_users must have the same length")
    lm = model.lm if isinstance(model, ProperModel) else model
    device = device_of(lm)
    answers = label_token_ids(tok, labels)
    n_labels = len(labels)
    first = torch.tensor([a[0] for a in answers], dtype=torch.long, device=device)          # (L,)
    # The continuation of label j is its tokens but the last (each predicts the next one).
    cont_ids, cont_mask = _pad_right([a[:-1] for a in answers], tok.pad_token_id)          # (L, m)
    cont_tgt = torch.full_like(cont_ids, -100)
    for j, a in enumerate(answers):
        cont_tgt[j, :len(a) - 1] = torch.tensor(a[1:], dtype=torch.long)
    has_cont = bool((cont_tgt != -100).any())
    cont_ids, cont_mask, cont_tgt = cont_ids.to(device), cont_mask.to(device), cont_tgt.to(device)
    pids = [encode_prompt(tok, p, max_prompt_tokens) for p in prompts]
    order = sorted(range(n), key=lambda i: len(pids[i]))  # prompts of similar length share a pass: less padding
    out = torch.empty(n, n_labels, dtype=torch.float32)
    per_pass = max(1, batch_size // max(n_labels, 1))     # prompts whose labels fill one continuation pass
    try:
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            out[idx] = _score_prompts(model, lm, [pids[i] for i in idx], [lora_users[i] for i in idx],
                                      [emb_users[i] for i in idx], first, cont_ids, cont_mask, cont_tgt, has_cont,
                                      per_pass, tok.pad_token_id, bf16, device)
    finally:
        if isinstance(model, ProperModel):
            model.state.clear()
    return out


def _bind(model, lora_users: list[str | None], emb_users: list[str | None]) -> None:
    if isinstance(model, ProperModel):
        model.bind(lora_users=lora_users, emb_users=emb_users)


def _score_prompts(model, lm, pids: list[list[int]], lora_users, emb_users, first: torch.Tensor,
                   cont_ids: torch.Tensor, cont_mask: torch.Tensor, cont_tgt: torch.Tensor, has_cont: bool,
                   per_pass: int, pad_id: int, bf16: bool, device: torch.device) -> torch.Tensor:
    """Summed label log-likelihoods (P, L) of P prompts: one prefill, then the labels from its cache."""
    n_labels = first.shape[0]
    ids, mask = _pad_right(pids, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    n_prompt = mask.sum(1)                                                                # (P,)
    head, decoder = lm.get_output_embeddings(), lm.get_decoder()
    cache = DynamicCache()
    _bind(model, lora_users, emb_users)
    with autocast(bf16, device):
        hidden = decoder(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).last_hidden_state
        last = hidden[torch.arange(len(pids), device=device), n_prompt - 1]             # (P, H)
        logits = head(last)                                                               # (P, V)
    del hidden
    # -log p(first token): what cross_entropy computes (float32 log-sum-exp minus the picked logit).
    lse = torch.logsumexp(logits.float(), dim=-1)
    total = logits.float()[:, first] - lse.unsqueeze(1)                                   # (P, L)
    if not has_cont:
        return total.cpu()
    m = cont_ids.shape[1]
    steps = torch.arange(m, device=device)
    for s in range(0, len(pids), per_pass):
        rows = torch.arange(s, min(len(pids), s + per_pass), device=device)
        rep = rows.repeat_interleave(n_labels)                                            # (R,) prompt of each row
        k = len(rows)
        sub = DynamicCache([(layer.keys[rep], layer.values[rep]) for layer in cache.layers])
        c_ids, c_tgt = cont_ids.repeat(k, 1), cont_tgt.repeat(k, 1)                       # (R, m)
        c_mask = torch.cat([mask[rep], cont_mask.repeat(k, 1)], 1)
        pos = n_prompt[rep].unsqueeze(1) + steps                                          # after each row's prompt
        r_list = rep.tolist()
        _bind(model, [lora_users[i] for i in r_list], [emb_users[i] for i in r_list])
        with autocast(bf16, device):
            h = decoder(input_ids=c_ids, attention_mask=c_mask, position_ids=pos, cache=sub,
                        use_cache=True).last_hidden_state                                 # (R, m, H)
            sel = c_tgt != -100
            nll = cross_entropy(head(h[sel]), c_tgt[sel])                                 # float32
        per_row = torch.zeros(len(rep), dtype=torch.float32, device=device).index_add_(0, sel.nonzero()[:, 0], nll)
        total[rows] -= per_row.view(k, n_labels)
        del sub, h
    return total.cpu()


def expected_value(loglik: torch.Tensor, values: list[float]) -> torch.Tensor:
    """Expected value (n,) of numeric labels under the softmax of their log-likelihoods (n, L)."""
    p = torch.softmax(loglik, dim=-1)
    return p @ torch.tensor(values, dtype=p.dtype)
