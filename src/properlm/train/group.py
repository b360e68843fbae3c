"""Stage 2, group: K LoRA experts on the FFN, a user-aware router, the constraint loss.

    properlm train --stage group --config configs/demo.yaml

On the stage-1 merged model (frozen), every FFN linear gets K LoRA experts
mixed by a dense softmax router ``g(x, u) = softmax(W_t x + W_u e_u)`` with a
learned embedding ``e_u`` per training user. Several users share each batch so
the constraint loss (mean cosine of different users' routing vectors) has
pairs. Saves ``RUN/group/experts.safetensors`` (experts and routers, with the
fallback embedding for unseen users) and each training user's embedding to the
user store (``RUN/store/emb``). With ``group.unseen=instant`` it also fits the
instant encoder (:mod:`properlm.train.instant`), saved as
``RUN/group/instant.safetensors``, and gives the target users its embeddings.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import save_file

from properlm.errors import ProperError
from properlm.io import SUMS, atomic_dir, verify_dir, write_json
from properlm.model.proper import ProperModel
from properlm.model.user_params import UserParams
from properlm.run_config import RunConfig
from properlm.store.run import EMB, bank_dir
from properlm.store.user_store import UserStore
from properlm.train import distributed as D
from properlm.train.examples import Example, encode
from properlm.train.instant import (INSTANT_FILE, INSTANT_REPORT, InstantEncoder, instant_embeddings,
                                    train_encoder)
from properlm.train.loop import seed_everything
from properlm.train.multiuser import MultiUserSpec, run_multiuser

STAGE = "group"


def train_group(cfg: RunConfig, run_dir: Path, pm: ProperModel, tok, examples: list[Example], resume: bool = False,
                unseen: list[Example] | None = None, history: list[Example] | None = None) -> Path:
    """Add stage-2 experts and routers to ``pm``, train them on ``examples``, save them.

    Args:
        cfg: the run config (``cfg.group``).
        run_dir: the run directory.
        pm: a :class:`ProperModel` over the stage-1 merged model.
        tok: the tokenizer.
        examples: training users' pairs (their ids become the embedding table).
        resume: continue from this stage's last checkpoint.
        unseen: the target users' history pairs: with ``group.unseen=fit`` their
            embeddings are fitted on them once the stage has trained (:func:`fit_unseen`),
            with ``instant`` the instant encoder gives them (:func:`store_instant`).
        history: the training users' history pairs (without their queries), which the
            instant encoder reads (default: ``examples``).
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
    run_multiuser(spec, pm, examples, lambda e: encode(tok, e, cfg.data.max_len), tok.pad_token_id, run_dir,
                  cfg.seed, cfg.checkpoint_every, cfg.max_grad_norm, cfg.bf16, cfg.progress, resume,
                  shard=D.sharding(cfg.fsdp))
    for p in shared.values():
        p.requires_grad_(False)
    pm.set_fallback_embedding()
    encoder = None
    if isinstance(pm.user_embs, UserParams):
        if D.is_main():  # every rank holds every user's embedding: one writes them
            store_embeddings(pm, run_dir, users)
        D.barrier()
        if unseen and gc.unseen == "fit":
            fit_unseen(cfg, run_dir, pm, tok, unseen, resume=resume, stage=f"{STAGE}/fit")
        elif gc.unseen == "instant":
            encoder = train_encoder(pm, tok, history if history is not None else examples, cfg.data.max_len,
                                    cfg.bf16, cfg.seed)
            if unseen:  # every rank runs the forward passes (a sharded model needs them all); one writes
                store_instant(cfg, run_dir, pm, tok, encoder, unseen)
            D.barrier()
    if D.is_main():
        save_group(pm, run_dir / STAGE, encoder)
    D.barrier()
    return run_dir / STAGE


def store_instant(cfg: RunConfig, run_dir: Path, pm: ProperModel, tok, encoder: InstantEncoder,
                  examples: list[Example]) -> list[str]:
    """Give the users of ``examples`` (their history) the instant encoder's embedding, no gradient step, and
    write it to ``RUN/store/emb``; the users written."""
    embs = instant_embeddings(pm, tok, encoder, examples, cfg.data.max_len, cfg.bf16)
    if D.is_main():
        emb_bank(run_dir, pm).put_many({u: {"params": t} for u, t in embs.items()})
    return sorted(embs)


