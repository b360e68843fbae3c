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

Stage 3 trains in cohorts (:class:`Cohorts`): the users are split into working
sets that train one after another, each with its own schedule; only the
current cohort's rows and AdamW moments are in memory, and its examples are
encoded when it starts. The shared parameters (the LoRA-aware router) and their
optimizer carry on from one cohort to the next. Checkpoints hold the shared
state and the current cohort only; at a cohort's end its users are written to
the user store and a checkpoint marks the cohort done, so ``--resume`` picks up
at the right cohort and ends with the same adapters as an uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from properlm.errors import ProperError
from properlm.model.device import autocast
from properlm.model.precision import frozen_bf16
from properlm.model.proper import ProperModel, completion_nll
from properlm.model.user_params import UserParams
from properlm.train import distributed as D
from properlm.train.examples import Encoded, Example, collate
from properlm.train.loop import (Progress, RunLogger, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
                                 user_schedule)


@dataclass
class MultiUserSpec:
    """What one multi-user loop trains.

    Attributes:
        stage: name used for logs and checkpoints.
        shared: named shared parameters trained by torch AdamW (may be empty).
        shared_lr: their learning rate.
        train_embs: step the stage-2 user-embedding bank (rows' users as emb users).
        train_loras: step the stage-3 user-LoRA bank (rows' users as LoRA users).
        user_lr: learning rate of the LoRA bank (and of the embedding bank unless ``emb_lr``).
        weight_decay: AdamW weight decay of the banks.
        constraint_weight: weight of the cross-user routing cosine loss.
        per_user_batch, users_per_step, epochs, max_steps: the schedule (``max_steps`` per cohort).
        constraint_warmup: share of the steps over which that weight ramps up
            linearly from 0 (0: the full weight from the first step).
        emb_lr: learning rate of the embedding bank (None: ``user_lr``).
        bind_embs: when the embeddings are not trained, still bind the rows' users'
            stage-2 embeddings where the model has them (stage 3's router reads them).
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
    emb_lr: float | None = None
    bind_embs: bool = False


@dataclass
class Cohorts:
    """Users trained as working sets, one after another.

    Attributes:
        users: each cohort's users, in training order.
        begin: called with a cohort's users before its first step; puts their bank(s)
            on the model (fresh rows, or their stored state when refreshing).
        end: called with a cohort's users after its last step; writes them to the store.
        from_store: ``begin`` starts users from their stored state (``users add``
            refreshing them): the trained cohort is then checkpointed before ``end``
            writes it, so a crash while writing never trains a user twice.
    """

    users: list[list[str]]
    begin: Callable[[list[str]], None]
    end: Callable[[list[str]], None]
    from_store: bool = False


class Cancelled(Exception):
    """Raised between steps when a loop's ``on_step`` says so; the cohort in training is not written."""


def constraint_loss(routes: torch.Tensor, users: list[str]) -> torch.Tensor:
    """Mean cosine similarity of routing vectors (B, K) over pairs of rows of different users."""
    idx = {u: i for i, u in enumerate(dict.fromkeys(users))}
    uid = torch.tensor([idx[u] for u in users], device=routes.device)
    diff = torch.triu(uid.unsqueeze(0) != uid.unsqueeze(1), diagonal=1)  # (B, B) pairs i<j, users differ
    if not diff.any():
        return routes.new_zeros(())
    r = F.normalize(routes, dim=-1)
    return (r @ r.T)[diff].mean()


