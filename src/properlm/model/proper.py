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
A bank is whatever provides the :class:`~properlm.model.user_params.UserBank`
protocol: the in-memory :class:`~properlm.model.user_params.UserParams` of the
users being trained, or the user store's on-demand cache when serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from properlm.errors import UnknownUser
from properlm.model.cross_entropy import cross_entropy
from properlm.model.device import device_of
from properlm.model.layers import ProperLinear, Router, RoutingState, lora_dropout
from properlm.model.user_params import UserBank, UserParams

FFN_TARGETS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ATTN_KV_TARGETS = ("self_attn.k_proj", "self_attn.v_proj")
EMBEDDINGS = ("per-site", "shared")
#: Which model answered a user: their stage-3 LoRA, their group (stage 2), or the non-personalized base.
MODEL_USER, MODEL_GROUP, MODEL_BASE = "user-lora", "group", "base"


@dataclass
class Bound:
    """The banks' users gathered for one forward pass, in gather order (kept for the optimizer step)."""

    emb_users: list[str] | None = None
    emb_leaves: dict[str, torch.Tensor] | None = None
    lora_users: list[str] | None = None
    lora_leaves: dict[str, torch.Tensor] | None = None


def _freeze(*modules: nn.Module) -> None:
    """New stage modules start frozen like the base; a stage's trainer unfreezes what it trains.

    Otherwise stage 3 on a model rebuilt from disk (``add_group`` then ``train_users``)
    would compute weight gradients for the frozen experts at every step, unused.
    """
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)