def fit_unseen(cfg: RunConfig, run_dir: Path, pm: ProperModel, tok, examples: list[Example], resume: bool = False,
               stage: str = "group/fit", on_step=None) -> list[str]:
    """Fit the stage-2 embedding of users who were not in stage 2, on their own history, and store it.

    Everything else is frozen (experts, routers, the other users' embeddings);
    each user's embedding starts at the fallback (the mean learned embedding) and
    follows their own language-model loss for ``group.unseen_epochs`` passes, so a
    user whose data looks like a group's moves to that group's embedding. Users
    train many per batch with the row-sparse per-user AdamW of the other stages,
    so fitting them together or one at a time gives the same embeddings.

    Returns:
        The users fitted (written to ``RUN/store/emb``).
    """
    gc = cfg.group
    users = sorted({e.user_id for e in examples})
    if not users or pm.emb_shapes == {}:
        return []
    lr = gc.unseen_lr if gc.unseen_lr is not None else (gc.user_lr if gc.user_lr is not None else gc.lr)
    seed_everything(cfg.seed)  # the fit's dropout draws do not depend on what ran before it in the process
    kept = pm.user_embs
    pm.user_embs = pm.new_emb_bank(users, seed=cfg.seed, start="fallback")
    spec = MultiUserSpec(stage, {}, lr, train_embs=True, train_loras=False, user_lr=lr, weight_decay=0.0,
                         constraint_weight=0.0, per_user_batch=gc.per_user_batch, users_per_step=gc.users_per_step,
                         epochs=gc.unseen_epochs, max_steps=gc.max_steps)
    try:
        run_multiuser(spec, pm, examples, lambda e: encode(tok, e, cfg.data.max_len), tok.pad_token_id, run_dir,
                      cfg.seed, cfg.checkpoint_every, cfg.max_grad_norm, cfg.bf16, cfg.progress, resume,
                      on_step=on_step, shard=D.sharding(cfg.fsdp))
        if D.is_main():
            store_embeddings(pm, run_dir, users)
        D.barrier()
    finally:
        pm.user_embs = kept
    return users


def emb_bank(run_dir: Path, pm: ProperModel) -> UserStore:
    """``RUN/store/emb``: each user's stage-2 embedding(s), one entry per user."""
    return UserStore(bank_dir(run_dir, EMB), schema={"params": pm.emb_shapes},
                     meta={"shared": pm.shared_embedding})


def store_embeddings(pm: ProperModel, run_dir: Path, users: list[str]) -> UserStore:
    """Write ``users``' learned embeddings from the model's in-memory bank to the store."""
    store = emb_bank(run_dir, pm)
    bank = pm.user_embs
    for s in range(0, len(users), 4096):  # one index update per shard and chunk
        store.put_many({u: {"params": bank.row_state(u, optimizer=False)["params"]} for u in users[s:s + 4096]})
    return store


def save_group(pm: ProperModel, out: Path, encoder: InstantEncoder | None = None) -> Path:
    """Write the experts and routers (``RUN/group/experts.safetensors``), and the instant encoder when
    given, as one directory, atomically."""
    with atomic_dir(out, checksums=True) as tmp:
        save_file(pm.stage_state(("experts", "router")), str(tmp / "experts.safetensors"))
        if encoder is not None:
            write_encoder(encoder, tmp)
    return out


def write_encoder(encoder: InstantEncoder, group_dir: Path) -> None:
    """The encoder and its report (JSON, for reading) into a stage-2 directory being written."""
    encoder.save(group_dir / INSTANT_FILE)
    write_json(group_dir / INSTANT_REPORT, encoder.report)


def add_encoder(run_dir: Path, encoder: InstantEncoder) -> Path:
    """Put ``encoder`` into a finished run's ``RUN/group`` (rewritten whole, atomically, with new checksums;
    the experts' bytes unchanged)."""
    group = Path(run_dir) / STAGE
    verify_dir(group)
    with atomic_dir(group, checksums=True) as tmp:
        for f in sorted(group.iterdir()):
            if f.is_file() and f.name not in (SUMS, INSTANT_FILE, INSTANT_REPORT):
                shutil.copyfile(f, tmp / f.name)
        write_encoder(encoder, tmp)
    return group


def load_encoder(run_dir: Path) -> InstantEncoder:
    """The run's instant encoder (``ProperError`` when it has none)."""
    path = Path(run_dir) / STAGE / INSTANT_FILE
    if not path.exists():
        raise ProperError(f"{run_dir}: no instant encoder ({STAGE}/{INSTANT_FILE}); fit one with "
                          f"properlm instant fit --run {run_dir}")
    return InstantEncoder.load(path)
