"""Stage 3, user: one LoRA per target user and the shared LoRA-aware router.

    properlm train --stage user --config configs/demo.yaml

Everything from stages 1–2 is frozen. Each target user gets a LoRA on the FFN
linears, trained on that user's history only; many users train in one batch
(their factors gathered per row, applied with batched matmuls). The shared
LoRA-aware router ``g = softmax(W_x x + W_l A_u x)`` trains jointly with them.
Users added later (``add_users``) train only their own LoRA against the frozen
router. Saves ``RUN/user/user_loras.safetensors`` and ``RUN/user/router.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from properlm.io import atomic_dir
from properlm.train.group import save_group
from properlm.model.layers import lora_dropout
from properlm.model.proper import ProperModel
from properlm.train.config import RunConfig
from properlm.train.examples import Example, encode
from properlm.train.loop import seed_everything
from properlm.train.multiuser import MultiUserSpec, run_multiuser

STAGE = "user"


def router_state(pm: ProperModel) -> dict[str, torch.Tensor]:
    """The LoRA-aware routers' weights by site."""
    return {f"{site}.router.{k}": v.detach().clone() for site, s in pm.sites.items()
            if s.router is not None and s.router.kind == "lora-aware" for k, v in s.router.state_dict().items()}


def train_users(cfg: RunConfig, run_dir: Path, pm: ProperModel, tok, examples: list[Example],
                resume: bool = False, train_router: bool = True, stage: str = STAGE) -> Path:
    """Add a LoRA for every user in ``examples`` and train them (and the shared router).

    Args:
        cfg: the run config (``cfg.user``).
        run_dir: the run directory.
        pm: a :class:`ProperModel` with stage-2 experts loaded.
        tok: the tokenizer.
        examples: the target users' history pairs.
        resume: continue from this stage's last checkpoint.
        train_router: False for users added later: the shared router stays frozen.
        stage: name for logs and checkpoints.
    """
    uc = cfg.user
    seed_everything(cfg.seed)
    users = sorted({e.user_id for e in examples})
    pm.add_users(users, uc.r, uc.alpha, uc.lora_aware_router, seed=cfg.seed)
    for s in pm.sites.values():
        s.dropout = lora_dropout(uc.dropout)
    shared = {}
    if uc.lora_aware_router and train_router:
        shared = {n: p for n, p in pm.named_parameters() if ".router." in n}
    for p in shared.values():
        p.requires_grad_(True)
    spec = MultiUserSpec(stage, shared, uc.router_lr, train_embs=False, train_loras=True, user_lr=uc.lr,
                         weight_decay=uc.weight_decay, constraint_weight=0.0, per_user_batch=uc.per_user_batch,
                         users_per_step=uc.users_per_step, epochs=uc.epochs, max_steps=uc.max_steps)
    enc = [encode(tok, e, cfg.data.max_len) for e in examples]
    run_multiuser(spec, pm, enc, tok.pad_token_id, run_dir, cfg.seed, cfg.checkpoint_every, cfg.max_grad_norm,
                  cfg.bf16, cfg.progress, resume)
    for p in shared.values():
        p.requires_grad_(False)
    return save_users(pm, run_dir / STAGE)


def save_users(pm: ProperModel, out: Path) -> Path:
    """Write the user LoRA bank and the LoRA-aware router (atomically, as one directory)."""
    with atomic_dir(out) as tmp:
        save_file(pm.user_loras.state_tensors("", optimizer=False), str(tmp / "user_loras.safetensors"),
                  metadata={"user_ids": json.dumps(pm.user_loras.user_ids)})
        rs = router_state(pm)
        if rs:
            save_file(rs, str(tmp / "router.safetensors"))
    return out


def train_end_to_end(cfg: RunConfig, run_dir: Path, pm: ProperModel, tok, examples: list[Example],
                     resume: bool = False) -> Path:
    """The end-to-end ablation: experts, user-aware router and user LoRAs trained jointly.

    On the stage-1 merged model, adds stage 2's experts and user-aware router with
    an embedding per *target* user, and a LoRA per target user (no LoRA-aware
    router), then trains all of it at once on the targets' history with the
    constraint loss. Writes both ``RUN/group`` and ``RUN/user``.
    """
    gc, uc = cfg.group, cfg.user
    seed_everything(cfg.seed)
    users = sorted({e.user_id for e in examples})
    pm.add_group(gc.num_experts, gc.r, gc.alpha, gc.dropout, "user-aware", gc.user_dim, users, seed=cfg.seed,
                 text_router_init=gc.text_router_init, user_embedding=gc.user_embedding)
    pm.add_users(users, uc.r, uc.alpha, lora_aware_router=False, seed=cfg.seed)
    shared = {n: p for n, p in pm.named_parameters() if ".experts." in n or ".router." in n}
    for p in shared.values():
        p.requires_grad_(True)
    spec = MultiUserSpec(STAGE, shared, gc.lr, train_embs=True, train_loras=True, user_lr=uc.lr,
                         weight_decay=uc.weight_decay, constraint_weight=gc.constraint_weight,
                         per_user_batch=uc.per_user_batch, users_per_step=uc.users_per_step,
                         epochs=uc.epochs, max_steps=uc.max_steps, constraint_warmup=gc.constraint_warmup)
    enc = [encode(tok, e, cfg.data.max_len) for e in examples]
    run_multiuser(spec, pm, enc, tok.pad_token_id, run_dir, cfg.seed, cfg.checkpoint_every, cfg.max_grad_norm,
                  cfg.bf16, cfg.progress, resume)
    for p in shared.values():
        p.requires_grad_(False)
    pm.set_fallback_embedding()
    save_group(pm, run_dir / "group")
    return save_users(pm, run_dir / STAGE)
