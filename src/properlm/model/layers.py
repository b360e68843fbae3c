"""The FFN linear layer of PROPER: frozen base + group LoRA experts + a user's LoRA.

``ProperLinear`` wraps one of the FFN linears (gate/up/down) of the stage-1
merged model (weight ``W1``) and computes, for an input ``x`` of shape (B, T, d_in):

    y = W1 x + sum_k g_k(x, u) * s * B_k A_k x  +  s_u * B_u A_u x

where ``g`` is the router's softmax over K experts (dense, no top-k, as in
LoRAMoE) and ``A_u, B_u`` are the LoRA factors of the row's user. Per-row facts
(which user, which embedding) are not arguments of ``forward``: they sit in a
:class:`RoutingState` shared by all wrapped layers of one model and set before
each forward pass (the pattern PEFT's poly tuner uses for task ids).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

ROUTERS = ("user-aware", "text", "lora-aware")


@dataclass
class RoutingState:
    """Per-forward facts shared by all :class:`ProperLinear` layers of a model.

    Attributes:
        user_emb: site name -> (B, d_e) user embeddings of the rows (stage 2's
            user-aware router); absent -> the router's fallback.
        user_lora: site name -> (A (B, r, d_in), B (B, d_out, r)) LoRA factors of the rows'
            users, zeros for rows without a user LoRA.
        lora_rows: (B,) bool, the rows that have a user LoRA, when only some do (None: all rows
            have one when ``user_lora`` is set, none when it is empty).
        token_mask: (B, T) 1.0 on real tokens, for averaging routing weights.
        record: if true, each layer appends its per-row mean routing weights (B, K).
        routes: what the layers recorded in this forward pass.
    """

    user_emb: dict[str, torch.Tensor] = field(default_factory=dict)
    user_lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    lora_rows: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    record: bool = False
    routes: list[torch.Tensor] = field(default_factory=list)

    def clear(self) -> None:
        self.user_emb, self.user_lora, self.lora_rows, self.token_mask, self.routes = {}, {}, None, None, []


class Router(nn.Module):
    """Dense softmax router over K experts.

    ``kind`` picks the inputs the logits see:
      - ``"text"``: ``W_t x`` (plain LoRAMoE);
      - ``"user-aware"``: ``W_t x + W_u e_u`` (stage 2); rows with no embedding
        use the mean of the learned user embeddings (``fallback_emb``);
      - ``"lora-aware"``: ``W_x x + W_e e_u + W_l (A_u x)`` (stage 3), shared by all
        users. ``W_e e_u`` is stage 2's user term carried over (``d_emb > 0``, when
        stage 2 had a user-aware router): with the user's LoRA at zero and ``W_l = 0``
        the router is exactly the stage-2 router of that user (their stage-2
        embedding, or the fallback for a user without one), so stage 3 starts where
        stage 2 ends. A row *without* a user LoRA routes as stage 2 did, with stage
        2's text weight (``w_text_group``, kept beside the ``W_x`` that stage 3
        trains): a user who has a stage-2 embedding but no LoRA yet is answered by
        their group, exactly as by the stage-2 model.

    Args:
        d_in: input width of the wrapped linear.
        num_experts: K.
        kind: one of :data:`ROUTERS`.
        d_user: width of the user embedding (user-aware) or the user LoRA rank (lora-aware).
        d_emb: lora-aware only: width of the stage-2 embedding term (0: none).
    """

    def __init__(self, d_in: int, num_experts: int, kind: str, d_user: int = 0, d_emb: int = 0):
        super().__init__()
        if kind not in ROUTERS:
            raise ValueError(f"router kind must be one of {ROUTERS}, got {kind!r}")
        self.kind = kind
        self.w_text = nn.Linear(d_in, num_experts, bias=False)
        self.w_user = nn.Linear(d_user, num_experts, bias=False) if kind != "text" else None
        if self.w_user is not None and kind == "lora-aware":
            nn.init.zeros_(self.w_user.weight)  # starts as the stage-2 router it was copied from
        d_fallback = d_user if kind == "user-aware" else (d_emb if kind == "lora-aware" else 0)
        self.w_emb = nn.Linear(d_emb, num_experts, bias=False) if kind == "lora-aware" and d_emb > 0 else None
        # Mean of the stage-2 embeddings, set after stage 2: the routing of users never seen there.
        self.register_buffer("fallback_emb", torch.zeros(d_fallback))
        if kind == "lora-aware":
            # Stage 2's W_t, for rows without a user LoRA (set from the stage-2 router it replaces;
            # not saved with stage 3's router: it is stage 2's, in group/experts.safetensors).
            self.register_buffer("w_text_group", self.w_text.weight.detach().clone(), persistent=False)

    @property
    def reads_embedding(self) -> bool:
        """Whether the logits have a stage-2 user-embedding term."""
        return self.kind == "user-aware" or self.w_emb is not None

    def _emb_term(self, w: nn.Linear, e: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        e = e if e is not None else self.fallback_emb.expand(x.shape[0], -1)
        return w(e).unsqueeze(1)  # (B, 1, K), broadcast over tokens

    def forward(self, x: torch.Tensor, user_signal: torch.Tensor | None, emb: torch.Tensor | None = None,
                lora_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Routing weights (B, T, K) for x (B, T, d_in).

        ``user_signal``: (B, d_e) embeddings (user-aware) or (B, T, r) LoRA projections
        (lora-aware); ``emb``: (B, d_e) stage-2 embeddings for the lora-aware router's
        carried-over term. None: the fallback embedding / no LoRA term. ``lora_rows``
        (lora-aware): (B,) bool, the rows with a user LoRA when only some have one; the
        others, and every row when ``user_signal`` is None, route as stage 2 did.
        """
        if self.kind == "lora-aware":
            return self._lora_aware(x, user_signal, emb, lora_rows)
        logits = self.w_text(x)
        if self.kind == "user-aware":
            logits = logits + self._emb_term(self.w_user, user_signal, x)
        return torch.softmax(logits.float(), dim=-1).to(x.dtype)

    def _lora_aware(self, x: torch.Tensor, lora_h: torch.Tensor | None, emb: torch.Tensor | None,
                    lora_rows: torch.Tensor | None) -> torch.Tensor:
        """``softmax(W_x x + W_e e_u + W_l A_u x)`` for rows with a user LoRA, stage 2's
        ``softmax(W_t x + W_e e_u)`` for rows without one."""
        e_term = self._emb_term(self.w_emb, emb, x) if self.w_emb is not None else None
        group = None
        if lora_h is None or lora_rows is not None:
            group = F.linear(x, self.w_text_group)
            group = group + e_term if e_term is not None else group
        if lora_h is None:
            logits = group
        else:
            logits = self.w_text(x)
            logits = logits + e_term if e_term is not None else logits
            logits = logits + self.w_user(lora_h)  # (B, T, K)
            if lora_rows is not None:
                logits = torch.where(lora_rows.view(-1, 1, 1), logits, group)
        return torch.softmax(logits.float(), dim=-1).to(x.dtype)


