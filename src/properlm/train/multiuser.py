"""The many-users-per-batch training loop behind stages 2 and 3.

Each step holds a few examples of several users. The loss is the mean, over
the users in the step, of each user's mean completion-token NLL, so

- a user's own parameters (their LoRA, their embedding) get exactly the
  gradient of their own mean loss, the same as when trained alone;
- shared parameters (experts, routers) see the average over users.

The gradient is taken of ``sum_u loss_u`` (exact per-user gradients) and the
shared parameters' gradients are divided by the number of users afterwards.
User-owned rows are updated by :class:`~properlm.model.user_params.UserParams`'
row-sparse AdamW, so users absent from a step are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from properlm.model.proper import ProperModel, completion_nll
from properlm.train.examples import Encoded, collate
from properlm.train.loop import (Progress, RunLogger, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
                                 user_schedule)
from properlm.train.precision import autocast, frozen_bf16


@dataclass
class MultiUserSpec:
    """What one multi-user loop trains.

    Attributes:
        stage: name used for logs and checkpoints.
        shared: named shared parameters trained by torch AdamW (may be empty).
        shared_lr: their learning rate.
        train_embs: step the stage-2 user-embedding bank (rows' users as emb users).
        train_loras: step the stage-3 user-LoRA bank (rows' users as LoRA users).
        user_lr: learning rate of the banks.
        weight_decay: AdamW weight decay of the banks.
        constraint_weight: weight of the cross-user routing cosine loss.
        constraint_warmup: share of the steps over which that weight ramps up
            linearly from 0 (0: the full weight from the first step).
        per_user_batch, users_per_step, epochs, max_steps: the schedule.
    """

    stage: str
    shared: dict[str, torch.nn.Parameter]
    shared_lr: float
    train_embs: bool
    train_loras: bool
    user_lr: float
    weight_decay: float
    constraint_weight: float
    per_user_batch: int
    users_per_step: int
    epochs: int
    max_steps: int | None
    constraint_warmup: float = 0.0


def constraint_loss(routes: torch.Tensor, users: list[str]) -> torch.Tensor:
    """Mean cosine similarity of routing vectors (B, K) over pairs of rows of different users."""
    idx = {u: i for i, u in enumerate(dict.fromkeys(users))}
    uid = torch.tensor([idx[u] for u in users])
    diff = torch.triu(uid.unsqueeze(0) != uid.unsqueeze(1), diagonal=1)  # (B, B) pairs i<j, users differ
    if not diff.any():
        return routes.new_zeros(())
    r = F.normalize(routes, dim=-1)
    return (r @ r.T)[diff].mean()


def constraint_ramp(step: int, n_steps: int, warmup: float) -> float:
    """Factor on the constraint weight at 0-based ``step``: linear from 0 to 1 over ``warmup * n_steps`` steps."""
    ramp = warmup * n_steps
    return 1.0 if ramp <= 0 else min(1.0, step / ramp)


def run_multiuser(spec: MultiUserSpec, pm: ProperModel, enc: list[Encoded], pad_id: int, run_dir: Path,
                  seed: int, checkpoint_every: int, max_grad_norm: float, bf16: bool, progress: bool,
                  resume: bool) -> None:
    """Train ``spec``'s parameters on ``enc`` with many users per step (see module doc)."""
    by_user: dict[str, list[int]] = {}
    for i, e in enumerate(enc):
        by_user.setdefault(e.user_id, []).append(i)
    steps = user_schedule(by_user, spec.per_user_batch, spec.users_per_step, spec.epochs, seed)
    if spec.max_steps is not None:
        steps = steps[:spec.max_steps]
    names, params = list(spec.shared), list(spec.shared.values())
    opt = torch.optim.AdamW(params, lr=spec.shared_lr, weight_decay=0.0) if params else None
    ckpt_root, start = run_dir / "checkpoints" / spec.stage, 0
    logger = RunLogger(run_dir, spec.stage)
    if resume and (ck := load_checkpoint(ckpt_root)) is not None:
        start, tensors, extra = ck
        with torch.no_grad():
            for n, p in spec.shared.items():
                p.copy_(tensors[n])
        if opt is not None:
            opt.load_state_dict(extra["optimizer"])
        if pm.user_embs is not None and spec.train_embs:
            pm.user_embs.load_state_tensors("emb.", tensors)
        if pm.user_loras is not None and spec.train_loras:
            pm.user_loras.load_state_tensors("lora.", tensors)
        set_rng_state(extra["rng"])
        logger.truncate_after(start)
    record = spec.constraint_weight > 0
    prog = Progress(len(steps), spec.stage, start, progress)
    pm.train()
    with frozen_bf16(pm.lm, bf16):  # the same numbers as autocast's per-call casts, without them
        for step in range(start, len(steps)):
            rows = [(u, i) for u, idxs in steps[step] for i in idxs]
            users = [u for u, _ in rows]
            b = collate([enc[i] for _, i in rows], pad_id)
            bound = pm.bind(emb_users=users if spec.train_embs else None, lora_users=users if spec.train_loras else None,
                            requires_grad=True, token_mask=b["attention_mask"], record=record)
            with autocast(bf16):
                nll, ntok = completion_nll(pm.lm, b["input_ids"], b["attention_mask"], b["labels"])
            per_user = {}
            for r, u in enumerate(users):
                s, n = per_user.get(u, (0.0, 0))
                per_user[u] = (s + nll[r], n + int(ntok[r]))
            user_losses = torch.stack([s / max(n, 1) for s, n in per_user.values()])  # (P,)
            total = user_losses.sum()
            cons = constraint_loss(pm.routing_vectors(), users) if record else torch.zeros(())
            # The constraint is a shared-parameter term: scaled by P here so that after
            # the 1/P rescale of shared grads it carries its configured weight.
            cw = spec.constraint_weight * constraint_ramp(step, len(steps), spec.constraint_warmup)
            (total + cw * cons * len(per_user)).backward()
            n_users = len(per_user)
            if opt is not None:
                for p in params:
                    if p.grad is not None:
                        p.grad.div_(n_users)
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
            for bank, rws, leaves in ((pm.user_embs, bound.emb_rows, bound.emb_leaves),
                                      (pm.user_loras, bound.lora_rows, bound.lora_leaves)):
                if leaves is not None:
                    bank.clip_grad_norm(leaves, max_grad_norm)
                    bank.adamw_step(rws, leaves, spec.user_lr, weight_decay=spec.weight_decay)
            lm_loss = user_losses.mean().item()
            tps = prog.update(lm_loss, int(b["attention_mask"].sum()))
            logger.log(step + 1, loss=lm_loss, constraint=cons.item(), users=n_users, tokens_per_s=tps)
            if (step + 1) % checkpoint_every == 0 and step + 1 < len(steps):
                tensors = {n: p for n, p in spec.shared.items()}
                if pm.user_embs is not None and spec.train_embs:
                    tensors.update(pm.user_embs.state_tensors("emb.", optimizer=True))
                if pm.user_loras is not None and spec.train_loras:
                    tensors.update(pm.user_loras.state_tensors("lora.", optimizer=True))
                save_checkpoint(ckpt_root, step + 1, tensors,
                                {"optimizer": opt.state_dict() if opt else None, "rng": rng_state()})
    pm.state.clear()
    pm.eval()
    prog.close()
    logger.close()