def constraint_surrogate(local: torch.Tensor, local_users: list[str], routes: torch.Tensor,
                         users: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Several ranks: a loss whose gradient on this rank's rows is the constraint loss's, and the loss's value.

    ``local`` (b, K) are this rank's routing vectors, ``routes`` (B, K) every rank's (detached),
    ``users`` their users. For a local row i the surrogate is ``sum_j cos(r_i, sg(r_j)) / P``
    over the rows j of other users (P: the number of cross-user pairs), so the gradients
    summed over ranks are exactly those of :func:`constraint_loss` on the whole batch.
    """
    value = constraint_loss(routes, users)
    uid = {u: i for i, u in enumerate(dict.fromkeys(users))}
    g = torch.tensor([uid[u] for u in users], device=routes.device)
    gl = torch.tensor([uid[u] for u in local_users], device=routes.device)
    pairs = int(torch.triu(g.unsqueeze(0) != g.unsqueeze(1), diagonal=1).sum())
    if pairs == 0 or local.shape[0] == 0:
        return local.sum() * 0.0, value
    cos = F.normalize(local, dim=-1) @ F.normalize(routes, dim=-1).T           # (b, B)
    return (cos * (gl.unsqueeze(1) != g.unsqueeze(0))).sum() / pairs, value


def constraint_ramp(step: int, n_steps: int, warmup: float) -> float:
    """Factor on the constraint weight at 0-based ``step``: linear from 0 to 1 over ``warmup * n_steps`` steps."""
    ramp = warmup * n_steps
    return 1.0 if ramp <= 0 else min(1.0, step / ramp)


def _bank_tensors(pm: ProperModel, spec: MultiUserSpec) -> dict[str, torch.Tensor]:
    out = {}
    if isinstance(pm.user_embs, UserParams) and spec.train_embs:
        out.update(pm.user_embs.state_tensors("emb.", optimizer=True))
    if isinstance(pm.user_loras, UserParams) and spec.train_loras:
        out.update(pm.user_loras.state_tensors("lora.", optimizer=True))
    return out


def _load_bank_tensors(pm: ProperModel, spec: MultiUserSpec, tensors: dict[str, torch.Tensor]) -> None:
    if isinstance(pm.user_embs, UserParams) and spec.train_embs:
        pm.user_embs.load_state_tensors("emb.", tensors)
    if isinstance(pm.user_loras, UserParams) and spec.train_loras:
        pm.user_loras.load_state_tensors("lora.", tensors)


def run_multiuser(spec: MultiUserSpec, pm: ProperModel, examples: list[Example], encode: Callable[[Example], Encoded],
                  pad_id: int, run_dir: Path, seed: int, checkpoint_every: int, max_grad_norm: float, bf16: bool,
                  progress: bool, resume: bool, cohorts: Cohorts | None = None,
                  on_step: Callable[[int, int], bool] | None = None, shard: bool = False) -> None:
    """Train ``spec``'s parameters on ``examples`` with many users per step (see module doc).

    Args:
        spec: what trains.
        pm: the model; its banks hold the users being trained (``cohorts.begin`` sets them).
        examples: every user's examples (encoded a cohort at a time with ``encode``).
        encode: example -> token ids and labels.
        pad_id: the tokenizer's pad id.
        run_dir: where ``logs/`` and ``checkpoints/<stage>`` go.
        seed, checkpoint_every, max_grad_norm, bf16, progress, resume: as in the run config.
        cohorts: train the users in cohorts (None: all users at once, banks already set).
        on_step: called before every step with ``(step, steps)`` (progress); returning true
            cancels: :class:`Cancelled` is raised and the cohort in training is not written.
        shard: several processes: shard the base's frozen layers over them (FSDP2,
            :func:`properlm.train.distributed.shard_layers`).
    """
    by_user: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_user.setdefault(e.user_id, []).append(i)
    groups = cohorts.users if cohorts is not None else [sorted(by_user)]
    plan: list[tuple[int, list[tuple[str, list[int]]]]] = []   # (cohort, step)
    last_of: dict[int, int] = {}                               # cohort -> its last step
    for ci, users in enumerate(groups):
        steps = user_schedule({u: by_user[u] for u in users}, spec.per_user_batch, spec.users_per_step,
                              spec.epochs, seed)
        if spec.max_steps is not None:
            steps = steps[:spec.max_steps]
        plan += [(ci, st) for st in steps]
        if steps:
            last_of[ci] = len(plan) - 1
    # Several processes: the step is the same on every rank; each rank computes the rows of the users it owns.
    W, R = D.world(), D.rank()
    sharded = shard and W > 1
    if sharded:
        D.shard_layers(pm.lm)
    own = {u: k % W for k, u in enumerate(sorted(by_user))}
    mine = lambda users: [u for u in users if own[u] == R]  # noqa: E731
    params = list(spec.shared.values())
    opt = torch.optim.AdamW(params, lr=spec.shared_lr, weight_decay=0.0) if params else None
    ckpt_root, start = run_dir / "checkpoints" / spec.stage, 0
    logger = RunLogger(run_dir, spec.stage) if R == 0 else None
    device = pm.device
    enc: dict[int, Encoded] = {}
    has_emb: dict[str, bool] = {}
    current: int | None = None
    synced_embs = spec.train_embs and W > 1   # stage 2's embeddings: every rank holds every user's row
    bank_prefix = "" if W == 1 or synced_embs else f"r{R}."

    def save(step: int, phase: str, with_bank: bool) -> None:
        tensors = {n: p for n, p in spec.shared.items()}
        if with_bank:
            own_state = {f"{bank_prefix}{k}": v.detach().cpu() for k, v in _bank_tensors(pm, spec).items()}
            if W > 1 and not synced_embs:
                for part in D.all_gather_objects(own_state):  # every rank's cohort rows, written by rank 0
                    tensors.update(part)
            else:
                tensors.update(own_state)
        holds = [] if not with_bank else (groups[current] if current is not None else [])
        if with_bank and spec.train_embs and isinstance(pm.user_embs, UserParams):
            holds = list(dict.fromkeys([*holds, *pm.user_embs.user_ids]))
        if R == 0:
            save_checkpoint(ckpt_root, step, tensors, {"optimizer": opt.state_dict() if opt else None,
                                                       "rng": rng_state(), "cohort": current, "phase": phase,
                                                       "world": W}, users=holds)
        D.barrier()

    def enter(ci: int, tensors: dict[str, torch.Tensor] | None = None) -> None:
        nonlocal enc, has_emb, current
        if cohorts is not None:
            cohorts.begin(mine(groups[ci]))
        if tensors is not None:
            part = {k[len(bank_prefix):]: v for k, v in tensors.items() if k.startswith(bank_prefix)}
            _load_bank_tensors(pm, spec, part)
        enc = {i: encode(examples[i]) for u in mine(groups[ci]) for i in by_user[u]}
        embs = pm.user_embs
        has_emb = {u: embs is not None and u in embs for u in mine(groups[ci])} if spec.bind_embs else {}
        current = ci

    def finish(ci: int, step: int) -> None:
        """A cohort's last step is done: write its users (checkpointed first when refreshing)."""
        if cohorts is None:
            return
        if cohorts.from_store:
            save(step, "trained", with_bank=True)
        cohorts.end(mine(groups[ci]))
        D.barrier()
        if step < len(plan):
            save(step, "written", with_bank=False)

    if resume and (ck := load_checkpoint(ckpt_root)) is not None:
        start, tensors, extra = ck
        if extra.get("world", 1) != W:
            raise ProperError(f"{ckpt_root}: the checkpoint was written by {extra.get('world', 1)} process(es); "
                              f"resume with the same number (now {W})")
        with torch.no_grad():
            for n, p in spec.shared.items():
                p.copy_(tensors[n].to(p.device))
        if opt is not None:
            opt.load_state_dict(extra["optimizer"])
        set_rng_state(extra["rng"])
        if logger is not None:
            logger.truncate_after(start)
        phase, ci = extra.get("phase", "train"), extra.get("cohort")
        ci = 0 if ci is None else ci
        if phase == "trained":        # trained but perhaps not (wholly) written: write it again
            enter(ci, tensors)
            finish(ci, start)
            current = None
        elif phase == "train":
            enter(ci, tensors)
    record = spec.constraint_weight > 0
    prog = Progress(len(plan), spec.stage, start, progress and R == 0)
    emb_lr = spec.emb_lr if spec.emb_lr is not None else spec.user_lr
    pm.train()
    with frozen_bf16(pm.lm, bf16):  # the same numbers as autocast's per-call casts, without them
        for step in range(start, len(plan)):
            if on_step is not None and on_step(step, len(plan)):
                prog.close()
                if logger is not None:
                    logger.close()
                raise Cancelled(f"{spec.stage}: cancelled at step {step}")
            ci, step_rows = plan[step]
            if ci != current:
                enter(ci)
            all_users = list(dict.fromkeys(u for u, _ in step_rows))
            rows = [(u, i) for u, idxs in step_rows if own[u] == R for i in idxs]
            users = [u for u, _ in rows]
            n_users = len(all_users)
            per_user: dict[str, tuple] = {}
            cons = torch.zeros((), device=device)
            cw = spec.constraint_weight * constraint_ramp(step, len(plan), spec.constraint_warmup)
            bound, ntokens, idle = None, 0, None
            if rows:
                b = collate([enc[i] for _, i in rows], pad_id, device)
                ntokens = int(b["attention_mask"].sum())
                if spec.train_embs:
                    emb_users = users
                elif spec.bind_embs:
                    emb_users = [u if has_emb.get(u) else None for u in users]
                else:
                    emb_users = None
                bound = pm.bind(emb_users=emb_users, lora_users=users if spec.train_loras else None,
                                requires_grad=True, token_mask=b["attention_mask"], record=record)
                if not spec.train_embs:
                    bound.emb_leaves = None  # read, not trained
                with autocast(bf16, device):
                    nll, ntok = completion_nll(pm.lm, b["input_ids"], b["attention_mask"], b["labels"])
                for r, u in enumerate(users):
                    s_, n_ = per_user.get(u, (0.0, 0))
                    per_user[u] = (s_ + nll[r], n_ + int(ntok[r]))
            elif sharded:  # the other ranks' passes gather the layers: take part (zero gradients)
                pm.bind(record=False)
                with autocast(bf16, device):
                    idle = D.idle_loss(pm.lm, pad_id, device)
            losses = [s_ / max(n_, 1) for s_, n_ in per_user.values()]
            total = torch.stack(losses).sum() if losses else torch.zeros((), device=device)
            if record and W == 1:
                cons = constraint_loss(pm.routing_vectors(), users)
                term = cons
            elif record:
                local = pm.routing_vectors() if rows else torch.zeros((0, 1), device=device)
                parts = D.all_gather_objects((local.detach().cpu(), users))
                routes = torch.cat([t for t, _ in parts if t.shape[0]]).to(device)
                term, cons = constraint_surrogate(local, users, routes, [u for _, us in parts for u in us])
            else:
                term = None
            # The constraint is a shared-parameter term: scaled by P here so that after
            # the 1/P rescale of shared grads it carries its configured weight.
            loss = total + (cw * term * n_users if term is not None else 0.0)
            if rows:
                loss.backward()
            elif idle is not None:
                idle.backward()
            if opt is not None:
                if W > 1:
                    for p in params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                    D.all_reduce_sum([p.grad for p in params])
                for p in params:
                    if p.grad is not None:
                        p.grad.div_(n_users)
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
            if bound is not None:
                for bank, present, leaves, lr in ((pm.user_embs, bound.emb_users, bound.emb_leaves, emb_lr),
                                                  (pm.user_loras, bound.lora_users, bound.lora_leaves, spec.user_lr)):
                    if leaves is not None:
                        bank.clip_grad_norm(leaves, max_grad_norm)
                        bank.adamw_step(bank.rows(present), leaves, lr, weight_decay=spec.weight_decay)
            if synced_embs:  # every rank takes the rows its peers stepped
                mine_rows = {u: pm.user_embs.row_state(u) for u in per_user}
                for r_, part in enumerate(D.all_gather_objects(mine_rows)):
                    if r_ != R:
                        for u, st in part.items():
                            pm.user_embs.set_row_state(u, st)
            summed = torch.tensor([float(sum(x.item() for x in losses)), float(ntokens)], device="cpu")
            if W > 1:
                D.all_reduce_sum([summed])
            lm_loss = float(summed[0]) / n_users
            tps = prog.update(lm_loss, int(summed[1]))
            if logger is not None:
                logger.log(step + 1, loss=lm_loss, constraint=float(cons.detach()), users=n_users, tokens_per_s=tps)
            if step == last_of[ci]:
                finish(ci, step + 1)
            elif (step + 1) % checkpoint_every == 0 and step + 1 < len(plan):
                save(step + 1, "train", with_bank=True)
    pm.state.clear()
    pm.eval()
    prog.close()
    if logger is not None:
        logger.close()