def _present_and_slots(bank: UserBank, users: list[str | None], device: torch.device
                       ) -> tuple[list[str], torch.Tensor]:
    """The distinct users present, in first-appearance order (P), and each batch row's slot in them (B,), -1 for None.

    Raises:
        UnknownUser: a user the bank does not hold (never another user's rows instead).
    """
    present = list(dict.fromkeys(u for u in users if u is not None))
    for u in present:
        if u not in bank:
            raise UnknownUser(u)
    pos = {u: j for j, u in enumerate(present)}
    return present, torch.tensor([pos[u] if u is not None else -1 for u in users], dtype=torch.long, device=device)


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
        self.user_embs: UserBank | None = None
        self.user_loras: UserBank | None = None
        self.shared_embedding = False
        self.emb_shapes: dict[str, tuple[int, ...]] = {}   # per-user stage-2 embedding tensors
        self.lora_shapes: dict[str, tuple[int, ...]] = {}  # per-user stage-3 LoRA tensors
        self.lora_init: dict[str, str] = {}

    @property
    def device(self) -> torch.device:
        return device_of(self.lm)

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
                s.experts.to(self.device)
                s.router.to(self.device)
        if router == "user-aware":
            self.shared_embedding = user_embedding == "shared"
            self.emb_shapes = {self.emb_key(name): (user_dim,) for name in self.sites}
            self.user_embs = self.new_emb_bank(list(train_users), seed=seed)

    def new_emb_bank(self, user_ids: list[str], seed: int = 0, start: str = "normal") -> UserParams:
        """A stage-2 embedding bank for ``user_ids``: random N(0, 0.02) rows, or ``start="fallback"``:
        every row starts at the routers' fallback (the mean learned embedding), from which unseen users are fitted."""
        init = {k: start if start != "fallback" else "start" for k in self.emb_shapes}
        first = {}
        if start == "fallback":
            for name, s in self.sites.items():
                if s.router is not None and s.router.reads_embedding:
                    first.setdefault(self.emb_key(name), s.router.fallback_emb)
        return UserParams(user_ids, self.emb_shapes, init, seed=seed, device=self.device, start=first)

    def add_user_lora(self, r: int, alpha: float, lora_aware_router: bool) -> None:
        """Stage 3's structure: the user-LoRA shapes on every site and, optionally, the shared LoRA-aware router.

        The LoRA-aware router replaces the stage-2 router and starts as exactly that
        router: its text part is stage 2's ``W_t``, its embedding part stage 2's
        ``W_u`` (reading the user's stage-2 embedding, or the same fallback), and its
        LoRA part ``W_l`` is zero. So with a user's LoRA at zero, stage 3 routes and
        answers as stage 2 did for that user. It also keeps stage 2's ``W_t``
        (``w_text_group``) for rows without a user LoRA: however stage 3 trains ``W_x``,
        a user with a stage-2 embedding and no LoRA (yet) routes exactly as in stage 2.
        """
        self.lora_shapes, self.lora_init = {}, {}
        for name, s in self.sites.items():
            self.lora_shapes[f"{name}.lora_A"] = (r, s.base.in_features)
            self.lora_shapes[f"{name}.lora_B"] = (s.base.out_features, r)
            self.lora_init[f"{name}.lora_A"], self.lora_init[f"{name}.lora_B"] = "kaiming", "zeros"
            s.user_scaling = alpha / r
        if lora_aware_router:
            for s in self.sites.values():
                if s.router is not None and s.router.kind != "lora-aware":
                    old = s.router
                    d_emb = old.w_user.in_features if old.kind == "user-aware" else 0
                    s.router = Router(s.base.in_features, s.experts.k, "lora-aware", r, d_emb=d_emb).to(self.device)
                    s.router.w_text.weight.data.copy_(old.w_text.weight.data)
                    s.router.w_text_group.copy_(old.w_text.weight.data)  # rows without a LoRA: stage 2's routing
                    if d_emb:
                        s.router.w_emb.weight.data.copy_(old.w_user.weight.data)
                        s.router.fallback_emb.copy_(old.fallback_emb)
                    _freeze(s.router)

    def new_lora_bank(self, user_ids: list[str], seed: int = 0) -> UserParams:
        """A bank of fresh stage-3 LoRAs (A kaiming, B zero) for ``user_ids`` (after :meth:`add_user_lora`)."""
        return UserParams(user_ids, self.lora_shapes, self.lora_init, seed=seed, device=self.device)

    def add_users(self, user_ids: list[str], r: int, alpha: float, lora_aware_router: bool, seed: int = 0) -> None:
        """Stage 3 in one call: :meth:`add_user_lora` and an in-memory bank holding ``user_ids``."""
        self.add_user_lora(r, alpha, lora_aware_router)
        if isinstance(self.user_loras, UserParams):
            self.user_loras.add_users(user_ids)
        else:
            self.user_loras = self.new_lora_bank(user_ids, seed=seed)

    def set_fallback_embedding(self) -> None:
        """Store the mean learned user embedding per site: the routing for unseen users."""
        if not isinstance(self.user_embs, UserParams):
            return
        for name, s in self.sites.items():
            if s.router is not None and s.router.kind == "user-aware":
                s.router.fallback_emb.copy_(self.user_embs.params[self.emb_key(name)].mean(0))

    # -- stage tensors by name -------------------------------------------------------
    def stage_state(self, parts: tuple[str, ...] = ("experts", "router"), router_kind: str | None = None
                    ) -> dict[str, torch.Tensor]:
        """Experts and/or routers of every site by name (``layers.0.mlp.up_proj.experts.lora_A`` ...), on the CPU.

        ``router_kind``: only routers of this kind (e.g. stage 3's ``"lora-aware"``).
        """
        out = {}
        for site, s in self.sites.items():
            for part in parts:
                mod = getattr(s, part)
                if mod is None or (part == "router" and router_kind is not None and mod.kind != router_kind):
                    continue
                out.update({f"{site}.{part}.{n}": t.detach().to("cpu").clone() for n, t in mod.state_dict().items()})
        return out

    def load_stage_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`stage_state` gave (a file may hold only some parts: stage 3's routers only)."""
        for site, s in self.sites.items():
            for part in ("experts", "router"):
                mod = getattr(s, part)
                if mod is not None:
                    pre = f"{site}.{part}."
                    sub = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
                    if sub:
                        mod.load_state_dict(sub)

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
        device = self.device
        if emb_users is not None and self.user_embs is not None and any(u is not None for u in emb_users):
            present, slots = _present_and_slots(self.user_embs, emb_users, device)
            leaves = self.user_embs.gather_users(present, requires_grad)
            valid = (slots >= 0).unsqueeze(-1)
            for name, s in self.sites.items():
                if s.router is None or not s.router.reads_embedding:
                    continue
                e = leaves[self.emb_key(name)][slots.clamp(min=0)]            # (B, d_e)
                self.state.user_emb[name] = torch.where(valid, e, s.router.fallback_emb.expand_as(e))
            out.emb_users, out.emb_leaves = present, leaves
        if lora_users is not None and self.user_loras is not None and any(u is not None for u in lora_users):
            present, slots = _present_and_slots(self.user_loras, lora_users, device)
            leaves = self.user_loras.gather_users(present, requires_grad)
            # The usual training step has one row per user, in bank order: the gathered
            # leaves are then already the rows' factors, and copying them (and their
            # gradients back) per site would only cost time. Same values either way.
            one_each = len(present) == len(slots) and bool((slots == torch.arange(len(slots), device=device)).all())
            valid = None if bool((slots >= 0).all()) else (slots >= 0).float().view(-1, 1, 1)
            for name in self.sites:
                a, b = leaves[f"{name}.lora_A"], leaves[f"{name}.lora_B"]       # (P, r, d_in), (P, d_out, r)
                if not one_each:
                    a, b = a[slots.clamp(min=0)], b[slots.clamp(min=0)]       # (B, ...)
                if valid is not None:
                    a, b = a * valid, b * valid                               # rows without a user LoRA: zeros
                self.state.user_lora[name] = (a, b)
            if valid is not None:  # those rows route as stage 2 did (Router: lora-aware)
                self.state.lora_rows = slots >= 0
            out.lora_users, out.lora_leaves = present, leaves
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
    per_row = torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device).index_add_(0, rows, nll)
    return per_row, sel.sum(1)
