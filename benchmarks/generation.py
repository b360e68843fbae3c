"""Generation throughput: 32 queries of 32 different users.

Contenders, same prompts, greedy decoding, same ``max_new_tokens``, same precision:

- ``mixed_batch``: properlm's ``generate`` with ``lora_users``: all queries in one
  left-padded batch, each row with its own user's LoRA (the full stage-3 model:
  experts + LoRA-aware router + user LoRAs);
- ``mixed_batch_lora_only``: the same on the OPPU-mlp model (user LoRAs only), the
  same model as the baseline;
- ``peft_switch``: one PEFT model with all users' adapters loaded; per query
  ``set_adapter(user)`` then ``generate`` of that one query (batch 1). The adapter
  weights are the LoRA-only model's, so the two must give the same answers
  (checked: ``agree``).

Timed in alternation (``gen_repeats`` times, median), in fp32 (``generate``'s default)
and in bf16 autocast. The headline ratio takes each contender in its faster precision;
the same-precision ratios are reported too.

Decode steps (:func:`bench_decode`, float32), seconds per token step of a
:class:`~properlm.model.decoding.DecodeBatch` after the prefill, the contenders stepped
in turn one token at a time (the order rotating), so a busy machine slows them alike;
the median over every timed step (the mean is reported too):

- ``single``: one query of one user: plain transformers (the same base, nothing wrapped)
  against the full stage-3 model with that user's LoRA, the LoRA-only model, and PEFT
  with one LoRA active, and the full model with its fused inference path off. The target
  is the full model's cost per token against plain transformers (at most 1.10x);
- ``mixed``: 32 rows of 32 users in one batch: the full model and the LoRA-only model
  against one PEFT model holding all 32 adapters, called with ``adapter_names`` (PEFT's
  own mixed-adapter batch inference). Target: PEFT's step at least 2.5x the full model's.
  Plain transformers decodes the same 32 prompts too: PEFT's step against it is the most
  that any adapter implementation could reach.
"""

from __future__ import annotations

import torch

from benchmarks.common import BenchConfig, Timer, make_data, median, peft_users, proper_stage3, randomize_
from properlm.model.decoding import DecodeBatch, Row
from properlm.model.generate import generate
from properlm.model.prompts import encode_prompt


def copy_bank_to_peft(pm, peft, users: list[str]) -> None:
    """Copy each user's LoRA factors from a ProperModel bank into the PEFT adapter of the same name."""
    mods = dict(peft.named_modules())
    with torch.no_grad():
        for site in pm.sites:
            m = next(v for k, v in mods.items() if k.endswith(f"model.{site}") and hasattr(v, "lora_A"))
            for u in users:
                i = pm.user_loras.index(u)
                m.lora_A[u].weight.copy_(pm.user_loras.params[f"{site}.lora_A"][i])
                m.lora_B[u].weight.copy_(pm.user_loras.params[f"{site}.lora_B"][i])


class PeftRows:
    """A PEFT model called with one adapter per batch row (``adapter_names``, PEFT's mixed-batch
    inference), so that :class:`DecodeBatch` can decode with it."""

    def __init__(self, peft, names: list[str]):
        self.peft, self.names = peft, list(names)

    def parameters(self):
        return self.peft.parameters()

    def __call__(self, **kw):
        return self.peft(**kw, adapter_names=self.names)


def contenders(cfg: BenchConfig, log=print):
    """(users, prompts, tok, full stage-3 model, LoRA-only model, PEFT model with every user's adapter)."""
    from properlm.model.base import load_tokenizer

    tok = load_tokenizer(cfg.model)
    users, _, queries = make_data(cfg, tok, per_user=1)
    prompts = [queries[u] for u in users]
    full, tok, _ = proper_stage3(cfg, users, experts=True)
    lo, _, _ = proper_stage3(cfg, users, experts=False)
    for pm in (full, lo):  # trained users: non-zero B, so every row's answer depends on its user
        randomize_([v for k, v in pm.user_loras.params.items() if k.endswith("lora_B")], 0.02, cfg.seed + 7)
        pm.eval()
    full.user_loras.params = {k: v.clone() for k, v in lo.user_loras.params.items()}
    peft, _ = peft_users(cfg, users)
    copy_bank_to_peft(lo, peft, users)
    peft.eval()
    return users, prompts, tok, full, lo, peft


