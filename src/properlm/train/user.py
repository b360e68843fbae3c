"""Stage 3, user: one LoRA per target user and the shared LoRA-aware router.

    properlm train --stage user --config configs/demo.yaml

Everything from stages 1–2 is frozen. Each target user gets a LoRA on the FFN
linears, trained on that user's history only; many users train in one batch
(their factors gathered per row, applied with batched matmuls). The shared
LoRA-aware router ``g = softmax(W_x x + W_e e_u + W_l A_u x)`` trains jointly
with them. Users train in cohorts of ``user.cohort_size``: only one cohort's
LoRAs and AdamW moments are in memory, and each cohort's users are written to
the user store (``RUN/store/lora``) when it ends. Users added later
(``properlm users add``) train only their own LoRA against the frozen router.
Saves ``RUN/user/router.safetensors``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from properlm.errors import ProperError
from properlm.io import atomic_dir
from properlm.model.layers import lora_dropout
from properlm.model.proper import ProperModel
from properlm.model.user_params import MOMENTS, UserParams
from properlm.run_config import RunConfig
from properlm.store.run import LORA, bank_dir
from properlm.store.user_store import UserStore
from properlm.train import distributed as D
from properlm.train.examples import Example, encode
from properlm.train.loop import seed_everything
from properlm.train.multiuser import Cohorts, MultiUserSpec, run_multiuser

STAGE = "user"


def make_cohorts(users: list[str], size: int, seed: int) -> list[list[str]]:
    """Users split into cohorts of at most ``size`` (one cohort, sorted, when they fit).

    With several cohorts the users are shuffled first (seeded), so that no
    systematic order (alphabetical, by activity) decides which users the shared
    router sees last.
    """
    users = sorted(users)
    if len(users) <= size:
        return [users]
    order = [users[i] for i in np.random.default_rng([seed, 3]).permutation(len(users))]
    return [sorted(order[i:i + size]) for i in range(0, len(order), size)]


def bank_schema(shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, tuple[int, ...]]]:
    """A user bank's parts: the parameters and their AdamW moments and step count."""
    adamw = {f"{k}.{m}": s for k, s in shapes.items() for m in MOMENTS}
    adamw["steps"] = (1,)
    return {"params": dict(shapes), "adamw": adamw}


def open_user_bank(run_dir: Path, bank: str, shapes: dict[str, tuple[int, ...]], meta: dict) -> UserStore:
    """The bank ``RUN/store/<bank>``, created with ``shapes`` when new."""
    return UserStore(bank_dir(run_dir, bank), schema=bank_schema(shapes), meta=meta)


def lora_meta(pm: ProperModel, cfg: RunConfig) -> dict:
    """What a LoRA bank records beside its tensors: rank, alpha and the adapted linears."""
    return {"r": cfg.user.r, "alpha": cfg.user.alpha, "targets": sorted({n.split(".", 2)[2] for n in pm.sites})}


def store_cohort(store: UserStore, bank: UserParams, users: list[str], keep_optimizer: bool) -> None:
    """Write the users' rows (and moments when kept) to the store, one atomic entry per user."""
    store.put_many({u: bank.row_state(u, optimizer=keep_optimizer) for u in users})


