"""Changing a trained run's users: add or refresh user LoRAs, delete users.

    properlm users add --run runs/demo --users u101 u102 [--data new_logs.jsonl]
    properlm users delete --run runs/demo --users u007

Adding trains only the named users' LoRAs, against the frozen shared router and
frozen stages 1-2; every other user's adapter stays bit-for-bit as it was.
A user who already has a LoRA is refreshed: training continues from their
current adapter on their (new) history. Deleting removes a user's LoRA, their
stage-2 embedding and their cached PAG profile from the run directory, so
nothing of theirs is served again (what they contributed to the shared
population and group weights is not unlearned).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from properlm.config import load_config
from properlm.data import load_dataset
from properlm.data.tasks import get_task
from properlm.errors import ProperError
from properlm.io import atomic_dir, read_json, write_json
from properlm.train.config import RunConfig
from properlm.train.examples import user_examples
from properlm.train.run import build_model, load_data, read_split, write_manifest
from properlm.train.user import train_users


def _run_config(run_dir: Path) -> RunConfig:
    if not (run_dir / "user" / "user_loras.safetensors").exists():
        raise ProperError(f"{run_dir}: no trained stage 3 (user/user_loras.safetensors); train the run first")
    return load_config(RunConfig, run_dir / "config.yaml")


def add_users(run_dir: str | Path, user_ids: list[str], data: str | Path | None = None) -> list[str]:
    """Train (or refresh) the LoRAs of ``user_ids`` in a finished run; returns the ids trained.

    Args:
        run_dir: a run with all three stages.
        user_ids: users to add or refresh.
        data: where their histories are (any loadable dataset of the run's task);
            default: the run's own data.
    """
    run_dir = Path(run_dir)
    cfg = _run_config(run_dir)
    ds = load_data(cfg) if data is None else load_dataset(data, task=cfg.data.task)
    split = read_split(run_dir)
    if get_task(ds.task).name != get_task(split["task"]).name:
        raise ProperError(f"{data}: task {ds.task} differs from the run's task {split['task']}")
    by_id = {u.id: u for u in ds.users}
    missing = [u for u in user_ids if u not in by_id]
    if missing:
        raise ProperError(f"{data or cfg.data.path}: user {missing[0]} not found")
    examples = [e for uid in dict.fromkeys(user_ids) for e in user_examples(ds.task, by_id[uid], history=True)]
    if not examples:
        raise ProperError("the users to add have no history items to train on")
    pm, tok = build_model(cfg, run_dir, "done")
    train_users(cfg, run_dir, pm, tok, examples, train_router=False, stage="add-users")
    shutil.rmtree(run_dir / "checkpoints" / "add-users", ignore_errors=True)
    split["target"] = list(dict.fromkeys(split["target"] + list(user_ids)))
    write_json(run_dir / "split.json", split)
    write_manifest(run_dir, cfg)
    return list(dict.fromkeys(user_ids))


def _drop_rows(path: Path, user_ids: set[str]) -> int:
    """Rewrite a stacked per-user safetensors file without ``user_ids``; rows removed."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    ids = json.loads(meta["user_ids"])
    keep = [i for i, u in enumerate(ids) if u not in user_ids]
    if len(keep) == len(ids):
        return 0
    tensors = {k: v[keep].contiguous() for k, v in load_file(str(path)).items()}
    meta["user_ids"] = json.dumps([ids[i] for i in keep])
    with atomic_dir(path.parent) as tmp:  # the whole directory swaps at once
        for other in path.parent.iterdir():
            if other != path:
                shutil.copy2(other, tmp / other.name)
        save_file(tensors, str(tmp / path.name), metadata=meta)
    return len(ids) - len(keep)


def delete_users(run_dir: str | Path, user_ids: list[str]) -> dict[str, int]:
    """Remove users' LoRAs, stage-2 embeddings and cached profiles; counts of what was removed."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ProperError(f"{run_dir}: not a properlm run directory (no config.yaml)")
    ids = set(user_ids)
    removed = {}
    for name, path in (("user LoRAs", run_dir / "user" / "user_loras.safetensors"),
                       ("stage-2 embeddings", run_dir / "group" / "user_embeddings.safetensors"),
                       *((f"{p.parent.parent.name} LoRAs", p) for p in run_dir.glob("baselines/*/user/user_loras.safetensors"))):
        if path.exists():
            removed[name] = _drop_rows(path, ids)
    split_path = run_dir / "split.json"
    if split_path.exists():
        split = read_json(split_path)
        split["target"] = [u for u in split["target"] if u not in ids]
        write_json(split_path, split)
    profiles = run_dir / "baselines" / "pag" / "profiles.json"
    if profiles.exists():
        cached = read_json(profiles)
        if isinstance(cached, dict):
            kept = {k: v for k, v in cached.items() if k not in ids}
            removed["PAG profiles"] = len(cached) - len(kept)
            write_json(profiles, kept)
    return removed