def _step_race(batches: dict[str, DecodeBatch], steps: int, timer: Timer,
               fuse: dict[str, tuple] | None = None) -> dict[str, list[list[int]]]:
    """Greedy-decode ``steps`` tokens in every batch, one step of each in turn (the order rotating),
    timing each step under its contender's name; the tokens each batch chose, per row.

    ``fuse``: name -> (model, on) for contenders that share a model but not its fused path (each
    sets it before its own steps)."""
    names = list(batches)
    chosen = {k: [[] for _ in b.rows] for k, b in batches.items()}
    for i in range(steps):
        for k in names[i % len(names):] + names[:i % len(names)]:
            b = batches[k]
            picks = [int(t) for t in b.next_logits.argmax(-1)]
            for row, t in zip(chosen[k], picks):
                row.append(t)
            if fuse and k in fuse:
                fuse[k][0].state.fuse = fuse[k][1]
            with timer(k):
                b.step(picks)
    if fuse:
        for model, _ in fuse.values():
            model.state.fuse = True
    return chosen


def _per_step(timer: Timer) -> dict[str, dict]:
    """Median and mean seconds per step of each contender over every timed step (the median: a step
    that another process interrupted says little about either side)."""
    return {k: {"seconds_per_step": median(v), "mean_seconds_per_step": sum(v) / len(v), "steps_timed": len(v)}
            for k, v in timer.rounds.items()}


def bench_decode(cfg: BenchConfig, models=None, log=print) -> dict:
    """Seconds per decode step, float32: one user's query (against plain transformers and PEFT with
    one LoRA) and a 32-user mixed batch (against PEFT's ``adapter_names`` batch)."""
    from properlm.model.base import load_base

    users, prompts, tok, full, lo, peft = models or contenders(cfg, log)
    plain, _ = load_base(cfg.model, attention=cfg.attention)
    plain.eval()
    steps = cfg.gen_tokens
    rounds_single, rounds_mixed = 4 * max(cfg.gen_repeats, 2), max(cfg.gen_repeats, 3)
    ids = [encode_prompt(tok, p, 512) for p in prompts]
    out: dict = {"steps": steps, "rounds_single": rounds_single, "rounds_mixed": rounds_mixed, "precision": "fp32"}

    # -- one user ----------------------------------------------------------------------------
    # proper_unfused: the same full model with its fused inference path off (the training path's
    # matmuls, the users still bound once per batch).
    timer, agree, same = Timer(), [], []
    fuse = {"proper": (full, True), "proper_unfused": (full, False)} if hasattr(full.state, "fuse") else {}
    for r in range(rounds_single):
        u = users[r % len(users)]
        peft.set_adapter(u)
        batches = {}
        for k, model in (("plain", plain), ("proper", full), ("proper_lora_only", lo), ("peft_one_lora", peft),
                         *((("proper_unfused", full),) if fuse else ())):
            batches[k] = DecodeBatch(model, tok.pad_token_id)
            batches[k].add([Row(k, ids[r % len(users)], u if k.startswith("proper") else None)])
        chosen = _step_race(batches, steps, timer, fuse)
        agree.append(chosen["proper_lora_only"] == chosen["peft_one_lora"])
        if fuse:
            same.append(chosen["proper"] == chosen["proper_unfused"])
    single = _per_step(timer)
    t = {k: v["seconds_per_step"] for k, v in single.items()}
    for k in t:
        if k != "plain":
            single[f"{k}_vs_plain"] = t[k] / t["plain"]
    single["proper_vs_peft_one_lora"] = t["proper"] / t["peft_one_lora"]
    single["lora_only_tokens_equal_peft"] = f"{sum(agree)}/{len(agree)}"
    if fuse:
        single["fused_tokens_equal_unfused"] = f"{sum(same)}/{len(same)}"
    out["single"] = single
    log(f"[decode] one user, fp32, median s/step: plain {t['plain'] * 1e3:.1f} ms, proper {t['proper'] * 1e3:.1f} ms "
        f"({single['proper_vs_plain']:.3f}x plain, {single['proper_vs_peft_one_lora']:.3f}x PEFT), LoRA-only "
        f"{single['proper_lora_only_vs_plain']:.3f}x plain, PEFT one LoRA {single['peft_one_lora_vs_plain']:.3f}x plain"
        + (f", proper unfused {single['proper_unfused_vs_plain']:.3f}x plain (tokens equal to fused "
           f"{single['fused_tokens_equal_unfused']})" if fuse else ""))

    # -- a mixed batch of every user ----------------------------------------------------------
    timer, agree = Timer(), 0
    named = PeftRows(peft, users)
    for r in range(rounds_mixed):
        batches = {}
        for k, model in (("plain", plain), ("proper", full), ("proper_lora_only", lo), ("peft_adapter_names", named)):
            batches[k] = DecodeBatch(model, tok.pad_token_id)
            batches[k].add([Row(i, ids[i], u if k.startswith("proper") else None) for i, u in enumerate(users)])
        chosen = _step_race(batches, steps, timer)
        agree += sum(a == b for a, b in zip(chosen["proper_lora_only"], chosen["peft_adapter_names"]))
    mixed = _per_step(timer)
    t = {k: v["seconds_per_step"] for k, v in mixed.items()}
    p = t["peft_adapter_names"]
    mixed["peft_vs_proper"] = p / t["proper"]
    mixed["peft_vs_proper_lora_only"] = p / t["proper_lora_only"]
    # The most any adapter implementation could reach: PEFT's step against the base's own.
    mixed["peft_vs_plain"] = p / t["plain"]
    mixed["proper_vs_plain"] = t["proper"] / t["plain"]
    mixed["rows"] = len(users)
    mixed["lora_only_rows_equal_peft"] = f"{agree}/{len(users) * rounds_mixed}"
    out["mixed"] = mixed
    log(f"[decode] {len(users)} users in one batch, fp32, median s/step: plain {t['plain']:.3f}, proper "
        f"{t['proper']:.3f}, LoRA-only {t['proper_lora_only']:.3f}, PEFT adapter_names {p:.3f} -> "
        f"{mixed['peft_vs_proper']:.2f}x ({mixed['peft_vs_proper_lora_only']:.2f}x LoRA-only; PEFT vs plain "
        f"{mixed['peft_vs_plain']:.2f}x, the ceiling); LoRA-only rows equal to PEFT's {mixed['lora_only_rows_equal_peft']}")
    return out


