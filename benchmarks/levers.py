"""Levers on the hardware use of the batched stage-3 step, measured side by side.

One batch (the first example of every user) is trained again and again, each
variant once per round, rounds interleaved, so all variants see the same load.
For each variant: seconds per step, trained tokens/s, model FLOP/s (the honest
count of ``common.train_flops`` on real tokens) and its fraction of the bf16
matmul peak measured in the same round.

Variants:
- ``default``: properlm's stage 3 as it runs (``run_multiuser``, bf16 autocast,
  frozen base linears held in bf16, ``LoraDropout``), with the benchmark's
  attention implementation (``BenchConfig.attention``, eager by default);
- ``before: ...``: properlm's code before a speed change, re-created here by a
  patch, so each change's gain is measured in the same run:
  ``gather copies`` (user factors copied per site and row, times a 0/1 mask),
  ``float32 frozen weights`` (autocast casting every frozen weight on every call),
  ``torch dropout`` (``nn.Dropout``'s bernoulli mask), ``15-bit dropout mask``
  (``LoraDropout`` before it read 8-bit uniforms), ``KV cache in the training
  forward`` (transformers' default ``use_cache``), ``cross-entropy on a float32
  copy`` (``F.cross_entropy(logits.float())`` instead of the chunked
  ``properlm.model.cross_entropy``), ``all`` (the first three);
- ``causal-only attention``: no padding mask for right-padded batches (same
  real-token outputs; tried, not adopted);
- ``bf16 residual stream``: the embeddings and norms held in bf16 too, so the
  residual stream, the norms' outputs and RoPE run in bf16 (as a model loaded
  in bf16 does): measured, not adopted, as it changes the numerics of every
  stage and of the sequential baseline alike;
- ``fp32``: no autocast;
- ``sdpa attention`` / ``eager attention``: the other attention implementation;
- ``no dropout``: LoRA dropout off: not a lever (it changes training), but it
  bounds what dropout's mask generation costs;
- packing is not run: its bound is the padding efficiency (real / padded tokens).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

import properlm.model.proper as proper_mod
import properlm.train.multiuser as multiuser_mod
from benchmarks.common import (BenchConfig, Dims, Timer, batch_stats, compute_dtype, make_data, matmul_peak, median,
                               proper_stage3, train_flops)
from benchmarks.train import batched_step, multiuser_spec


def causal_only():
    """Give the attention no padding mask when the batch is right-padded (the causal path).

    Real tokens then see exactly what they saw before (they only attend to earlier,
    real, tokens; positions count from 0 either way); only padded positions, which
    no loss reads, change. Tried as a change to ``completion_nll``: not kept, as
    it measured within noise of the masked path here.
    """
    orig = multiuser_mod.completion_nll

    def nll(lm, input_ids, attention_mask, labels):
        m = attention_mask.bool()
        right = bool(m[:, 0].all()) and bool((m[:, 1:] <= m[:, :-1]).all())
        return orig(lm, input_ids, None if right else attention_mask, labels)

    return mock.patch.object(multiuser_mod, "completion_nll", nll)


def kv_cache():
    """Before: the training forward let transformers build a KV cache (its default ``use_cache``)."""
    orig = multiuser_mod.completion_nll

    def nll(lm, input_ids, attention_mask, labels):
        decoder = lm.get_decoder()
        call = decoder.forward

        def with_cache(*a, **kw):
            kw["use_cache"] = True
            return call(*a, **kw)

        decoder.forward = with_cache
        try:
            return orig(lm, input_ids, attention_mask, labels)
        finally:
            del decoder.forward

    return mock.patch.object(multiuser_mod, "completion_nll", nll)


def float32_cross_entropy():
    """Before: the completion loss on a float32 copy of the logits (torch's cross-entropy)."""
    return mock.patch.object(proper_mod, "cross_entropy",
                             lambda logits, target: F.cross_entropy(logits.float(), target, reduction="none"))


@contextlib.contextmanager
def bf16_residual(pm):
    """The embeddings and RMSNorm weights in bf16 for the step: the whole residual stream runs in bf16."""
    saved = []
    for m in pm.lm.modules():
        if isinstance(m, torch.nn.Embedding) or type(m).__name__.endswith("RMSNorm"):
            saved.append((m, m.weight.data))
            m.weight.data = m.weight.data.to(torch.bfloat16)
    try:
        yield
    finally:
        for m, w in saved:
            m.weight.data = w


def gather_copies():
    """ProperModel.bind as before: every site's factors indexed per row and multiplied by a validity mask."""
    orig = proper_mod.ProperModel.bind

    def bind(self, emb_users=None, lora_users=None, **kw):
        out = orig(self, emb_users=emb_users, lora_users=lora_users, **kw)
        if out.lora_leaves is not None:
            _, slots = proper_mod._present_and_slots(self.user_loras, lora_users, self.device)
            valid = (slots >= 0).float().view(-1, 1, 1)
            for name in self.sites:
                a = out.lora_leaves[f"{name}.lora_A"][slots.clamp(min=0)] * valid
                b = out.lora_leaves[f"{name}.lora_B"][slots.clamp(min=0)] * valid
                self.state.user_lora[name] = (a, b)
        return out

    return mock.patch.object(proper_mod.ProperModel, "bind", bind)


@contextlib.contextmanager
def attention(pm, impl: str):
    old = pm.lm.config._attn_implementation
    pm.lm.set_attn_implementation(impl)
    try:
        yield
    finally:
        pm.lm.set_attn_implementation(old)


def float32_frozen():
    """Before: the frozen linears stayed float32 and autocast cast them on every call."""
    return mock.patch.object(multiuser_mod, "frozen_bf16", lambda model, enabled: contextlib.nullcontext(0))


@contextlib.contextmanager
def site_dropouts(pm, make):
    """Every site's dropout module ``d`` replaced by ``make(d)`` for the step."""
    old = {n: s.dropout for n, s in pm.sites.items()}
    for s in pm.sites.values():
        s.dropout = make(s.dropout)
    try:
        yield
    finally:
        for n, s in pm.sites.items():
            s.dropout = old[n]


def torch_dropout(pm):
    """Before: ``nn.Dropout`` (a bernoulli draw per element) on the adapters' input."""
    return site_dropouts(pm, lambda d: torch.nn.Dropout(d.p) if hasattr(d, "p") else d)


class Dropout15(torch.nn.Module):
    """Before: ``LoraDropout`` as it was, two 15-bit uniforms per 30-bit draw split with bit arithmetic."""

    def __init__(self, p: float):
        super().__init__()
        self.threshold = round(p * 32768)
        self.scale = 1.0 / (1.0 - self.threshold / 32768)

    def forward(self, x):
        if not self.training or self.threshold == 0:
            return x
        n = x.numel()
        half = (n + 1) // 2
        bits = torch.randint(0, 1 << 30, (half,), dtype=torch.int32)
        keep = torch.empty(2, half, dtype=torch.bool)
        torch.ge(bits & 0x7FFF, self.threshold, out=keep[0])
        torch.ge(bits >> 15, self.threshold, out=keep[1])
        return torch.where(keep.view(-1)[:n].view(x.shape), x * self.scale, 0.0)


def dropout_15bit(pm):
    return site_dropouts(pm, lambda d: Dropout15(d.p).train(d.training) if hasattr(d, "p") else d)


def no_dropout(pm):
    return site_dropouts(pm, lambda d: torch.nn.Identity())


def variants(pm) -> dict:
    """name -> (context factory, bf16 autocast)."""
    def stack(*fs):
        @contextlib.contextmanager
        def both():
            with contextlib.ExitStack() as es:
                for f in fs:
                    es.enter_context(f())
                yield
        return both

    nothing = contextlib.nullcontext
    other = "sdpa" if pm.lm.config._attn_implementation == "eager" else "eager"
    return {
        "default": (nothing, True),
        "before: gather copies": (gather_copies, True),
        "before: float32 frozen weights": (float32_frozen, True),
        "before: torch dropout": (lambda: torch_dropout(pm), True),
        "before: 15-bit dropout mask": (lambda: dropout_15bit(pm), True),
        "before: KV cache in the training forward": (kv_cache, True),
        "before: cross-entropy on a float32 copy": (float32_cross_entropy, True),
        "before: all": (stack(gather_copies, float32_frozen, lambda: torch_dropout(pm)), True),
        "causal-only attention": (causal_only, True),
        "bf16 residual stream (not adopted)": (lambda: bf16_residual(pm), True),
        "fp32": (nothing, False),
        f"{other} attention": (lambda: attention(pm, other), True),
        "no dropout (bound)": (lambda: no_dropout(pm), True),
    }


def bench_levers(cfg: BenchConfig, log=print) -> dict:
    from properlm.model.base import load_tokenizer

    tok = load_tokenizer(cfg.model)
    users, enc, _ = make_data(cfg, tok)
    pm, tok, shared = proper_stage3(cfg, users, experts=True)
    for p in shared.values():
        p.requires_grad_(True)
    spec = multiuser_spec(cfg, shared, len(users))
    run_dir = Path(tempfile.mkdtemp(prefix="properlm-bench-levers-"))
    encs = [enc[u][0] for u in users]
    st = batch_stats(encs)
    flops = train_flops(Dims.of(pm.lm), st["lengths"], st["completions"], cfg.r, cfg.experts, cfg.expert_r,
                        router=True)["total"]
    tokens = sum(st["lengths"])
    vs = variants(pm)
    if compute_dtype() == torch.float32:
        # No native bf16 here: a bf16 run computes in float32, so the bf16 levers measure nothing, and the
        # bf16 residual stream would meet float32 weights without autocast (a dtype error).
        skipped = [n for n in vs if "bf16" in n]
        vs = {n: v for n, v in vs.items() if n not in skipped}
        log(f"[levers] this CPU has no native bf16: skipping {', '.join(skipped)}")
    log(f"[levers] {len(vs)} variants x {cfg.lever_rounds} rounds, batch {len(encs)} rows x {max(st['lengths'])} tokens")
    for name, (ctx, bf16) in vs.items():  # warm-up: every variant's kernels once
        with ctx():
            batched_step(cfg, pm, spec, encs, tok.pad_token_id, run_dir, bf16=bf16)
    timer, peaks = Timer(), []
    for k in range(cfg.lever_rounds):
        peaks.append(matmul_peak(2048, 0.5))
        for name, (ctx, bf16) in vs.items():
            with ctx():
                with timer(name):
                    batched_step(cfg, pm, spec, encs, tok.pad_token_id, run_dir, bf16=bf16)
        log(f"[levers] round {k + 1}: peak {peaks[-1] / 1e9:.0f} GFLOP/s; "
            + ", ".join(f"{n} {timer.rounds[n][-1]:.2f}s" for n in vs))
    shutil.rmtree(run_dir, ignore_errors=True)
    out = {"rows": len(encs), "tokens": tokens, "model_flops_per_step": flops,
           "padding_efficiency": tokens / st["padded"], "peak_gflops_median": median(peaks) / 1e9, "variants": {}}
    base = median(timer.rounds["default"])
    for name in vs:
        ts = timer.rounds[name]
        out["variants"][name] = {
            "seconds_per_step": median(ts), "seconds_min": min(ts), "tokens_per_s": tokens / median(ts),
            "model_gflops_per_s": flops / median(ts) / 1e9,
            "peak_fraction": median([flops / t / p for t, p in zip(ts, peaks)]),
            "speed_vs_default": base / median(ts),
            "speed_vs_default_min": min(timer.rounds["default"]) / min(ts),
        }
    return out
