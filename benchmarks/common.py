"""What the benchmarks share: settings, machine facts, the matmul peak, data, models, FLOP counts.

Every benchmark measures its contenders side by side in one process, interleaved
round by round, so that load from other processes on this shared machine falls on
both sides alike; results are ratios.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

# PEFT calls a transformers method that warns about its own rename (as in properlm.train.population).
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

FFN = ("gate_proj", "up_proj", "down_proj")


@dataclass
class BenchConfig:
    """Settings of one benchmark run (``--quick`` swaps in the small ones).

    The stage-3 settings are properlm's defaults (``UserConfig``/``GroupConfig``):
    user LoRA r=4, alpha=8, dropout 0.05 on the FFN linears, AdamW lr 2e-4; stage-2
    experts K=5, r=4 with the user-aware router, replaced by the LoRA-aware router.
    """

    model: str = "smollm2"
    quick: bool = False
    users: int = 32
    examples_per_user: int = 16
    oppu_batch: int = 16                 # OPPU's trainer: per-user batch 16
    r: int = 4
    alpha: float = 8.0
    dropout: float = 0.05
    experts: int = 5
    expert_r: int = 4
    expert_alpha: float = 8.0
    lr: float = 2e-4
    bf16: bool = True
    attention: str = "eager"             # every contender; eager beats sdpa at these lengths on CPU (levers)
    max_len: int = 256
    gen_tokens: int = 16
    gen_repeats: int = 2
    lever_rounds: int = 3
    memory_users: tuple[int, ...] = (1000, 10000)   # stage-3 users per memory setting
    memory_model: str = "tiny-random"    # 10,000 users of the embedded model would write ~90 GB of store
    memory_cohort: int = 256             # UserConfig.cohort_size's default
    memory_examples: int = 2             # history examples per user
    store_users: tuple[int, ...] = (10, 10000)      # users in the run a user is added to
    store_repeats: int = 3
    store_loads: int = 200               # cold loads timed
    seed: int = 0
    threads: int = field(default_factory=torch.get_num_threads)

    @classmethod
    def quick_config(cls, **kw) -> "BenchConfig":
        base = dict(model="tiny-random", quick=True, users=8, examples_per_user=4, oppu_batch=4, gen_tokens=8,
                    gen_repeats=1, lever_rounds=1, memory_users=(50, 200), memory_cohort=32,
                    store_users=(10, 200), store_repeats=1, store_loads=20, threads=1)
        base.update(kw)
        return cls(**base)

    def to_dict(self) -> dict:
        return asdict(self)


# -- machine -----------------------------------------------------------------------------------------------

def machine_info() -> dict:
    """CPU model, cores, torch threads, versions, date and the load average (other processes)."""
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    import peft
    import transformers
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return {
        "cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()),
    }


def compute_dtype() -> torch.dtype:
    """The dtype a ``bf16: true`` run computes in on this CPU: bf16 where it is native, else float32
    (:func:`properlm.model.device.native_bf16`; emulated bf16 ran a 4096 matmul in minutes)."""
    from properlm.model.device import native_bf16

    return torch.bfloat16 if native_bf16("cpu") else torch.float32


def matmul_peak(n: int = 2048, seconds: float = 1.0, dtype: torch.dtype | None = None) -> float:
    """This machine's matmul rate in FLOP/s: the fastest of repeated (n x n) @ (n x n) products
    (in :func:`compute_dtype` unless ``dtype`` is given).

    The fastest call, not the mean: on a shared machine a call that another
    process interrupted says nothing about what the hardware can do.
    """
    dtype = dtype or compute_dtype()
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best, t_end = float("inf"), time.perf_counter() + seconds
    k = 0
    while time.perf_counter() < t_end or k < 3:
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
        k += 1
    return 2 * n ** 3 / best


def peak_sweep(sizes=(1024, 2048, 4096), seconds: float = 1.5) -> dict[str, float]:
    """Matmul peaks over a few square sizes in the compute dtype, and fp32 at 2048 (GFLOP/s).

    On a CPU without native bf16 the compute dtype is float32 (keys ``fp32_N``), and
    the "share of the bf16 peak" figures are shares of the float32 peak."""
    out = {}
    name = "bf16" if compute_dtype() == torch.bfloat16 else "fp32"
    for n in sizes:
        out[f"{name}_{n}"] = matmul_peak(n, seconds) / 1e9
    out["fp32_2048"] = matmul_peak(2048, seconds, torch.float32) / 1e9
    return out


class Timer:
    """Accumulates wall-clock seconds per label; ``with timer("a"): ...``."""

    def __init__(self):
        self.total: dict[str, float] = {}
        self.rounds: dict[str, list[float]] = {}

    def __call__(self, label: str):
        timer = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                dt = time.perf_counter() - self.t
                timer.total[label] = timer.total.get(label, 0.0) + dt
                timer.rounds.setdefault(label, []).append(dt)

        return _T()


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return float("nan") if n == 0 else (s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2]))


# -- data --------------------------------------------------------------------------------------------------

def make_data(cfg: BenchConfig, tok, n_users: int | None = None, per_user: int | None = None):
    """Synthetic ``synth-gen`` users (properlm's demo task): ``per_user`` history examples each, one query each.

    Returns (user ids, {user: [Encoded, ...]}, {user: query prompt}).
    """
    from properlm.data.synth import generate as synth
    from properlm.train.examples import encode, user_examples

    n_users = n_users or cfg.users
    per_user = per_user or cfg.examples_per_user
    ds = synth("synth-gen", n_users=n_users, n_groups=5, seed=cfg.seed, min_history=per_user,
               max_history=per_user, n_queries=1)
    users = [u.id for u in ds.users]
    enc = {u.id: [encode(tok, e, cfg.max_len) for e in user_examples("synth-gen", u)][:per_user] for u in ds.users}
    queries = {u.id: u.queries[0].input for u in ds.users}
    return users, enc, queries


# -- models ------------------------------------------------------------------------------------------------

def randomize_(params, std: float, seed: int) -> None:
    """Fill (zero-initialised) adapter factors with N(0, std^2) so that they change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def proper_stage3(cfg: BenchConfig, users: list[str], experts: bool = True, base=None):
    """A :class:`ProperModel` as stage 3 trains it: stage-2 experts (trained: random B), the
    LoRA-aware router, one LoRA per user, dropout as ``train_users`` sets it.

    ``experts=False`` gives the OPPU-mlp model (user LoRAs on the FFN only) in properlm's batched form.
    ``base``: an already loaded ``(lm, tok)`` (wrapped in place). Returns (pm, tok, shared router parameters).
    """
    from properlm.model.base import load_base
    from properlm.model.layers import lora_dropout
    from properlm.model.proper import ProperModel

    lm, tok = base if base is not None else load_base(cfg.model, attention=cfg.attention)
    pm = ProperModel(lm)
    if experts:
        pm.add_group(cfg.experts, cfg.expert_r, cfg.expert_alpha, cfg.dropout, "user-aware", 32,
                     [f"g{i}" for i in range(8)], seed=cfg.seed)
        randomize_(pm.user_embs.params.values(), 1.0, cfg.seed)
        randomize_([s.experts.lora_B for s in pm.sites.values()], 0.02, cfg.seed + 1)
        pm.set_fallback_embedding()
    pm.add_users(users, cfg.r, cfg.alpha, lora_aware_router=experts, seed=cfg.seed)
    for s in pm.sites.values():
        s.dropout = lora_dropout(cfg.dropout)
    shared = {n: p for n, p in pm.named_parameters() if ".router." in n}
    return pm, tok, shared


def peft_users(cfg: BenchConfig, users: list[str]):
    """One PEFT model holding a LoRA adapter per user on the FFN linears (OPPU-mlp), switched with ``set_adapter``."""
    from peft import LoraConfig, get_peft_model

    from properlm.model.base import load_base

    lm, tok = load_base(cfg.model, attention=cfg.attention)
    lc = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(FFN),
                    task_type="CAUSAL_LM")
    model = get_peft_model(lm, lc, adapter_name=users[0])
    for u in users[1:]:
        model.add_adapter(u, lc)
    return model, tok


