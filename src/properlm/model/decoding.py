"""Token-by-token decoding of a batch whose rows belong to different users and may join or leave.

:class:`DecodeBatch` holds the running rows: their KV cache (left-padded, one
``DynamicCache`` for the batch), attention mask and positions, and the rows'
users bound on the :class:`~properlm.model.proper.ProperModel`. Each call of
:meth:`DecodeBatch.step` is one forward pass over every row (one new token
each), whatever mix of users they are. New rows are prefilled on their own and
merged in between steps (continuous batching); finished rows are dropped.
``properlm generate`` and the server both decode through it, so a row's answer
is computed the same way on either path.

Rows are independent: a row's logits depend only on its own tokens and its
own user (masked positions contribute exact zeros), which the tests check
against decoding each row alone.

A row's user factors are read from the model's banks once, when it joins
(:meth:`ProperModel.bind` on the joining rows), and then travel with the row
like its KV cache: concatenated when rows join, selected when rows leave
(:class:`BoundRows`). A step binds nothing: it hands the rows' factors, and
what the layers derived from them for the fused inference path
(:class:`~properlm.model.layers.RoutingState` ``cache``), back to the model.
So an answer is decoded to its end with the LoRA it started with: a user's
LoRA replaced in the bank meanwhile applies from their next request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from properlm.model.device import autocast, device_of
from properlm.model.layers import RoutingState
from properlm.model.proper import ProperModel


@dataclass
class Row:
    """One sequence being decoded.

    Attributes:
        key: the caller's handle for the row.
        prompt: token ids of the formatted prompt.
        lora_user, emb_user: whose stage-3 LoRA / stage-2 embedding apply (None: none).
        generated: token ids produced so far.
    """

    key: object
    prompt: list[int]
    lora_user: str | None = None
    emb_user: str | None = None
    generated: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.generated)


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


@dataclass
class BoundRows:
    """The rows' users as the model's :class:`RoutingState` holds them, kept with the rows between steps.

    Attributes:
        emb: site -> (B, d_e) stage-2 embeddings (absent: every row routes with the fallback).
        lora: site -> (A (B, r, d_in), B (B, d_out, r)) LoRA factors, zeros for rows without one
            (absent: no row has one).
        lora_rows: (B,) bool, the rows with a LoRA when only some have one.
        lora_users: per row, whose LoRA (None: none).
        cache: what the layers derived from these factors (kept across steps; per set of rows).
    """

    emb: dict[str, torch.Tensor]
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    lora_rows: torch.Tensor | None
    lora_users: list[str | None]
    cache: dict = field(default_factory=dict)

    @property
    def shared(self) -> bool:
        """Every row has the same user's LoRA."""
        return bool(self.lora) and self.lora_users[0] is not None and len(set(self.lora_users)) == 1

    @classmethod
    def of(cls, state: RoutingState, lora_users: list[str | None]) -> "BoundRows":
        return cls(dict(state.user_emb), dict(state.user_lora), state.lora_rows, list(lora_users))

    def install(self, state: RoutingState) -> None:
        state.clear()
        state.user_emb, state.user_lora, state.lora_rows = self.emb, self.lora, self.lora_rows
        state.lora_shared, state.cache = self.shared, self.cache

    def _normal(self) -> "BoundRows":
        if self.lora_rows is not None:
            if bool(self.lora_rows.all()):
                self.lora_rows = None
            elif not bool(self.lora_rows.any()):
                self.lora, self.lora_rows = {}, None
        return self

    def select(self, idx: torch.Tensor) -> "BoundRows":
        """The rows ``idx`` (in that order)."""
        return BoundRows({k: v.index_select(0, idx) for k, v in self.emb.items()},
                         {k: (a.index_select(0, idx), b.index_select(0, idx)) for k, (a, b) in self.lora.items()},
                         None if self.lora_rows is None else self.lora_rows.index_select(0, idx),
                         [self.lora_users[i] for i in idx.tolist()])._normal()

    def cat(self, other: "BoundRows", model: ProperModel) -> "BoundRows":
        """These rows, then ``other``'s; a side without embeddings or LoRAs gets the fallback embedding / zeros."""
        n, m = len(self.lora_users), len(other.lora_users)
        emb = {}
        for k in self.emb.keys() | other.emb.keys():
            fb = model.sites[k].router.fallback_emb
            emb[k] = torch.cat([self.emb[k] if k in self.emb else fb.expand(n, -1),
                                other.emb[k] if k in other.emb else fb.expand(m, -1)])
        lora = {}
        for k in self.lora.keys() | other.lora.keys():
            a, b = self.lora[k] if k in self.lora else (None, None)
            a2, b2 = other.lora[k] if k in other.lora else (None, None)
            a = a if a is not None else a2.new_zeros((n, *a2.shape[1:]))
            b = b if b is not None else b2.new_zeros((n, *b2.shape[1:]))
            a2 = a2 if a2 is not None else a.new_zeros((m, *a.shape[1:]))
            b2 = b2 if b2 is not None else b.new_zeros((m, *b.shape[1:]))
            lora[k] = (torch.cat([a, a2]), torch.cat([b, b2]))
        rows = None
        if lora:
            def mask(side: "BoundRows", k: int) -> torch.Tensor:
                if side.lora_rows is not None:
                    return side.lora_rows
                return torch.full((k,), bool(side.lora), dtype=torch.bool, device=model.device)
            rows = torch.cat([mask(self, n), mask(other, m)])
        return BoundRows(emb, lora, rows, self.lora_users + other.lora_users)._normal()


