"""Export a user to what vLLM, LoRAX and PEFT load: a Hugging Face base and a PEFT LoRA folder.

    properlm export --run runs/demo --user u007 --out exports/u007

Writes ``OUT/base/`` (the stage-1-merged base model and its tokenizer, a Hugging
Face model directory) and ``OUT/adapter/`` (``adapter_config.json`` and
``adapter_model.safetensors`` with PEFT's key names), so that::

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("OUT/base"), "OUT/adapter")

is the user's model, and ``vllm serve OUT/base --enable-lora --lora-modules u007=OUT/adapter`` serves it.

- An OPPU user (``--bank oppu-kv`` / ``oppu-mlp``) is a plain LoRA: exported exactly.
- A PROPER user's model mixes the group experts with input-dependent routing,
  which plain LoRA servers cannot run. The export folds the experts in with the
  user's *mean* routing weights ``ḡ`` (per adapted linear, averaged over the
  tokens of their history): ``ΔW = Σ_k ḡ_k s_e B_k A_k + s_u B_u A_u``, one
  LoRA of rank ``K·r_e + r_u`` per FFN linear (``lora_alpha`` = rank, so PEFT's
  scaling is 1). This is an approximation; :func:`agreement` measures it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from properlm.errors import ProperError, UnknownUser
from properlm.io import atomic_dir, write_json

FOLDED = "folded-mean-routing"


def _merged_base(cfg, run_dir: Path):
    from properlm.model.population import merge_population
    from properlm.store.run import load_model

    lm, tok = load_model(cfg, run_dir, "population", device="cpu")
    return merge_population(lm, run_dir / "population").eval(), tok


@torch.no_grad()
def mean_routing(run_dir: Path, user: str, max_examples: int = 32) -> dict[str, torch.Tensor]:
    """The user's mean routing weights per site (K,), over the tokens of their history, in their own model."""
    from properlm.model.device import autocast
    from properlm.store.run import load_model, read_config, read_split
    from properlm.train.examples import collate, encode, user_examples
    from properlm.train.run import load_data

    cfg = read_config(run_dir)
    pm, tok = load_model(cfg, run_dir, "done", device="cpu")
    if pm.user_loras is None or user not in pm.user_loras:
        raise UnknownUser(user, f"in {run_dir} (no stage-3 LoRA)")
    ds = load_data(cfg)
    by_id = {u.id: u for u in ds.users}
    if user not in by_id:
        raise ProperError(f"{cfg.data.path}: user {user} has no history there to average routing over")
    ex = user_examples(read_split(run_dir)["task"], by_id[user], history=True)[-max_examples:]
    emb = user if pm.user_embs is not None and user in pm.user_embs else None
    sums: dict[str, torch.Tensor] = {}
    n = 0.0
    for s in range(0, len(ex), 8):
        b = collate([encode(tok, e, cfg.data.max_len) for e in ex[s:s + 8]], tok.pad_token_id)
        rows = len(b["input_ids"])
        pm.bind(lora_users=[user] * rows, emb_users=[emb] * rows, token_mask=b["attention_mask"], record=True)
        with autocast(cfg.bf16, pm.device):  # as the user's model runs (a bf16 base needs it)
            pm.hidden_states(b["input_ids"], b["attention_mask"])
        w = b["attention_mask"].sum(1).float()                                  # tokens per row
        for site, r in zip(pm.sites, pm.state.routes):                          # (B, K) per site, in order
            sums[site] = sums.get(site, 0) + (r * w.unsqueeze(1)).sum(0)
        n += float(w.sum())
        pm.state.clear()
    return {site: v / n for site, v in sums.items()}