def train_users(cfg: RunConfig, run_dir: Path, pm: ProperModel, tok, examples: list[Example],
                resume: bool = False, train_router: bool = True, stage: str = STAGE, bank: str = LORA,
                work_dir: Path | None = None, from_store: bool = False,
                on_step: Callable[[int, int], bool] | None = None) -> UserStore:
    """Train a LoRA for every user in ``examples`` (and the shared router) and store them.

    Args:
        cfg: the run config (``cfg.user``).
        run_dir: the run directory (the bank is ``RUN/store/<bank>``).
        pm: a :class:`ProperModel` with stage-2 experts loaded (or plain, for the OPPU baselines).
        tok: the tokenizer.
        examples: the users' history pairs.
        resume: continue from this stage's last checkpoint.
        train_router: False for users added later: the shared router stays frozen.
        stage: name for logs and checkpoints.
        bank: the user bank written (``lora``; ``oppu-kv`` and ``oppu-mlp`` for the baselines).
        work_dir: where logs and checkpoints go (default: ``run_dir``).
        from_store: a user already in the bank continues from their stored LoRA and
            moments (``users add`` refreshing them); otherwise every user starts fresh.
        on_step: progress and cancellation hook, see :func:`~properlm.train.multiuser.run_multiuser`.

    Returns:
        The bank the users were written to. ``pm.user_loras`` holds the last cohort.
    """
    uc = cfg.user
    seed_everything(cfg.seed)
    users = sorted({e.user_id for e in examples})
    pm.add_user_lora(uc.r, uc.alpha, uc.lora_aware_router)
    for s in pm.sites.values():
        s.dropout = lora_dropout(uc.dropout)
    store = open_user_bank(run_dir, bank, pm.lora_shapes, lora_meta(pm, cfg))

    def begin(cohort: list[str]) -> None:
        pm.user_loras = pm.new_lora_bank(cohort, seed=cfg.seed)
        if from_store:
            for u in cohort:
                state = store.get(u, ("params", "adamw"), missing_ok=True)
                if state:
                    pm.user_loras.set_row_state(u, state)

    def end(cohort: list[str]) -> None:
        store_cohort(store, pm.user_loras, cohort, uc.keep_optimizer)

    shared = {}
    if uc.lora_aware_router and train_router:
        # W_x and W_l train; W_e (stage 2's user term, carried over) stays as stage 2 left it.
        shared = {n: p for n, p in pm.named_parameters() if ".router." in n and ".w_emb." not in n}
    for p in shared.values():
        p.requires_grad_(True)
    spec = MultiUserSpec(stage, shared, uc.router_lr, train_embs=False, train_loras=True, user_lr=uc.lr,
                         weight_decay=uc.weight_decay, constraint_weight=0.0, per_user_batch=uc.per_user_batch,
                         users_per_step=uc.users_per_step, epochs=uc.epochs, max_steps=uc.max_steps,
                         bind_embs=pm.user_embs is not None)
    run_multiuser(spec, pm, examples, lambda e: encode(tok, e, cfg.data.max_len), tok.pad_token_id,
                  Path(work_dir or run_dir), cfg.seed, cfg.checkpoint_every, cfg.max_grad_norm, cfg.bf16,
                  cfg.progress, resume, cohorts=Cohorts(make_cohorts(users, uc.cohort_size, cfg.seed), begin, end,
                                                        from_store=from_store), on_step=on_step,
                  shard=D.sharding(cfg.fsdp))
    for p in shared.values():
        p.requires_grad_(False)
    if train_router and D.is_main():
        save_router(pm, Path(run_dir) / STAGE)
    D.barrier()
    return store


def save_router(pm: ProperModel, out: Path) -> Path:
    """Write the LoRA-aware routers (``RUN/user/router.safetensors``) as one directory, atomically.

    Written even when empty (the "no LoRA-aware router" ablation): the directory
    is what marks stage 3 as done.
    """
    from safetensors.torch import save_file

    with atomic_dir(out, checksums=True) as tmp:
        rs = pm.stage_state(("router",), router_kind="lora-aware")
        if rs:
            save_file(rs, str(tmp / "router.safetensors"))
    return out


def train_end_to_end(cfg: RunConfig, run_dir: Path, pm: ProperModel, tok, examples: list[Example],
                     resume: bool = False) -> UserStore:
    """The end-to-end ablation: experts, user-aware router and user LoRAs trained jointly.

    On the stage-1 merged model, adds stage 2's experts and user-aware router with
    an embedding per *target* user, and a LoRA per target user (no LoRA-aware
    router), then trains all of it at once on the targets' history with the
    constraint loss. The experts, router and embeddings train with stage 2's
    learning rates for stage 2's epochs (``group``), the LoRAs with stage 3's
    learning rate, as the paper compares them. Writes ``RUN/group``, ``RUN/user``
    and both user banks.
    """
    from properlm.train.group import save_group, store_embeddings

    gc, uc = cfg.group, cfg.user
    if D.world() > 1:
        raise ProperError("the end-to-end ablation trains in one process (drop --processes)")
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
                         epochs=gc.epochs, max_steps=gc.max_steps, constraint_warmup=gc.constraint_warmup,
                         emb_lr=gc.user_lr if gc.user_lr is not None else gc.lr)
    run_multiuser(spec, pm, examples, lambda e: encode(tok, e, cfg.data.max_len), tok.pad_token_id, run_dir,
                  cfg.seed, cfg.checkpoint_every, cfg.max_grad_norm, cfg.bf16, cfg.progress, resume,
                  shard=D.sharding(cfg.fsdp))
    for p in shared.values():
        p.requires_grad_(False)
    pm.set_fallback_embedding()
    store_embeddings(pm, run_dir, users)
    save_group(pm, run_dir / "group")
    store = open_user_bank(run_dir, LORA, pm.lora_shapes, lora_meta(pm, cfg))
    store_cohort(store, pm.user_loras, users, uc.keep_optimizer)
    save_router(pm, run_dir / STAGE)
    return store