class DecodeBatch:
    """The rows being decoded together, their cache and users.

    Args:
        model: a :class:`ProperModel` or a plain HF causal LM (then users are ignored).
        pad_id: the tokenizer's pad id (for left padding).
        bf16: bfloat16 autocast.
    """

    def __init__(self, model, pad_id: int, bf16: bool = False):
        self.model = model
        self.lm = model.lm if isinstance(model, ProperModel) else model
        self.device = device_of(self.lm)
        self.pad_id, self.bf16 = pad_id, bf16
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None    # (B, T) 1 on real tokens
        self.next_logits: torch.Tensor | None = None  # (B, V) float32, the logits of each row's next token
        self.bound: BoundRows | None = None       # the rows' users (a ProperModel only)

    def __len__(self) -> int:
        return len(self.rows)

    # -- users ---------------------------------------------------------------------------------
    def _bind(self, rows: list[Row]) -> BoundRows | None:
        """The joining rows' users, read from the banks (the only place a decode batch reads them)."""
        if not isinstance(self.model, ProperModel):
            return None
        users = [r.lora_user for r in rows]
        try:
            self.model.bind(lora_users=users, emb_users=[r.emb_user for r in rows])
            return BoundRows.of(self.model.state, users)
        finally:
            self.model.state.clear()

    def _forward(self, ids, mask, pos, cache, bound: BoundRows | None) -> torch.Tensor:
        if bound is not None:
            bound.install(self.model.state)
        try:
            with torch.no_grad(), autocast(self.bf16, self.device):
                # logits_to_keep=1: the LM head only at the last position (a prefill of long prompts
                # spent ~20% of its time on logits nobody reads).
                out = self.lm(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                              use_cache=True, logits_to_keep=1)
        finally:
            if isinstance(self.model, ProperModel):
                self.model.state.clear()
        return out.logits[:, -1].float()

    # -- joining -------------------------------------------------------------------------------
    @torch.no_grad()
    def add(self, rows: list[Row]) -> torch.Tensor:
        """Prefill ``rows`` (together, left-padded) and merge them into the batch; their next-token logits (b, V)."""
        if not rows:
            return torch.empty(0)
        t = max(r.length for r in rows)
        cpu = torch.device("cpu")
        ids = torch.full((len(rows), t), self.pad_id, dtype=torch.long, device=cpu)
        mask = torch.zeros((len(rows), t), dtype=torch.long, device=cpu)
        for i, r in enumerate(rows):
            seq = r.prompt + r.generated
            ids[i, t - len(seq):] = torch.tensor(seq, device=cpu)
            mask[i, t - len(seq):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        bound = self._bind(rows)
        logits = self._forward(ids, mask, pos, cache, bound)
        self._merge(rows, cache, mask, logits, bound)
        return logits

    def _merge(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor, logits: torch.Tensor,
               bound: BoundRows | None) -> None:
        if self.cache is None or not self.rows:
            self.rows, self.cache, self.mask, self.next_logits = list(rows), cache, mask, logits
            self.bound = bound  # with what the prefill derived from it: the same rows step on
            return
        t_old, t_new = self.mask.shape[1], mask.shape[1]
        t = max(t_old, t_new)
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, t - t_old, 2), _pad_left(new.keys, t - t_new, 2)], 0)
            old.values = torch.cat([_pad_left(old.values, t - t_old, 2), _pad_left(new.values, t - t_new, 2)], 0)
        self.mask = torch.cat([_pad_left(self.mask, t - t_old, 1), _pad_left(mask, t - t_new, 1)], 0)
        self.rows += rows
        self.next_logits = torch.cat([self.next_logits, logits], 0)
        if bound is not None:
            self.bound = self.bound.cat(bound, self.model)

    # -- leaving -------------------------------------------------------------------------------
    def remove(self, keys: set) -> None:
        """Drop the rows with these keys (finished, cancelled, timed out)."""
        keep = [i for i, r in enumerate(self.rows) if r.key not in keys]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask, self.next_logits, self.bound = [], None, None, None, None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys.index_select(0, idx), layer.values.index_select(0, idx)
        self.mask = self.mask.index_select(0, idx)
        self.next_logits = self.next_logits.index_select(0, idx)
        self.rows = [self.rows[i] for i in keep]
        if self.bound is not None:
            self.bound = self.bound.select(idx)
        # Columns every row has as padding are dropped (a long prompt that left leaves no dead width behind).
        lead = int((self.mask.cumsum(1) == 0).sum(1).min())
        if lead:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:].contiguous(), layer.values[:, :, lead:].contiguous()
            self.mask = self.mask[:, lead:].contiguous()

    # -- one token for every row ---------------------------------------------------------------
    @torch.no_grad()
    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed each row its chosen next token (in row order); returns the logits after it (B, V)."""
        if len(tokens) != len(self.rows):
            raise ValueError("one token per row")
        for r, tok in zip(self.rows, tokens):
            r.generated.append(int(tok))
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
        pos = torch.tensor([[r.length - 1] for r in self.rows], dtype=torch.long, device=self.device)
        self.next_logits = self._forward(ids, self.mask, pos, self.cache, self.bound)
        return self.next_logits


def choose(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> int:
    """The next token from one row's logits (V,): greedy at temperature 0, else sampled (top-k, then top-p)."""
    if temperature <= 0:
        return int(logits.argmax())
    # A tiny temperature is greedy in effect; below 1e-5 it would overflow float32 (inf/nan probabilities).
    x = logits.float() / max(temperature, 1e-5)
    if top_k is not None and 0 < top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, -1)
    if top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        cut = (sp.cumsum(0) - sp) >= top_p  # keep the smallest prefix whose mass reaches top_p
        sp = sp.masked_fill(cut, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, si, sp)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
