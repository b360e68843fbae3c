"""PROPER on top of a stage-1 merged causal LM: group experts and per-user LoRAs.

``ProperModel`` replaces the FFN linears (gate/up/down) of every decoder layer
by :class:`~properlm.model.layers.ProperLinear` and owns the per-user banks:

- stage 2 (``add_group``): K LoRA experts per linear and a router per linear;
  with the user-aware router, one learned embedding per training user and site;
- stage 3 (``add_users``): one LoRA per target user on the same linears, and the
  shared LoRA-aware router (initialised from the stage-2 text router).

A forward pass takes the rows' user ids: ``bind(emb_users, lora_users)`` gathers
those users' rows of the banks and hands them to the layers, so one batch may
mix any users (rows with ``None`` have no user LoRA / use the embedding fallback).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from properlm.model.cross_entropy import cross_entropy
from properlm.model.layers import ProperLinear, Router, RoutingState, lora_dropout
from properlm.model.user_params import UserParams

FFN_TARGETS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ATTN_KV_TARGETS = ("self_attn.k_proj", "self_attn.v_proj")
EMBEDDINGS = ("per-site", "shared")


@dataclass
class Bound:
    """The banks' rows gathered for one forward pass (kept for the optimizer step)."""

    emb_rows: torch.Tensor | None = None
    emb_leaves: dict[str, torch.Tensor] | None = None
    lora_rows: torch.Tensor | None = None
    lora_leaves: dict[str, torch.Tensor] | None = None


def _freeze(*modules: nn.Module) -> None:
    """New stage modules start frozen like the base; a stage's trainer unfreezes what it trains.

    Otherwise stage 3 on a model rebuilt from disk (``add_group`` then ``train_users``)
    would compute weight gradients for the frozen experts at every step, unused.
    """
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)


