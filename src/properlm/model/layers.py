"""The FFN linear layer of PROPER: frozen base + group LoRA experts + a user's LoRA.

``ProperLinear`` wraps one of the FFN linears (gate/up/down) of the stage-1
merged model (weight ``W1``) and computes, for an input ``x`` of shape (B, T, d_in):

    y = W1 x + sum_k g_k(x, u) * s * B_k A_k x  +  s_u * B_u A_u x

where ``g`` is the router's softmax over K experts (dense, no top-k, as in
LoRAMoE) and ``A_u, B_u`` are the LoRA factors of the row's user. Per-row facts
(which user, which embedding) are not arguments of ``forward``: they sit in a
:class:`RoutingState` shared by all wrapped layers of one model and set before
each forward pass (the pattern PEFT's poly tuner uses for task ids).

Inference (autograd off, no dropout) takes a fused path with the same sums
(:meth:`ProperLinear._fused`): the experts' A and the router's text rows, and, when
every row has the same user, that user's A (with the router's LoRA term folded in,
``W_x + W_l A_u``) are one matmul on x; a 0/1 matmul spreads the gates over the
experts' columns; the experts' B and the user's B are one ``addmm``. For one user
that is three matmuls beside the base instead of seven; rows of different users add
their own A and B by ``bmm`` and the router's ``W_l (A_u x)``. The concatenated
weights (a copy of the adapters' weights, per compute dtype) are cached per layer and
rebuilt when a source tensor changed (an optimizer step, a loaded stage, a replaced
router, new storage), checked once per binding of users; what is derived from the
bound users (their factors in the compute dtype, the router's embedding term) is
cached in the :class:`RoutingState` while they stay bound. Training (autograd on)
keeps the unfused path, so its numbers are exactly what they were; the fused path's
differ from them by float rounding.
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
        lora_shared: every row has the same user's LoRA (the rows of ``user_lora`` are
            equal): the fused path applies it as one matrix.
        cache: site -> what that layer derived from the bound users for the fused path,
            kept while they stay bound (a decode batch keeps it across its steps).
        fuse: inference may take the fused path (off: always the training path; not
            reset by :meth:`clear`).
    """

    user_emb: dict[str, torch.Tensor] = field(default_factory=dict)
    user_lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    lora_rows: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    record: bool = False
    routes: list[torch.Tensor] = field(default_factory=list)
    lora_shared: bool = False
    cache: dict = field(default_factory=dict)
    fuse: bool = True

    def clear(self) -> None:
        self.user_emb, self.user_lora, self.lora_rows, self.token_mask, self.routes = {}, {}, None, None, []
        self.lora_shared, self.cache = False, {}


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


class _Fused:
    """A layer's concatenated weights for the fused path, in one dtype.

    ``a``: rows [A_1..A_K (K*r); router text rows (K: W_t, or the LoRA-aware router's W_x);
    stage 2's W_t (K, LoRA-aware only)]; ``b``: the experts' ``scaling * B`` transposed
    (K*r, d_out); ``w_l``: the LoRA-aware router's W_l. ``spread`` (K, K*r) and ``spread_u``
    (K, (K+1)*r) are 0/1 matrices that repeat each gate over its expert's r columns
    (``gates @ spread`` is exact: one product by 1.0 per entry), ``spread_u`` with r
    more columns for a user LoRA gated by 1 (``ones_u``, added by ``addmm``).
    ``stamps`` are the source tensors with their storage and version counter when it was
    built: an in-place write to one (an optimizer step, ``load_state_dict``) or new
    storage (``.data =``, ``.to``) makes it stale.
    """

    __slots__ = ("experts", "router", "dtype", "stamps", "a", "b", "w_l", "spread", "spread_u", "ones_u")

    def __init__(self, layer: "ProperLinear", dtype: torch.dtype):
        ex, ro = layer.experts, layer.router
        self.experts, self.router, self.dtype = ex, ro, dtype
        src = [ex.lora_A, ex.lora_B, *ro.parameters(), *ro.buffers()]
        self.stamps = [(t, t.data_ptr(), t._version) for t in src]
        k, r = ex.k, ex.r
        with torch.no_grad():
            rows = [ex.lora_A, ro.w_text.weight] + ([ro.w_text_group] if ro.kind == "lora-aware" else [])
            self.a = torch.cat(rows).to(dtype)
            self.b = (ex.lora_B * ex.scaling).t().to(dtype).contiguous()
            self.w_l = ro.w_user.weight.to(dtype) if ro.kind == "lora-aware" else None
            eye = torch.eye(k, dtype=dtype, device=ex.lora_A.device)
            self.spread = eye.repeat_interleave(r, dim=1)                        # (K, K*r)
            self.spread_u = F.pad(self.spread, (0, r))                           # (K, (K+1)*r)
            self.ones_u = F.pad(self.spread.new_zeros(k * r), (0, r), value=1.0)  # gate 1 on the user's r

    def fresh(self, experts: GroupExperts, router: Router) -> bool:
        if self.experts is not experts or self.router is not router:
            return False
        for t, ptr, version in self.stamps:
            if t._version != version or t.data_ptr() != ptr:
                return False
        return True