def _peft_folder(base, tok, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: dict[str, float],
                 out: Path, meta: dict) -> None:
    """Save ``factors`` (site -> (A (r, in), B (out, r))) as a PEFT LoRA of ``base`` in ``out`` (PEFT writes it)."""
    from peft import LoraConfig, get_peft_model

    ranks = {site: a.shape[0] for site, (a, _) in factors.items()}
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    # PEFT's scaling is lora_alpha / r: alpha = scaling * r reproduces each site's scaling exactly.
    targets = sorted({site.split(".", 2)[2] for site in factors})
    alpha0 = scaling[next(s for s in factors if ranks[s] == r0)] * r0
    rank_pattern = {s: r for s, r in ranks.items() if r != r0}
    alpha_pattern = {s: scaling[s] * ranks[s] for s in factors if not math.isclose(scaling[s] * ranks[s], alpha0)}
    lc = LoraConfig(r=r0, lora_alpha=alpha0, target_modules=[t.split(".")[-1] for t in targets], lora_dropout=0.0,
                    bias="none", task_type="CAUSAL_LM", rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    model = get_peft_model(base, lc)
    mods = dict(model.named_modules())
    for site, (a, b) in factors.items():
        m = next(v for k, v in mods.items() if k.endswith(f"model.{site}") and hasattr(v, "lora_A"))
        m.lora_A["default"].weight.copy_(a)
        m.lora_B["default"].weight.copy_(b)
    model.save_pretrained(str(out))
    write_json(out / "properlm.json", meta)
    model.unload()


@torch.no_grad()
def export_user(run_dir: str | Path, user: str, out: str | Path, bank: str = "lora") -> dict:
    """Write ``OUT/base`` and ``OUT/adapter`` for one user (see the module doc); returns what was written.

    Args:
        run_dir: a trained run.
        user: the user id.
        out: the output directory (replaced atomically).
        bank: ``lora`` (PROPER's stage 3: folded) or an OPPU baseline (``oppu-kv``, ``oppu-mlp``: exact).
    """
    from properlm.store.run import open_bank, read_config

    run_dir, out = Path(run_dir), Path(out)
    cfg = read_config(run_dir)
    store = open_bank(run_dir, bank)
    if store is None:
        raise ProperError(f"{run_dir}: no user bank {bank!r} (train it first)")
    if user not in store:
        raise UnknownUser(user, f"in {run_dir} bank {bank}")
    params = store.get(user)["params"]
    r_u, alpha_u = int(store.meta.get("r", cfg.user.r)), float(store.meta.get("alpha", cfg.user.alpha))
    sites = sorted({k.rsplit(".", 1)[0] for k in params})
    base, tok = _merged_base(cfg, run_dir)
    if bank != "lora":  # plain LoRA: exact
        factors = {s: (params[f"{s}.lora_A"], params[f"{s}.lora_B"]) for s in sites}
        scaling = {s: alpha_u / r_u for s in sites}
        meta = {"user": user, "bank": bank, "kind": "exact"}
    else:
        from safetensors.torch import load_file

        experts = load_file(str(run_dir / "group" / "experts.safetensors"))
        g = mean_routing(run_dir, user)
        k, r_e = cfg.group.num_experts, cfg.group.r
        s_e, s_u = cfg.group.alpha / r_e, alpha_u / r_u
        factors, scaling = {}, {}
        for s in sites:
            a_e, b_e = experts[f"{s}.experts.lora_A"], experts[f"{s}.experts.lora_B"]   # (K r, in), (out, K r)
            gate = g[s].repeat_interleave(r_e)                                          # (K r,)
            a = torch.cat([a_e, params[f"{s}.lora_A"]], 0)                              # (K r + r_u, in)
            b = torch.cat([b_e * (s_e * gate), params[f"{s}.lora_B"] * s_u], 1)         # (out, K r + r_u)
            factors[s], scaling[s] = (a, b), 1.0
        meta = {"user": user, "bank": bank, "kind": FOLDED, "rank": k * r_e + r_u,
                "mean_routing": {s: [round(float(x), 6) for x in g[s]] for s in sites}}
    with atomic_dir(out) as tmp:
        base.save_pretrained(str(tmp / "base"))
        tok.save_pretrained(str(tmp / "base"))
        _peft_folder(base, tok, factors, scaling, tmp / "adapter", meta)
    return {"out": str(out), **{k: v for k, v in meta.items() if k != "mean_routing"}}


@torch.no_grad()
def agreement(run_dir: str | Path, out: str | Path, user: str, prompts: list[str], max_new_tokens: int = 16) -> dict:
    """How close the exported model is to properlm's own for ``user``: greedy answers and next-token KL.

    Both models answer each prompt greedily (``identical``: the share of equal
    answers); the KL divergence KL(properlm || export) of the next-token
    distributions is averaged over every position of properlm's answers
    (teacher-forced, so both see the same tokens).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from properlm import load_run
    from properlm.model.generate import generate
    from properlm.model.prompts import encode_prompt

    out = Path(out)
    lm = load_run(run_dir, device="cpu")
    lm.model.eval()
    bank = out / "adapter" / "properlm.json"
    kind = __import__("json").loads(bank.read_text())
    if kind["bank"] != "lora":
        from properlm.evaluate.baselines import load_oppu

        pm, tok = load_oppu(lm.cfg, run_dir, kind["bank"])
        ours = lambda ps: generate(pm, tok, ps, lora_users=[user] * len(ps), max_new_tokens=max_new_tokens)  # noqa: E731
        rows = {"lora": [user], "emb": [None]}
        model = pm
    else:
        ours = lambda ps: lm.generate(ps, [user] * len(ps), max_new_tokens=max_new_tokens)  # noqa: E731
        lora, emb = lm.rows_for([user])
        rows, model, tok = {"lora": lora, "emb": emb}, lm.model, lm.tok
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(out / "base")), str(out / "adapter")).eval()
    a = ours(prompts)
    b = generate(peft, tok, prompts, max_new_tokens=max_new_tokens)
    kls = []
    for p, ans in zip(prompts, a):
        ids = encode_prompt(tok, p, 512) + tok(ans, add_special_tokens=False).input_ids
        x = torch.tensor([ids])
        model.bind(lora_users=rows["lora"], emb_users=rows["emb"])
        lp = torch.log_softmax(model(x, torch.ones_like(x)).float(), -1)
        model.state.clear()
        lq = torch.log_softmax(peft(input_ids=x).logits.float(), -1)
        n = max(1, len(ids) - len(encode_prompt(tok, p, 512)))
        kl = (lp.exp() * (lp - lq)).sum(-1)[0, -n - 1:]                         # the answer's positions
        kls.append(float(kl.mean()))
    return {"user": user, "prompts": len(prompts), "identical": sum(x == y for x, y in zip(a, b)) / len(prompts),
            "mean_kl": sum(kls) / len(kls), "max_kl": max(kls)}


def cmd_export(args) -> int:
    info = export_user(args.run, args.user, args.out, bank=args.bank)
    print(f"exported {info['user']} ({info['kind']}) to {info['out']}/base and {info['out']}/adapter")
    return 0


def register(subparsers) -> None:
    """Add ``properlm export``."""
    p = subparsers.add_parser(
        "export", help="write a user as a Hugging Face base + PEFT LoRA folder (for vLLM, LoRAX, PEFT)",
        description="Writes OUT/base (the stage-1-merged base, a Hugging Face model directory) and OUT/adapter "
                    "(a PEFT LoRA: adapter_config.json + adapter_model.safetensors). OPPU users export exactly; a "
                    "PROPER user's group experts are folded in with the user's mean routing weights, an "
                    "approximation (docs/evaluation.md gives its measured agreement).")
    p.add_argument("--run", required=True, help="a trained run directory")
    p.add_argument("--user", required=True, help="the user id")
    p.add_argument("--out", required=True, help="output directory (replaced)")
    p.add_argument("--bank", default="lora", choices=("lora", "oppu-kv", "oppu-mlp"),
                   help="lora: the PROPER user (default); oppu-kv / oppu-mlp: that baseline's LoRA of the user")
    p.set_defaults(func=cmd_export)