def peft_adapter_params(model, user: str) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if f".{user}." in n and "lora_" in n]


# -- FLOPs -------------------------------------------------------------------------------------------------

@dataclass
class Dims:
    d: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, lm) -> "Dims":
        c = lm.config
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                   c.num_key_value_heads, hd, c.vocab_size)

    def attn_linears(self) -> list[tuple[int, int]]:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(self.d, q), (self.d, kv), (self.d, kv), (q, self.d)]

    def ffn_linears(self) -> list[tuple[int, int]]:
        return [(self.d, self.ffn), (self.d, self.ffn), (self.ffn, self.d)]

    def matmul_params(self, lm_head: bool = True) -> int:
        per_layer = sum(i * o for i, o in self.attn_linears() + self.ffn_linears())
        return self.layers * per_layer + (self.d * self.vocab if lm_head else 0)


def train_flops(dims: Dims, lengths: list[int], completions: list[int], lora_r: int, experts: int = 0,
                expert_r: int = 0, router: bool = False) -> dict[str, float]:
    """Matmul FLOPs of one training step on real tokens only, counted the honest way.

    - forward: 2 * in * out per token for every linear (base, experts, router, user LoRA),
      attention scores and values 2 * 2 * heads * head_dim per causal (query, key) pair,
      the LM head only on the positions that predict a completion token;
    - backward, input gradients: the same as forward, but only where the op's input
      needs a gradient: nothing below the first trainable weight (layer 0's attention,
      layer 0's gate/up inputs) is differentiated; attention backward is 2x its forward;
    - backward, weight gradients: only for trainable weights (user LoRA A/B, the router),
      never for the frozen base.

    Elementwise work (norms, activations, softmax, optimizer) is not counted.
    Also returns ``naive_6n``: the usual 6 * params * tokens, which overcounts a frozen base.
    """
    n_tok, n_c = sum(lengths), sum(completions)
    pairs = sum(t * (t + 1) // 2 for t in lengths)
    fwd = bwd_in = bwd_w = 0.0

    def op(i: int, o: int, input_grad: bool, trainable: bool, tokens: float = n_tok):
        nonlocal fwd, bwd_in, bwd_w
        f = 2.0 * i * o * tokens
        fwd += f
        bwd_in += f if input_grad else 0.0
        bwd_w += f if trainable else 0.0

    attn = 4.0 * dims.heads * dims.head_dim * pairs
    for layer in range(dims.layers):
        below = layer > 0  # something trainable sits below this layer's attention
        for i, o in dims.attn_linears():
            op(i, o, below, False)
        fwd += attn
        bwd_in += 2 * attn if below else 0.0
        for k, (i, o) in enumerate(dims.ffn_linears()):
            x_grad = below or k == 2  # layer 0's down_proj input depends on its gate/up adapters
            op(i, o, x_grad, False)                                   # frozen base
            if experts:
                op(i, experts * expert_r, x_grad, False)              # expert A (frozen)
                op(experts * expert_r, o, True, False)                # expert B (frozen; its input is gated)
            if router:
                op(i, experts, x_grad, True)                          # router W_x (trainable)
                op(lora_r, experts, True, True)                       # router W_l on A_u x
            if lora_r:
                op(i, lora_r, x_grad, True)                           # user A
                op(lora_r, o, True, True)                             # user B
    op(dims.d, dims.vocab, True, False, tokens=n_c)                   # LM head (tied, frozen)
    total = fwd + bwd_in + bwd_w
    return {"forward": fwd, "backward_input": bwd_in, "backward_weight": bwd_w, "total": total,
            "naive_6n": 6.0 * dims.matmul_params() * n_tok, "tokens": n_tok, "completion_tokens": n_c}


def batch_stats(encs) -> dict[str, int]:
    """Real tokens, completion positions and padded size of a list of Encoded examples as one batch."""
    lengths = [len(e.ids) for e in encs]
    comp = [sum(1 for x in e.labels[1:] if x != -100) for e in encs]
    return {"lengths": lengths, "completions": comp, "padded": len(encs) * max(lengths)}


def fmt_rate(x: float) -> str:
    return f"{x / 1e9:.1f} GFLOP/s"