def _softmax(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The router's softmax in float32, in ``dtype``."""
    if logits.dtype == torch.float32:
        g = torch.softmax(logits, -1)
        return g if dtype == torch.float32 else g.to(dtype)
    return torch.softmax(logits, -1, dtype=torch.float32).to(dtype)


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
        self._fused_w: dict[torch.dtype, _Fused] = {}   # the fused path's weights, per compute dtype

    @property
    def state(self) -> RoutingState:
        return self._state[0]

    def add_experts(self, num_experts: int, r: int, alpha: float, router: str, d_user: int) -> None:
        self.experts = GroupExperts(self.base.in_features, self.base.out_features, num_experts, r, alpha)
        self.router = Router(self.base.in_features, num_experts, router, d_user)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self._state[0]
        if self._modules.get("experts") is None and self.site not in st.user_lora:
            return self.base(x)
        if torch.is_autocast_enabled(x.device.type):
            # One cast shared by the base, the router and the adapters (each would cast x
            # again), and the dropout then works on the narrower type.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if st.fuse and not torch.is_grad_enabled() and not st.record and not self._dropout_on():
            return self._fused(x, st)
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

    # -- the fused inference path -----------------------------------------------------------------
    def _dropout_on(self) -> bool:
        d = self._modules["dropout"]
        if isinstance(d, LoraDropout):
            return d.training and d.threshold > 0
        return d.training and not isinstance(d, nn.Identity)

    def _bound(self, st: RoutingState, x: torch.Tensor) -> tuple[_Fused | None, dict]:
        """This layer's fused weights for x's dtype (None: no experts) and what it derives from the
        bound users for them, cached in ``st`` while the same users' tensors stay bound.

        The weights are checked against their sources when a binding first runs this layer
        (after each ``bind``, each join or leave of a decode batch), not at every pass: the
        check touches every source tensor, a few percent of a decode step. A change to the
        experts or routers between two passes of one binding applies from the next binding.

        ``e``: the router's embedding term per row (B, 1, K), or, when it is one row,
        ``bias``: a bias for the fused matmul that adds it to the router's logits. ``a``,
        ``b``: the user factors in x's dtype, per row (B, r, d_in) transposed and (B, r, d_out),
        or, when every row has the same user (``shared``), one matrix each; with experts,
        the fused rows [A_1..A_K; A_u; router text rows + W_l A_u] and [s B_1..s B_K;
        s_u B_u] (transposed).
        """
        site, dt = self.site, x.dtype
        emb = st.user_emb.get(site)
        a, b = st.user_lora.get(site, (None, None))
        n = x.shape[0]
        hit = st.cache.get(site)
        if (hit is not None and hit[0] == dt and hit[1] is emb and hit[2] is a and hit[3] is b
                and hit[4] is st.lora_rows and hit[5] == st.lora_shared and hit[6] == n):
            return hit[7], hit[8]
        mods = self._modules
        ex, ro = mods.get("experts"), mods.get("router")
        c = None
        if ex is not None:
            c = self._fused_w.get(dt)
            if c is None or not c.fresh(ex, ro):
                c = self._fused_w[dt] = _Fused(self, dt)
        d: dict = {"shared": False}
        if a is not None:
            d["shared"] = (st.lora_shared and st.lora_rows is None
                           and (ex is None or a.shape[1] == ex.r))           # the user as expert K+1: same rank
            if d["shared"] and ex is not None:
                with torch.autocast(x.device.type, enabled=False):       # fold and concatenate in float32
                    a0, b0 = a[0].float(), b[0].float()
                    text = ro.w_text.weight
                    if ro.kind == "lora-aware":
                        text = text + ro.w_user.weight @ a0              # W_x x + W_l (A_u x) = (W_x + W_l A_u) x
                    d["a"] = torch.cat([ex.lora_A, a0, text]).to(dt)
                    d["b"] = torch.cat([ex.lora_B * ex.scaling, b0 * self.user_scaling], 1).t().to(dt).contiguous()
            elif d["shared"]:
                d["a"], d["b"] = a[0].to(dt), b[0].t().to(dt).contiguous()
            else:  # bmm is fastest with A^T as a view and B^T contiguous
                d["a"], d["b"] = a.transpose(1, 2).to(dt), b.transpose(1, 2).to(dt).contiguous()
        if ro is not None and ro.reads_embedding:
            w = ro.w_user if ro.kind == "user-aware" else ro.w_emb
            e = w(emb if emb is not None else ro.fallback_emb.unsqueeze(0))   # under autocast, as the training path
            if e.shape[0] > 1:
                d["e"] = e.unsqueeze(1)
            else:  # the same for every row: a bias on the logits' columns of the fused matmul
                e, kr = e[0], ex.k * ex.r
                if d["shared"]:
                    d["bias"] = torch.cat([e.new_zeros(kr + a.shape[1]), e])
                else:
                    d["bias"] = torch.cat([e.new_zeros(kr), e] + ([e] if ro.kind == "lora-aware" else []))
        st.cache[site] = (dt, emb, a, b, st.lora_rows, st.lora_shared, n, c, d)
        return c, d

    def _fused(self, x: torch.Tensor, st: RoutingState) -> torch.Tensor:
        """The forward pass of inference: the training path's sums as the base, one matmul for every A
        and the router's text rows, a 0/1 matmul spreading the gates and one for every B; per-row
        user factors by ``bmm`` when the rows' users differ."""
        c, d = self._bound(st, x)
        dt, base = x.dtype, self._modules["base"]
        if d["shared"]:
            x2 = x.reshape(-1, x.shape[-1])                                  # (N, d_in), N = B*T
            y = base(x2)
            if c is None:                                                    # a user LoRA only
                y = torch.addmm(y, F.linear(x2, d["a"]), d["b"], alpha=self.user_scaling)
                return y.view(*x.shape[:-1], -1)
            # z = [A_1 x .. A_K x, A_u x, router logits]; the user's LoRA is an expert with gate 1.
            k = c.spread.shape[0]
            z = F.linear(x2, d["a"], d.get("bias"))
            logits = z[:, -k:]
            if "e" in d:
                logits = (logits.view(*x.shape[:-1], k) + d["e"]).view(-1, k)
            gates = torch.addmm(c.ones_u, _softmax(logits, dt), c.spread_u)  # (N, (K+1)*r)
            y = torch.addmm(y, z[:, :-k] * gates, d["b"])
            return y.view(*x.shape[:-1], -1)
        y = base(x)
        if c is None:                                                        # per-row user LoRAs only
            return torch.baddbmm(y, torch.bmm(x, d["a"]), d["b"], alpha=self.user_scaling)
        k, kr = c.spread.shape
        z = F.linear(x, c.a, d.get("bias"))                                  # [A_k x; text logits; (group logits)]
        lora = "a" in d
        if lora:
            lora_h = torch.bmm(x, d["a"])                                    # (B, T, r), each row its own user
            y = torch.baddbmm(y, lora_h, d["b"], alpha=self.user_scaling)
        if c.w_l is not None:                                                # the LoRA-aware router
            group = z[..., kr + k:]
            if not lora:
                logits = group
            else:
                logits = z[..., kr:kr + k] + F.linear(lora_h, c.w_l)
                if st.lora_rows is not None:
                    logits = torch.where(st.lora_rows.view(-1, 1, 1), logits, group)
        else:
            logits = z[..., kr:kr + k]
        if "e" in d:
            logits = logits + d["e"]
        h = z[..., :kr] * torch.matmul(_softmax(logits, dt), c.spread)
        return torch.addmm(y.flatten(0, -2), h.flatten(0, -2), c.b).view_as(y)
