"""Adding and refreshing users of a trained run.

    properlm users add --run runs/demo --users u101 u102 [--data new_logs.jsonl]

Adding trains only the named users' LoRAs, against the frozen shared router and
frozen stages 1-2, and writes only their entries of the user store: every other
user's files stay byte for byte as they were, and the cost is one user's work
whatever the number of users in the run. A user who already has a LoRA is
refreshed: training continues from their stored adapter and AdamW moments on
their (new) history. With ``group.unseen=fit`` a user who has no stage-2
embedding gets one fitted on their history first (their group), as the
targets did in stage 2; with ``group.unseen=instant`` the run's instant encoder
gives it in one forward pass (:mod:`properlm.train.instant`), and from then on,
while their LoRA trains, they are answered by their group. :func:`add_instant`
gives new users only that embedding, in seconds, and no LoRA
(``properlm users add --instant``). (Deleting users is
:func:`properlm.forget.forget_users`.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path
from typing import Callable

from properlm.data import load_dataset
from properlm.data.tasks import get_task
from properlm.errors import ProperError
from properlm.io import read_json, write_json
from properlm.store.run import (EMB, LORA, load_model, open_bank, read_config, read_split, refuse_pending_forgets,
                                stages_done)
from properlm.train.examples import Example, user_examples
from properlm.train.group import add_encoder, fit_unseen, load_encoder, store_instant
from properlm.train.instant import InstantEncoder, train_encoder
from properlm.train.multiuser import Cancelled
from properlm.train.run import load_data
from properlm.train.user import train_users
from properlm.user_ids import check_user_id

ADD_STAGE = "add-users"


def add_stage(user_ids: list[str]) -> str:
    """Logs and checkpoints of one ``users add`` go to ``add-users/<hash of the ids>`` (no ids in names)."""
    return f"{ADD_STAGE}/{hashlib.sha256(chr(0).join(sorted(set(user_ids))).encode()).hexdigest()[:16]}"


def history_examples(run_dir: str | Path, user_ids: list[str], data: str | Path | None = None) -> list[Example]:
    """The users' history pairs, from ``data`` or the run's own data (``ProperError`` for a missing user)."""
    cfg = read_config(run_dir)
    ds = load_data(cfg) if data is None else load_dataset(data, task=cfg.data.task)
    task = read_split(run_dir)["task"]
    if get_task(ds.task).name != get_task(task).name:
        raise ProperError(f"{data}: task {ds.task} differs from the run's task {task}")
    by_id = {u.id: u for u in ds.users}
    missing = [u for u in user_ids if u not in by_id]
    if missing:
        raise ProperError(f"{data or cfg.data.path}: user {missing[0]} not found")
    if cfg.data.max_history is not None:
        for u in user_ids:
            by_id[u].history = by_id[u].history[-cfg.data.max_history:]
    return [e for uid in dict.fromkeys(user_ids) for e in user_examples(ds.task, by_id[uid], history=True)]


def add_users(run_dir: str | Path, user_ids: list[str], data: str | Path | None = None,
              examples: list[Example] | None = None, resume: bool = False,
              on_step: Callable[[int, int], bool] | None = None, progress: bool | None = None,
              on_group: Callable[[], None] | None = None,
              on_phase: Callable[[str], None] | None = None) -> list[str]:
    """Train (or refresh) the LoRAs of ``user_ids`` in a finished run; returns the ids trained.

    A new user's id must follow :func:`properlm.user_ids.check_user_id` (users already in the run
    are refreshed whatever their id).

    Args:
        run_dir: a run with all three stages.
        user_ids: users to add or refresh.
        data: where their histories are (any loadable dataset of the run's task);
            default: the run's own data.
        examples: their history pairs directly (instead of ``data``), e.g. from the server.
        resume: continue an interrupted add of the same users from its checkpoint.
        on_step: called before every step with ``(step, steps)`` (of the embedding fit,
            then of the LoRA training); when it returns true the add stops and nothing
            of it is written (:class:`properlm.train.multiuser.Cancelled`).
        progress: show progress bars (None: the run config's ``progress``). The server's jobs
            turn them off: a bar is named after the add, which is derived from the user's id.
        on_group: called once the new users' stage-2 embeddings are in the store (fitted or
            instant), before their LoRAs train: from then on they are answered by their group.
        on_phase: called with ``"embedding"`` before new users get their stage-2 embedding (the
            fit's steps follow) and ``"adapter"`` before the LoRAs train (their steps follow), so
            that a caller can tell whose ``on_step`` counts it sees.
    """
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    if progress is not None:
        cfg = dataclasses.replace(cfg, progress=progress)
    refuse_pending_forgets(run_dir)
    if "user" not in stages_done(run_dir):
        raise ProperError(f"{run_dir}: no trained stage 3 (user/); train the run first")
    user_ids = list(dict.fromkeys(user_ids))
    bank = open_bank(run_dir, LORA)
    for u in user_ids:
        if bank is None or u not in bank:
            check_user_id(u)  # a new user's id: one line naming the rule it breaks
    if examples is None:
        examples = history_examples(run_dir, user_ids, data)
    examples = [e for e in examples if e.user_id in set(user_ids)]
    if not examples:
        raise ProperError("the users to add have no history items to train on")
    pm, tok = load_model(cfg, run_dir, "done")
    stage = add_stage(user_ids)
    # Whose add this is: the logs and checkpoints are named from a hash of the ids, and deleting any
    # one of these users while they are left (a crash) must find them (properlm.forget).
    write_json(run_dir / "logs" / f"{stage}.users.json", {"users": user_ids})
    try:
        new = [u for u in user_ids if u not in pm.user_embs] if pm.user_embs is not None else []
        mine = [e for e in examples if e.user_id in set(new)]
        if on_phase is not None and new and cfg.group.unseen != "mean":
            on_phase("embedding")
        if new and cfg.group.unseen == "fit":
            # A user without a stage-2 embedding first gets one fitted on their history (their group),
            # against the final model with their LoRA absent (stage 2's routing); a refreshed user keeps theirs.
            fit_unseen(cfg, run_dir, pm, tok, mine, resume=resume, stage=f"{stage}/fit", on_step=on_step)
        elif new and cfg.group.unseen == "instant":
            # ... or the instant encoder's, in one forward pass: from here they are answered by their group.
            store_instant(cfg, run_dir, pm, tok, load_encoder(run_dir), mine)
        for u in new:
            pm.user_embs.evict(u)
        if on_group is not None and new and cfg.group.unseen != "mean":
            on_group()
        if on_phase is not None:
            on_phase("adapter")
        train_users(cfg, run_dir, pm, tok, examples, train_router=False, stage=stage, from_store=True, resume=resume,
                    on_step=on_step)
    except Cancelled:
        clean_add(run_dir, stage)
        raise
    clean_add(run_dir, stage)
    return user_ids


def add_instant(run_dir: str | Path, user_ids: list[str], data: str | Path | None = None,
                examples: list[Example] | None = None) -> tuple[list[str], list[str]]:
    """Give new users their stage-2 embedding from the run's instant encoder and nothing else: no gradient
    step, no LoRA (seconds). They are then answered by their group (``group``); a later :func:`add_users`
    trains their LoRA from it. Users who already have an embedding keep it.

    Returns:
        ``(users given an embedding, users who already had one)``.
    """
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    refuse_pending_forgets(run_dir)
    if "group" not in stages_done(run_dir):
        raise ProperError(f"{run_dir}: no trained stage 2 (group/); train the run first")
    user_ids = list(dict.fromkeys(user_ids))
    embs = open_bank(run_dir, EMB)
    kept = [u for u in user_ids if embs is not None and u in embs]
    new = [u for u in user_ids if u not in kept]
    for u in new:
        check_user_id(u)
    if not new:
        return [], kept
    encoder = load_encoder(run_dir)
    if examples is None:
        examples = history_examples(run_dir, new, data)
    examples = [e for e in examples if e.user_id in set(new)]
    if not examples:
        raise ProperError("the users to add have no history items")
    pm, tok = load_model(cfg, run_dir, "user")  # stage 2: the same routing as the final model without a LoRA
    return store_instant(cfg, run_dir, pm, tok, encoder, examples), kept


def fit_run_encoder(run_dir: str | Path) -> InstantEncoder:
    """Fit the instant encoder of a finished stage 2 on its training users' history and embeddings, and
    put it into ``RUN/group`` (whatever the run's ``group.unseen``)."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    refuse_pending_forgets(run_dir)
    if "group" not in stages_done(run_dir):
        raise ProperError(f"{run_dir}: no trained stage 2 (group/); train it first")
    pm, tok = load_model(cfg, run_dir, "user")
    if pm.user_embs is None:
        raise ProperError(f"{run_dir}: stage 2 has no user embeddings (a text router): nothing to predict")
    users = [u for u in read_split(run_dir)["train"] if u in pm.user_embs]
    encoder = train_encoder(pm, tok, history_examples(run_dir, users), cfg.data.max_len, cfg.bf16, cfg.seed)
    add_encoder(run_dir, encoder)
    return encoder


def clean_add(run_dir: str | Path, stage: str) -> int:
    """An add's logs and checkpoints are its own: removed when it ends (kept after a crash, to resume).
    How many of its files and directories there were."""
    run_dir = Path(run_dir)
    n = 0
    for d in (run_dir / "checkpoints" / stage, run_dir / "logs" / "tb" / stage, run_dir / "logs" / stage):
        n += d.exists()
        shutil.rmtree(d, ignore_errors=True)
    for f in (run_dir / "logs" / f"{stage}.jsonl", run_dir / "logs" / f"{stage}.users.json"):
        n += f.exists()
        f.unlink(missing_ok=True)
    return n


def adds_holding(run_dir: str | Path, user_ids: set[str]) -> list[str]:
    """The stages of adds left behind (crashed) whose users include one of ``user_ids``."""
    out = []
    for f in sorted((Path(run_dir) / "logs" / ADD_STAGE).glob("*.users.json")):
        try:
            users = set(read_json(f).get("users", []))
        except (OSError, ValueError, ProperError):
            users = None  # unreadable: it may hold anyone
        if users is None or users & user_ids:
            out.append(f"{ADD_STAGE}/{f.name[:-len('.users.json')]}")
    return out
