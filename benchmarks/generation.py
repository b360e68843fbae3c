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
"""

from __future__ import annotations

import torch

from benchmarks.common import BenchConfig, Timer, make_data, median, peft_users, proper_stage3, randomize_
from properlm.model.generate import generate


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


def bench_generation(cfg: BenchConfig, log=print) -> dict:
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
    return result
