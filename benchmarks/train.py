"""Stage-3 training throughput and hardware use: properlm's batched multi-user path against
the sequential per-user procedure of the paper and OPPU.

Contenders, all on the same examples (``examples_per_user`` history pairs of each of
``users`` synthetic users), each user seeing each of its examples once:

- ``proper``: properlm's stage 3 as ``train_users`` runs it (``run_multiuser``): stage-2
  experts + the shared LoRA-aware router + one LoRA per user, all users in one batch,
  one example per user per step (the paper's per-user batch of 1), row-sparse AdamW;
- ``lora_only``: the same batched path on the OPPU-mlp model (user LoRAs on the FFN, no
  experts/router), i.e. the same model as the baseline;
- ``seq_b1``: the paper's/OPPU's procedure: one PEFT LoRA per user on the FFN linears
  (one PEFT model, ``set_adapter`` per user), trained one user after another at batch
  size 1 with ``torch.optim.AdamW``, the loss as PEFT/HF compute it by default
  (``model(..., labels=...).loss``: the LM head at every position);
- ``seq_b1_head``: the same, given properlm's ``completion_nll`` (LM head only where a
  completion token is predicted), to separate that saving from batching;
- ``seq_b16``: as ``seq_b1`` with OPPU's trainer batch of 16 examples per user.

All use bf16 autocast. Work is interleaved: round k runs one batched step on every
user's k-th example, then the sequential trainers on the k-th slice of users (each
user's examples one after another), so that load from other processes hits every
contender alike.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (BenchConfig, Dims, Timer, batch_stats, make_data, matmul_peak, median,
                               peft_adapter_params, peft_users, proper_stage3, train_flops)
from properlm.model.proper import completion_nll
from properlm.train.examples import collate
from properlm.train.multiuser import MultiUserSpec, run_multiuser
from properlm.model.device import autocast


def multiuser_spec(cfg: BenchConfig, shared: dict, n_users: int, per_user_batch: int = 1) -> MultiUserSpec:
    """Stage 3's spec as ``train_users`` builds it (router trained jointly), every user in one step."""
    return MultiUserSpec("user", shared, cfg.lr, train_embs=False, train_loras=True, user_lr=cfg.lr,
                         weight_decay=0.0, constraint_weight=0.0, per_user_batch=per_user_batch, users_per_step=n_users,
                         epochs=1, max_steps=None)


def batched_step(cfg: BenchConfig, pm, spec: MultiUserSpec, encs, pad_id: int, run_dir: Path, bf16: bool | None = None):
    """One call of properlm's multi-user loop on ``encs`` (one example per user: one step)."""
    run_multiuser(spec, pm, encs, lambda e: e, pad_id, run_dir, cfg.seed, checkpoint_every=10 ** 9, max_grad_norm=1.0,
                  bf16=cfg.bf16 if bf16 is None else bf16, progress=False, resume=False)


class PeftTrainer:
    """OPPU's per-user loop on one PEFT model: ``set_adapter(u)``, AdamW per user.

    ``loss="hf"``: the model's own loss (``model(..., labels=...).loss``: logits and
    LM head at every position, the loss on completion tokens), what a PEFT/HF
    training loop does by default; ``loss="completion"``: properlm's
    ``completion_nll`` (LM head only where a completion token is predicted).
    Both are the mean NLL over the batch's completion tokens.
    """

    def __init__(self, cfg: BenchConfig, model, pad_id: int):
        self.cfg, self.model, self.pad_id = cfg, model, pad_id
        self.opts: dict[str, tuple[torch.optim.Optimizer, list]] = {}
        model.train()

    def switch(self, adapter: str) -> None:
        self.model.set_adapter(adapter)
        if adapter not in self.opts:
            params = peft_adapter_params(self.model, adapter)
            self.opts[adapter] = (torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=0.0), params)

    def train_user(self, adapter: str, encs, batch_size: int, loss_kind: str = "hf") -> list:
        """Train the (already switched-to) adapter on ``encs`` in order, ``batch_size`` per step; returns the batches."""
        opt, params = self.opts[adapter]
        batches = [encs[i:i + batch_size] for i in range(0, len(encs), batch_size)]
        for chunk in batches:
            b = collate(chunk, self.pad_id)
            with autocast(self.cfg.bf16, "cpu"):
                if loss_kind == "hf":
                    loss = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                      labels=b["labels"]).loss
                else:
                    nll, ntok = completion_nll(self.model, b["input_ids"], b["attention_mask"], b["labels"])
                    loss = nll.sum() / ntok.sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        return batches


