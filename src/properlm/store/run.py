"""A run directory on disk: its layout, its config and split, its user banks, and the model it holds.

Layout (``manifest.json`` says the same for each file)::

    config.yaml                      the resolved RunConfig (reproduces the run)
    split.json                       training users (stages 1-2) and target users (stage 3)
    population/adapter_model.safetensors, adapter_config.json   stage 1, PEFT layout
    group/experts.safetensors        stage 2 experts and routers (with the fallback embedding)
    user/router.safetensors          stage 3 shared LoRA-aware router
    store/emb/                       user bank: stage-2 embeddings (training users, fitted unseen users)
    store/lora/                      user bank: stage-3 LoRA per user (+ AdamW moments)
    store/oppu-kv/, store/oppu-mlp/  user banks: the OPPU baselines' LoRAs
    logs/<stage>.jsonl, logs/tb/     training logs (JSONL, TensorBoard)
    checkpoints/<stage>/             the last in-stage checkpoint, for --resume

A stage is done when its directory exists (each is written whole, atomically).
:func:`load_model` builds the model of a run up to a stage for inference or for
training the next stage; user banks are attached as on-demand caches
(:class:`~properlm.store.cache.UserCache`), so no user is read up front.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file

from properlm.config import load_config
from properlm.errors import CorruptFile, ProperError
from properlm.io import read_json, recover_dir, verify_dir, write_text
from properlm.model.base import load_base
from properlm.model.device import base_dtype, resolve_device
from properlm.model.population import merge_population
from properlm.model.proper import ProperModel
from properlm.run_config import RunConfig
from properlm.store.cache import UserCache
from properlm.store.user_store import UserStore, user_hash

STAGES = ("population", "group", "user")
#: The run's own user banks (baselines add theirs under store/ too).
LORA, EMB = "lora", "emb"
DEFAULT_CACHE_BYTES = 1 << 30


def bank_dir(run_dir: str | Path, bank: str) -> Path:
    """``RUN/store/<bank>``."""
    return Path(run_dir) / "store" / bank


def open_bank(run_dir: str | Path, bank: str) -> UserStore | None:
    """The bank ``RUN/store/<bank>``, or None when it does not exist."""
    d = bank_dir(run_dir, bank)
    return UserStore(d) if UserStore.exists(d) else None


def banks(run_dir: str | Path) -> dict[str, UserStore]:
    """Every user bank of the run, by name."""
    root = Path(run_dir) / "store"
    if not root.is_dir():
        return {}
    return {d.name: UserStore(d) for d in sorted(root.iterdir()) if UserStore.exists(d)}


def mark_deleted(run_dir: str | Path) -> None:
    """Record that users were deleted from the run's banks (``RUN/store/deleted``: a random stamp, no ids),
    so that a process holding users in memory (a server) can tell it must check them again."""
    root = Path(run_dir) / "store"
    if root.is_dir():
        write_text(root / "deleted", secrets.token_hex(8) + "\n")


def deleted_stamp(run_dir: str | Path) -> tuple[int, int] | None:
    """The identity of the last :func:`mark_deleted` (one ``stat``), or None when there was none."""
    try:
        st = os.stat(Path(run_dir) / "store" / "deleted")
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def pending_forgets(run_dir: str | Path, known: Iterable[str] = ()) -> list[str]:
    """Users whose ``users delete`` was interrupted (``RUN/forgetting/*.json``): it must be finished first.

    An intent is written atomically, so one that cannot be read was damaged afterwards: the user it
    names may be partly deleted, and nothing may be served or trained until that delete is finished.
    Its file name is the sha256 of the user's id: a user among ``known`` (the ids being deleted now)
    whose hash it is counts as pending; any other unreadable intent raises ``ProperError`` naming it.
    """
    d = Path(run_dir) / "forgetting"
    by_hash = {user_hash(u): u for u in known}
    out = []
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            user = read_json(p)["user"]
            if not isinstance(user, str):
                raise KeyError("user")
        except (ProperError, KeyError, TypeError):
            if p.stem not in by_hash:
                raise ProperError(f"{p}: a delete intent that cannot be read (damaged): the user whose id hashes "
                                  f"(sha256) to its name may be partly deleted; delete them again (properlm users "
                                  f"delete --run {run_dir} --users ID), which finishes it and removes this file"
                                  ) from None
            user = by_hash[p.stem]
        out.append(user)
    return out


def refuse_pending_forgets(run_dir: str | Path) -> None:
    """``ProperError`` when an interrupted delete must be finished before the run may change."""
    pending = pending_forgets(run_dir)
    if pending:
        raise ProperError(f"{run_dir}: a users delete of {len(pending)} user(s) was interrupted; finish it first: "
                          f"properlm users delete --run {run_dir} --resume")


def is_run(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "config.yaml").exists()


def read_config(run_dir: str | Path) -> RunConfig:
    """The run's saved config (``ProperError`` when ``run_dir`` is not a run)."""
    run_dir = Path(run_dir)
    if not is_run(run_dir):
        raise ProperError(f"{run_dir}: not a properlm run directory (no config.yaml)")
    return load_config(RunConfig, run_dir / "config.yaml")


def read_split(run_dir: str | Path) -> dict:
    """``split.json``: ``{"task", "train": [ids], "target": [ids]}``."""
    return read_json(Path(run_dir) / "split.json")


def stages_done(run_dir: str | Path) -> list[str]:
    """The finished stages, in order (an interrupted directory swap is repaired first)."""
    run_dir = Path(run_dir)
    for s in STAGES:
        recover_dir(run_dir / s)
    return [s for s in STAGES if (run_dir / s).exists()]


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise ProperError(f"{path}: missing (the stage that writes it is not finished)") from None
    except Exception as e:
        raise CorruptFile(path, f"not a safetensors file: {str(e).splitlines()[0]}") from None


def load_model(cfg: RunConfig, run_dir: str | Path, upto: str, device: torch.device | str | None = None,
               cache_bytes: int = DEFAULT_CACHE_BYTES):
    """Base + the stages before ``upto`` as saved in ``run_dir``: ``(lm or ProperModel, tok)``, in eval mode.

    ``upto="population"`` gives the bare base LM; ``"group"`` a ProperModel over
    the merged stage-1 model; ``"user"`` that plus the stage-2 experts and routers,
    with the stage-2 embeddings bank attached; ``"done"`` everything, with the
    stage-3 LoRA bank attached. Banks are on-demand caches of ``cache_bytes`` each.

    Args:
        cfg: the run's config.
        run_dir: the run directory.
        upto: ``population``, ``group``, ``user`` or ``done``.
        device: where the model goes (default: the config's ``device``).
        cache_bytes: byte budget of each user bank's cache.
    """
    run_dir = Path(run_dir)
    for stage in STAGES[:{"population": 0, "group": 1, "user": 2, "done": 3}.get(upto, 3)]:
        verify_dir(run_dir / stage)  # a stage file whose bytes changed is refused, never loaded
    dev = resolve_device(cfg.device) if device is None else torch.device(device)
    dtype = base_dtype(cfg.base_dtype, cfg.bf16, dev)
    lm, tok = load_base(cfg.base_model, seed=cfg.seed, attention=cfg.attention, dtype=dtype, device=dev)
    if upto == "population":
        return lm, tok
    pm = ProperModel(merge_population(lm, run_dir / "population"))
    if upto == "group":
        return pm.eval(), tok
    g = cfg.group
    router = "user-aware" if cfg.user.end_to_end else g.router
    pm.add_group(g.num_experts, g.r, g.alpha, g.dropout, router, g.user_dim, [], seed=cfg.seed,
                 user_embedding=g.user_embedding)
    pm.load_stage_state(_load_tensors(run_dir / "group" / "experts.safetensors"))
    emb = open_bank(run_dir, EMB)
    pm.user_embs = UserCache(emb, dev, cache_bytes) if emb is not None and router == "user-aware" else None
    if upto == "user":
        return pm.eval(), tok
    if upto != "done":
        raise ValueError(f"upto must be population, group, user or done, got {upto!r}")
    u = cfg.user
    pm.add_user_lora(u.r, u.alpha, u.lora_aware_router and not u.end_to_end)
    if (run_dir / "user" / "router.safetensors").exists():
        pm.load_stage_state(_load_tensors(run_dir / "user" / "router.safetensors"))
    lora = open_bank(run_dir, LORA)
    pm.user_loras = UserCache(lora, dev, cache_bytes) if lora is not None else None
    return pm.eval(), tok