class LoraDropout(nn.Module):
    """Dropout on the adapters' input, as ``nn.Dropout`` but with a cheaper mask on CPU.

    ``nn.Dropout`` draws one ``bernoulli_`` sample per element, single-threaded on
    CPU; with dropout on every FFN linear that was ~13% of a stage-3 step
    (benchmarks/levers.py). Here each 32-bit integer draw is read as four 8-bit
    uniforms (or two 16-bit ones), so the generator is called once per four (two)
    elements and no bit arithmetic is needed. p is used rounded to the uniforms'
    grid: 8-bit when that moves p by at most 2% of itself (0.05 -> 13/256 =
    0.0508, 0.1 -> 0.1016), else 16-bit (0.01 -> 655/65536 = 0.009995). The
    survivors are scaled by the exact 1/(1-p) of the rounded p (``p_used``).
    The draws come from torch's global generator: seeded runs stay deterministic.
    On a GPU it is plain ``F.dropout`` with the exact p.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p
        self.bits = 8 if p == 0 or abs(round(p * 256) / 256 - p) <= 0.02 * p else 16
        levels = 1 << self.bits
        self.threshold = round(p * levels)                 # drop where the uniform < threshold
        self.p_used = self.threshold / levels
        self.scale = 1.0 / (1.0 - self.p_used)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xd, scale = self.masked(x)
        return xd if scale == 1.0 else xd * scale

    def masked(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(x with the dropped entries zeroed, the survivors' scale)``: dropout is ``xd * scale``.

        For a caller that only feeds ``xd`` through linear maps (the adapters): it
        can apply the scale to their small outputs instead of to ``x``, saving a
        full-width multiply forward and backward. Identity in eval: ``(x, 1.0)``.
        """
        if not self.training or self.threshold == 0:
            return x, 1.0
        if x.device.type != "cpu":
            # The cheap mask is a CPU trick (one generator call per four elements on a single
            # thread); on a GPU the fused dropout kernel is fast and uses p exactly.
            return F.dropout(x, self.p, training=True), 1.0
        n, per = x.numel(), 32 // self.bits
        draws = torch.empty((n + per - 1) // per, dtype=torch.int32, device=x.device).random_(-2**31, 2**31)
        if self.bits == 8:
            keep = draws.view(torch.uint8)[:n].view(x.shape) >= self.threshold
        else:  # int16 is signed: the uniform u in [0, 65536) is stored as u - 32768
            keep = draws.view(torch.int16)[:n].view(x.shape) >= self.threshold - 32768
        return torch.where(keep, x, 0.0), self.scale

    def extra_repr(self) -> str:
        return f"p={self.p} (used: {self.p_used:.6g}, {self.bits}-bit uniforms)"


def lora_dropout(p: float) -> nn.Module:
    """The adapters' input dropout: :class:`LoraDropout` for p > 0, else identity."""
    return LoraDropout(p) if p > 0 else nn.Identity()


class GroupExperts(nn.Module):
    """K LoRA experts on one linear, stored stacked so all K run in two matmuls.

    Args:
        d_in, d_out: the wrapped linear's shape.
        num_experts: K.
        r: rank of each expert.
        alpha: LoRA scaling numerator (scaling = alpha / r).
    """

    def __init__(self, d_in: int, d_out: int, num_experts: int, r: int, alpha: float):
        super().__init__()
        self.k, self.r, self.scaling = num_experts, r, alpha / r
        self.lora_A = nn.Parameter(torch.empty(num_experts * r, d_in))   # rows k*r:(k+1)*r are A_k
        self.lora_B = nn.Parameter(torch.zeros(d_out, num_experts * r))  # cols k*r:(k+1)*r are B_k
        for k in range(num_experts):
            nn.init.kaiming_uniform_(self.lora_A.data[k * r:(k + 1) * r], a=math.sqrt(5))

    def forward(self, x: torch.Tensor, gates: torch.Tensor, out: torch.Tensor | None = None,
                in_scale: float = 1.0) -> torch.Tensor:
        """``out + sum_k gates_k * s * B_k A_k (in_scale * x)`` for x (B, T, d_in), gates (B, T, K) -> (B, T, d_out).

        The scalings ride on the (small) gated low-rank activations and the sum into
        ``out`` is one ``addmm``, so no full-width temporaries are made.
        """
        h = F.linear(x, self.lora_A)                                     # (B, T, K*r)
        h = (h.unflatten(-1, (self.k, self.r)) * (gates * (self.scaling * in_scale)).unsqueeze(-1)).flatten(-2)
        if out is None:
            return F.linear(h, self.lora_B)
        return torch.addmm(out.flatten(0, -2), h.flatten(0, -2), self.lora_B.t()).view_as(out)


class ProperLinear(nn.Module):
    """A frozen linear with optional group experts, router and per-row user LoRA.

    Args:
        base: the wrapped ``nn.Linear`` (stage-1 merged weight; never trained).
        site: this layer's name in the model, the key into :class:`RoutingState`.
        state: the model-wide routing state.
        dropout: LoRA dropout applied to the adapters' input.
        user_scaling: alpha / r of the user LoRAs.
    """

    def __init__(self, base: nn.Linear, site: str, state: RoutingState, dropout: float = 0.0, user_scaling: float = 2.0):
        super().__init__()
        self.base, self.site, self.user_scaling = base, site, user_scaling
        self._state = [state]  # a list so the state is not registered as a submodule
        self.dropout = lora_dropout(dropout)
        self.experts: GroupExperts | None = None
        self.router: Router | None = None

    @property
    def state(self) -> RoutingState:
        return self._state[0]

    def add_experts(self, num_experts: int, r: int, alpha: float, router: str, d_user: int) -> None:
        self.experts = GroupExperts(self.base.in_features, self.base.out_features, num_experts, r, alpha)
        self.router = Router(self.base.in_features, num_experts, router, d_user)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.experts is None and self.site not in self.state.user_lora:
            return self.base(x)
        if torch.is_autocast_enabled(x.device.type):
            # One cast shared by the base, the router and the adapters (each would cast x
            # again), and the dropout then works on the narrower type.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = self.base(x)
        # Dropout is xd * scale; the scale is applied to the adapters' low-rank outputs.
        xd, scale = self.dropout.masked(x) if isinstance(self.dropout, LoraDropout) else (self.dropout(x), 1.0)
        lora_h = None
        if self.site in self.state.user_lora:
            a, b = self.state.user_lora[self.site]                          # (B, r, d_in), (B, d_out, r)
            lora_h = torch.bmm(xd, a.transpose(1, 2).to(x.dtype))           # (B, T, r)
            if scale != 1.0:
                lora_h = lora_h * scale
            y = torch.baddbmm(y, lora_h, b.transpose(1, 2).to(y.dtype), alpha=self.user_scaling)
        if self.experts is not None:
            emb = self.state.user_emb.get(self.site)                         # (B, d_e) or None: fallback
            if self.router.kind == "lora-aware":
                gates = self.router(x, lora_h, emb, self.state.lora_rows)    # (B, T, K)
            else:
                gates = self.router(x, emb)
            y = self.experts(xd, gates, out=y, in_scale=scale)
            if self.state.record:
                m = self.state.token_mask
                if m is None or m.shape != gates.shape[:2]:
                    self.state.routes.append(gates.float().mean(1))
                else:
                    m = m.to(gates.dtype).unsqueeze(-1)                      # (B, T, 1)
                    self.state.routes.append(((gates * m).sum(1) / m.sum(1).clamp(min=1)).float())
        return y