def _rows_and_slots(bank: UserParams, users: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique bank rows present (P,) and each batch row's slot in them (B,), -1 for None."""
    idx = [bank.index(u) if u is not None else -1 for u in users]
    present = sorted({i for i in idx if i >= 0})
    pos = {r: j for j, r in enumerate(present)}
    return torch.tensor(present, dtype=torch.long), torch.tensor([pos.get(i, -1) for i in idx], dtype=torch.long)


class ProperModel(nn.Module):
    """A causal LM with PROPER's FFN adapters.

    Args:
        lm: a Llama-style ``PreTrainedModel`` whose decoder layers have
            ``mlp.gate_proj/up_proj/down_proj`` (stage-1 adapter already merged).
        targets: which linears of each decoder layer to wrap, as paths inside the
            layer (PROPER: the FFN; the OPPU-kv baseline: attention k and v).
    """

    def __init__(self, lm: nn.Module, targets: tuple[str, ...] = FFN_TARGETS):
        super().__init__()
        self.lm = lm
        for p in self.lm.parameters():
            p.requires_grad_(False)
        self.state = RoutingState()
        self.sites: dict[str, ProperLinear] = {}
        for i, layer in enumerate(lm.get_decoder().layers):
            for t in targets:
                parent_path, _, attr = t.rpartition(".")
                parent = layer.get_submodule(parent_path) if parent_path else layer
                site = f"layers.{i}.{t}"
                wrapped = ProperLinear(getattr(parent, attr), site, self.state)
                setattr(parent, attr, wrapped)
                self.sites[site] = wrapped
        self.user_embs: UserParams | None = None
        self.user_loras: UserParams | None = None
        self.shared_embedding = False

    def emb_key(self, site: str) -> str:
        """Name in the embedding bank of the stage-2 user embedding that ``site``'s router reads."""
        return "user_emb" if self.shared_embedding else f"{site}.user_emb"

    # -- building the stages -------------------------------------------------------
    def add_group(self, num_experts: int, r: int, alpha: float, dropout: float, router: str,
                  user_dim: int, train_users: list[str], seed: int = 0, text_router_init: str = "kaiming",
                  user_embedding: str = "per-site") -> None:
        """Stage 2: K experts and a router on every site; embeddings for ``train_users``.

        ``text_router_init="zeros"`` starts the routers' text part at zero, so that
        routing starts uniform over experts and, with the user-aware router, differs
        between users only through their embeddings.

        ``user_embedding`` is ``"per-site"`` (one embedding per user and adapted
        linear) or ``"shared"`` (one per user, read by every site's router through
        that router's own ``W_u``).
        """
        if text_router_init not in ("kaiming", "zeros"):
            raise ValueError(f"text_router_init must be kaiming or zeros, got {text_router_init!r}")
        if user_embedding not in EMBEDDINGS:
            raise ValueError(f"user_embedding must be one of {EMBEDDINGS}, got {user_embedding!r}")
        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(seed)
            for s in self.sites.values():
                s.dropout = lora_dropout(dropout)
                s.add_experts(num_experts, r, alpha, router, user_dim)
                if text_router_init == "zeros":
                    nn.init.zeros_(s.router.w_text.weight)
                _freeze(s.experts, s.router)
        if router == "user-aware":
            self.shared_embedding = user_embedding == "shared"
            shapes = {self.emb_key(name): (user_dim,) for name in self.sites}
            self.user_embs = UserParams(train_users, shapes, {k: "normal" for k in shapes}, seed=seed)

    def add_users(self, user_ids: list[str], r: int, alpha: float, lora_aware_router: bool, seed: int = 0) -> None:
        """Stage 3: a LoRA per user on every site and, optionally, the shared LoRA-aware router.

        The LoRA-aware router replaces the stage-2 router; its text part starts
        from the stage-2 text weights and its LoRA part from zero, so at step 0
        it routes like stage 2's text router.
        """
        shapes, init = {}, {}
        for name, s in self.sites.items():
            shapes[f"{name}.lora_A"] = (r, s.base.in_features)
            shapes[f"{name}.lora_B"] = (s.base.out_features, r)
            init[f"{name}.lora_A"], init[f"{name}.lora_B"] = "kaiming", "zeros"
            s.user_scaling = alpha / r
        if self.user_loras is None:
            self.user_loras = UserParams(user_ids, shapes, init, seed=seed)
        else:
            self.user_loras.add_users(user_ids)
        if lora_aware_router:
            for s in self.sites.values():
                if s.router is not None and s.router.kind != "lora-aware":
                    old = s.router
                    s.router = Router(s.base.in_features, s.experts.k, "lora-aware", r)
                    s.router.w_text.weight.data.copy_(old.w_text.weight.data)
                    _freeze(s.router)

    def set_fallback_embedding(self) -> None:
        """Store the mean learned user embedding per site: the routing for unseen users."""
        if self.user_embs is None:
            return
        for name, s in self.sites.items():
            if s.router is not None and s.router.kind == "user-aware":
                s.router.fallback_emb.copy_(self.user_embs.params[self.emb_key(name)].mean(0))

    # -- parameters by stage -------------------------------------------------------
    def group_parameters(self) -> list[nn.Parameter]:
        return [p for s in self.sites.values() if s.experts is not None for p in s.experts.parameters()]

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for s in self.sites.values() if s.router is not None for p in s.router.parameters()]

    # -- forward -------------------------------------------------------------------
    def bind(self, emb_users: list[str | None] | None = None, lora_users: list[str | None] | None = None,
             requires_grad: bool = False, token_mask: torch.Tensor | None = None, record: bool = False) -> Bound:
        """Set the rows' users for the next forward pass(es).

        Args:
            emb_users: per row, a stage-2 training user (its embedding) or None (fallback).
            lora_users: per row, a stage-3 user (its LoRA) or None (no user LoRA).
            requires_grad: gather the users' rows as trainable leaves.
            token_mask: (B, T) real-token mask, for averaging routing weights.
            record: collect per-row routing weights in ``self.state.routes``.
        """
        self.state.clear()
        self.state.token_mask, self.state.record = token_mask, record
        out = Bound()
        if emb_users is not None and self.user_embs is not None and any(u is not None for u in emb_users):
            rows, slots = _rows_and_slots(self.user_embs, emb_users)
            leaves = self.user_embs.gather(rows, requires_grad)
            valid = (slots >= 0).unsqueeze(-1)
            for name, s in self.sites.items():
                if s.router is None or s.router.kind != "user-aware":
                    continue  # after stage 3 the LoRA-aware router replaces it and reads no embedding
                e = leaves[self.emb_key(name)][slots.clamp(min=0)]            # (B, d_e)
                self.state.user_emb[name] = torch.where(valid, e, s.router.fallback_emb.expand_as(e))
            out.emb_rows, out.emb_leaves = rows, leaves
        if lora_users is not None and self.user_loras is not None and any(u is not None for u in lora_users):
            rows, slots = _rows_and_slots(self.user_loras, lora_users)
            leaves = self.user_loras.gather(rows, requires_grad)
            # The usual training step has one row per user, in bank order: the gathered
            # leaves are then already the rows' factors, and copying them (and their
            # gradients back) per site would only cost time. Same values either way.
            one_each = len(rows) == len(slots) and bool((slots == torch.arange(len(slots))).all())
            valid = None if bool((slots >= 0).all()) else (slots >= 0).float().view(-1, 1, 1)
            for name in self.sites:
                a, b = leaves[f"{name}.lora_A"], leaves[f"{name}.lora_B"]       # (P, r, d_in), (P, d_out, r)
                if not one_each:
                    a, b = a[slots.clamp(min=0)], b[slots.clamp(min=0)]       # (B, ...)
                if valid is not None:
                    a, b = a * valid, b * valid                               # rows without a user LoRA: zeros
                self.state.user_lora[name] = (a, b)
            out.lora_rows, out.lora_leaves = rows, leaves
        return out

    def routing_vectors(self) -> torch.Tensor:
        """Per-row routing weights recorded in the last forward, averaged over sites: (B, K)."""
        if not self.state.routes:
            raise RuntimeError("no routing weights recorded: bind(..., record=True) before the forward pass")
        return torch.stack(self.state.routes).mean(0)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states (B, T, H) of the decoder (no LM head)."""
        return self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full logits (B, T, V) for the currently bound users."""
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def completion_nll(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL per row on completion tokens only, and their counts.

    The LM head runs only on positions that predict a label (the vocabulary
    projection is a large share of a small model's compute), and the loss over
    its logits is :func:`properlm.model.cross_entropy.cross_entropy`.

    Args:
        lm: a causal LM (HF, PEFT-wrapped, or ``ProperModel.lm``).
        input_ids, attention_mask: (B, T).
        labels: (B, T), -100 where no loss is taken.

    Returns:
        (nll_sum (B,), n_tokens (B,)).
    """
    hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    target = labels[:, 1:]                                   # (B, T-1): position t predicts t+1
    sel = target != -100
    h = hidden[:, :-1][sel]                                  # (N, H)
    logits = lm.get_output_embeddings()(h)                   # (N, V), bf16 under autocast
    nll = cross_entropy(logits, target[sel])                 # float32, without (N, V) float32 copies
    rows = sel.nonzero()[:, 0]
    per_row = torch.zeros(labels.shape[0], dtype=nll.dtype).index_add_(0, rows, nll)
    return per_row, sel.sum(1)