def bench_generation(cfg: BenchConfig, log=print) -> dict:
    users, prompts, tok, full, lo, peft = models = contenders(cfg, log)
    n = cfg.gen_tokens
    log(f"[generate] {len(users)} queries of {len(users)} users, {n} new tokens, prompts "
        f"{min(len(tok(p).input_ids) for p in prompts)}-{max(len(tok(p).input_ids) for p in prompts)} tokens")

    def mixed(pm, bf16):
        return generate(pm, tok, prompts, lora_users=users, max_new_tokens=n, batch_size=len(users), bf16=bf16)

    def switch(bf16):
        out = []
        for u, p in zip(users, prompts):
            peft.set_adapter(u)
            out += generate(peft, tok, [p], max_new_tokens=n, batch_size=1, bf16=bf16)
        return out

    result = {"queries": len(users), "max_new_tokens": n, "precisions": {}}
    for bf16 in (False, True):
        tag = "bf16" if bf16 else "fp32"
        mixed(full, bf16), mixed(lo, bf16), generate(peft, tok, prompts[:1], max_new_tokens=2, bf16=bf16)  # warm-up
        timer, answers = Timer(), {}
        for _ in range(cfg.gen_repeats):
            with timer("mixed_batch"):
                answers["mixed_batch"] = mixed(full, bf16)
            with timer("mixed_batch_lora_only"):
                answers["mixed_batch_lora_only"] = mixed(lo, bf16)
            with timer("peft_switch"):
                answers["peft_switch"] = switch(bf16)
        res = {}
        for k in timer.rounds:
            t = median(timer.rounds[k])
            gen_tokens = sum(min(n, len(tok(a, add_special_tokens=False).input_ids) + 1) for a in answers[k])
            res[k] = {"seconds": t, "queries_per_s": len(users) / t, "answer_tokens_approx": gen_tokens}
        res["ratio"] = res["peft_switch"]["seconds"] / res["mixed_batch"]["seconds"]
        res["ratio_lora_only"] = res["peft_switch"]["seconds"] / res["mixed_batch_lora_only"]["seconds"]
        res["agree"] = sum(a == b for a, b in zip(answers["mixed_batch_lora_only"], answers["peft_switch"]))
        res["distinct_answers"] = len(set(answers["mixed_batch"]))
        result["precisions"][tag] = res
        log(f"[generate] {tag}: mixed batch {res['mixed_batch']['seconds']:.2f}s, lora-only "
            f"{res['mixed_batch_lora_only']['seconds']:.2f}s, PEFT switching {res['peft_switch']['seconds']:.2f}s "
            f"-> {res['ratio']:.1f}x; LoRA-only vs PEFT answers agree {res['agree']}/{len(users)}")
    # Headline: each contender in its faster precision (PEFT at batch 1 is faster in fp32, where
    # autocast's per-step weight casts are not paid; the batch is faster in bf16).
    best = {k: min(result["precisions"], key=lambda p: result["precisions"][p][k]["seconds"])
            for k in ("mixed_batch", "peft_switch")}
    result["best_precision"] = best
    result["ratio"] = (result["precisions"][best["peft_switch"]]["peft_switch"]["seconds"]
                       / result["precisions"][best["mixed_batch"]]["mixed_batch"]["seconds"])
    result["decode"] = bench_decode(cfg, models, log)
    return result