def bench_train(cfg: BenchConfig, log=print) -> dict:
    from properlm.model.base import load_tokenizer

    tok = load_tokenizer(cfg.model)
    users, enc, _ = make_data(cfg, tok)
    E, U = cfg.examples_per_user, len(users)
    log(f"[train] {U} users x {E} examples; building models ({cfg.model})")
    pm, tok, shared = proper_stage3(cfg, users, experts=True)
    lo, _, lo_shared = proper_stage3(cfg, users, experts=False)
    # One PEFT model, one adapter per user and sequential contender.
    seq = [("seq_b1", "", 1, "hf"), ("seq_b1_head", "h_", 1, "completion"), ("seq_b16", "b16_", cfg.oppu_batch, "hf")]
    peft, _ = peft_users(cfg, [pre + u for _, pre, _, _ in seq for u in users])
    for p in shared.values():
        p.requires_grad_(True)
    spec, lo_spec = multiuser_spec(cfg, shared, U), multiuser_spec(cfg, lo_shared, U)
    trainer = PeftTrainer(cfg, peft, tok.pad_token_id)
    dims = Dims.of(pm.lm)
    run_dir = Path(tempfile.mkdtemp(prefix="properlm-bench-train-"))
    pad = tok.pad_token_id

    # Warm-up (oneDNN kernels, allocator): one step of each kind, outside the timed rounds.
    warm = [enc[u][0] for u in users]
    batched_step(cfg, pm, spec, warm, pad, run_dir)
    batched_step(cfg, lo, lo_spec, warm, pad, run_dir)
    for _, pre, bs, kind in seq:
        trainer.switch(pre + users[0])
        trainer.train_user(pre + users[0], enc[users[0]][:bs], bs, kind)

    timer, peaks = Timer(), []
    fl = {"proper": [], "lora_only": [], **{label: [] for label, _, _, _ in seq}}
    toks = {k: [] for k in fl}
    real, padded = 0, 0
    switch_s = 0.0
    chunks = [users[k * U // E:(k + 1) * U // E] for k in range(E)]
    for k in range(E):
        peaks.append(matmul_peak(2048, 0.5))
        encs = [enc[u][k] for u in users]
        st = batch_stats(encs)
        real, padded = real + sum(st["lengths"]), padded + st["padded"]
        with timer("proper"):
            batched_step(cfg, pm, spec, encs, pad, run_dir)
        with timer("lora_only"):
            batched_step(cfg, lo, lo_spec, encs, pad, run_dir)
        fl["proper"].append(train_flops(dims, st["lengths"], st["completions"], cfg.r, cfg.experts, cfg.expert_r,
                                        router=True)["total"])
        fl["lora_only"].append(train_flops(dims, st["lengths"], st["completions"], cfg.r)["total"])
        toks["proper"].append(sum(st["lengths"]))
        toks["lora_only"].append(sum(st["lengths"]))
        for label, prefix, bs, kind in seq:
            f = t = 0
            for u in chunks[k]:
                t0 = time.perf_counter()
                trainer.switch(prefix + u)  # adapter switch: timed apart, not charged to the baseline
                switch_s += time.perf_counter() - t0
                with timer(label):
                    batches = trainer.train_user(prefix + u, enc[u], bs, kind)
                for chunk in batches:
                    s = batch_stats(chunk)
                    f += train_flops(dims, s["lengths"], s["completions"], cfg.r)["total"]
                    t += sum(s["lengths"])
            # a round's sequential time is the sum of its users' (the timer keeps one entry per user)
            fl[label].append(f)
            toks[label].append(t)
        log(f"[train] round {k + 1}/{E}: peak {peaks[-1] / 1e9:.0f} GFLOP/s, "
            + ", ".join(f"{n} {toks[n][-1] / _round_time(timer, n, k, chunks):.0f} tok/s" for n in fl))

    shutil.rmtree(run_dir, ignore_errors=True)
    peak = median(peaks)
    out = {"users": U, "examples_per_user": E, "oppu_batch": cfg.oppu_batch, "bf16": cfg.bf16,
           "tokens": sum(toks["proper"]), "padding_efficiency": real / padded,
           "adapter_switch_s_excluded": switch_s, "peak_gflops_median": peak / 1e9,
           "peak_gflops_max": max(peaks) / 1e9, "peaks_gflops_per_round": [p / 1e9 for p in peaks], "contenders": {}}
    for n in fl:
        secs = timer.total[n]
        per_round = [_round_time(timer, n, k, chunks) for k in range(E)]
        out["contenders"][n] = {
            "seconds": secs, "tokens": sum(toks[n]), "tokens_per_s": sum(toks[n]) / secs,
            "model_flops": sum(fl[n]), "model_gflops_per_s": sum(fl[n]) / secs / 1e9,
            "peak_fraction": sum(fl[n]) / secs / peak,
            "peak_fraction_round_median": median([f / t / p for f, t, p in zip(fl[n], per_round, peaks)]),
            "seconds_per_round": per_round,
        }
    c = out["contenders"]
    for who in ("proper", "lora_only"):
        for label, _, _, _ in seq:
            key = "ratio" if who == "proper" else "ratio_lora_only"
            out[f"{key}_vs_{label}"] = c[who]["tokens_per_s"] / c[label]["tokens_per_s"]
    # Per-round throughput ratios (different users per round on the sequential side): a noise check.
    out["ratio_vs_seq_b1_round_median"] = median([
        (toks["proper"][k] / _round_time(timer, "proper", k, chunks))
        / (toks["seq_b1"][k] / _round_time(timer, "seq_b1", k, chunks)) for k in range(E)])
    ex = batch_stats(warm)
    f = train_flops(dims, ex["lengths"], ex["completions"], cfg.r, cfg.experts, cfg.expert_r, router=True)
    out["flops_breakdown_one_step"] = {k: v for k, v in f.items()}
    return out


def _round_time(timer: Timer, label: str, k: int, chunks) -> float:
    """Seconds ``label`` spent in round k (sequential trainers log one entry per user of the round)."""
    xs = timer.rounds.get(label, [])
    if label in ("proper", "lora_only"):
        return xs[k] if k < len(xs) else float("nan")
    start = sum(len(c) for c in chunks[:k])
    part = xs[start:start + len(chunks[k])]
    return sum(part) if part else float("nan")
