"""Stage 2, group: K LoRA experts on the FFN, a user-aware router, the constraint loss.

    properlm train --stage group --config configs/demo.yaml

On the stage-1 merged model (frozen), every FFN linear gets K LoRA experts
mixed by a dense softmax router ``g(x, u) = softmax(W_t x + W_u e_u)`` with a
learned embedding ``e_u`` per training user. Several users share each batch so
the constraint loss (mean cosine of different users' routing vectors) has
pairs. Saves ``RUN/group/experts.safetensors`` (experts and routers) and
``RUN/group/user_embeddings.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from properlm.io import atomic_dir
from properlm.model.proper import ProperModel
from properlm.train.config import RunConfig
from properlm.train.examples import Example, encode
from properlm.train.loop import seed_everything
from properlm.train.multiuser import MultiUserSpec, run_multiuser

STAGE = "group"


def group_state(pm: ProperModel) -> dict[str, torch.Tensor]:
    """Experts and routers of every site, by name (``layers.0.mlp.up_proj.experts.lora_A`` ...)."""
    return {f"{site}.{k}": v.detach().clone() for site, s in pm.sites.items()
            for part in ("experts", "router") if getattr(s, part) is not None
            for k, v in ((f"{part}.{n}", t) for n, t in getattr(s, part).state_dict().items())}


def load_group_state(pm: ProperModel, tensors: dict[str, torch.Tensor]) -> None:
    for site, s in pm.sites.items():
        for part in ("experts", "router"):
            mod = getattr(s, part)
            if mod is not None:
                pre = f"{site}.{part}."
                sub = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
                if sub:  # a file may hold only some parts (user/router.safetensors: routers only)
                    mod.load_state_dict(sub)


def train_group(cfg: RunConfig, run_dir: Path, pm: ProperModel, tok, examples: list[Example], resume: bool = False) -> Path:
    """Add stage-2 experts and routers to ``pm``, train them on ``examples``, save them.

    Args:
        cfg: the run config (``cfg.group``).
        run_dir: the run directory.
        pm: a :class:`ProperModel` over the stage-1 merged model.
        tok: the tokenizer.
        examples: training users' pairs (their ids become the embedding table).
        resume: continue from this stage's last checkpoint.
    """
    gc = cfg.group
    seed_everything(cfg.seed)
    users = sorted({e.user_id for e in examples})
    pm.add_group(gc.num_experts, gc.r, gc.alpha, gc.dropout, gc.router, gc.user_dim, users, seed=cfg.seed,
                 text_router_init=gc.text_router_init, user_embedding=gc.user_embedding)
    shared = {n: p for n, p in pm.named_parameters() if ".experts." in n or ".router." in n}
    for p in shared.values():
        p.requires_grad_(True)
    spec = MultiUserSpec(STAGE, shared, gc.lr, train_embs=gc.router == "user-aware", train_loras=False,
                         user_lr=gc.user_lr if gc.user_lr is not None else gc.lr, weight_decay=0.0, constraint_weight=gc.constraint_weight,
                         per_user_batch=gc.per_user_batch, users_per_step=gc.users_per_step,
                         epochs=gc.epochs, max_steps=gc.max_steps, constraint_warmup=gc.constraint_warmup)
    enc = [encode(tok, e, cfg.data.max_len) for e in examples]
    run_multiuser(spec, pm, enc, tok.pad_token_id, run_dir, cfg.seed, cfg.checkpoint_every, cfg.max_grad_norm,
                  cfg.bf16, cfg.progress, resume)
    for p in shared.values():
        p.requires_grad_(False)
    pm.set_fallback_embedding()
    return save_group(pm, run_dir / STAGE)


def save_group(pm: ProperModel, out: Path) -> Path:
    with atomic_dir(out) as tmp:
        save_file(group_state(pm), str(tmp / "experts.safetensors"))
        if pm.user_embs is not None:
            save_file(pm.user_embs.state_tensors("", optimizer=False), str(tmp / "user_embeddings.safetensors"),
                      metadata={"user_ids": json.dumps(pm.user_embs.user_ids)})
    return out
