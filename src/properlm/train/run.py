"""The three stages in order, into a run directory.

    properlm train --all --config configs/demo.yaml --out runs/demo

The run directory's layout, and loading what it holds, are the store layer's
(:mod:`properlm.store.run`); this module trains the stages that fill it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from properlm.config import save_config
from properlm.data import generate, load_dataset, split_users
from properlm.data.schema import Dataset, User
from properlm.errors import ProperError
from properlm.io import write_json
from properlm.run_config import RunConfig
from properlm.train import distributed as D
from properlm.store.run import STAGES, load_model, read_split, refuse_pending_forgets, stages_done
from properlm.train.examples import Example, user_examples
from properlm.train.group import train_group
from properlm.train.population import train_population
from properlm.train.user import train_end_to_end, train_users

FILES = {
    "config.yaml": "the resolved run config",
    "split.json": "training users (stages 1-2) and target users (stage 3)",
    "population/adapter_model.safetensors": "stage 1 population LoRA (PEFT layout), merged into the base by later stages",
    "population/adapter_config.json": "stage 1 PEFT adapter config",
    "group/experts.safetensors": "stage 2 LoRA experts and routers per FFN linear (with the fallback embedding)",
    "group/instant.safetensors": "instant encoder: a user's stage-2 embedding from their history (group.unseen=instant)",
    "user/router.safetensors": "stage 3 shared LoRA-aware router",
    "store/emb": "user bank: stage-2 embedding per user (training users, fitted unseen users)",
    "store/lora": "user bank: stage-3 LoRA (and AdamW moments) per user",
}


def load_data(cfg: RunConfig, truncate: bool = True) -> Dataset:
    """The run's dataset: loaded from ``data.path`` or generated for ``synth:<task>``.

    With ``data.max_history`` (and ``truncate``) each user keeps only their latest
    N history items. The split is made before truncating, so "most active" means
    the users' real history lengths.
    """
    if cfg.data.path.startswith("synth:"):
        ds = generate(task=cfg.data.path.split(":", 1)[1], n_users=cfg.data.synth_users,
                      n_groups=cfg.data.synth_groups, seed=cfg.seed, n_queries=cfg.data.synth_queries)
    else:
        ds = load_dataset(cfg.data.path, task=cfg.data.task)
    if truncate and cfg.data.max_history is not None:
        for u in ds.users:
            u.history = u.history[-cfg.data.max_history:]
    return ds


def split(cfg: RunConfig, ds: Dataset) -> tuple[list[User], list[User]]:
    """(training users, target users) by the configured split (and ``data.max_train_users``)."""
    train_u, target_u = split_users(ds, mode=cfg.data.split, n=cfg.data.n_targets, seed=cfg.seed)
    n = cfg.data.max_train_users
    if n is not None and len(train_u) > n:
        keep = set(np.random.default_rng(cfg.seed).choice(len(train_u), size=n, replace=False).tolist())
        train_u = [u for i, u in enumerate(train_u) if i in keep]
    return train_u, target_u


def stage_examples(task: str, stage: str, train: list[User], targets: list[User]) -> list[Example]:
    """Stages 1-2: training users' history and labelled queries; stage 3: targets' history only."""
    if stage == "user":
        return [e for u in targets for e in user_examples(task, u, history=True, queries=False)]
    return [e for u in train for e in user_examples(task, u, history=True, queries=True)]


#: Settings that do not change what a run learns: they may differ when resuming.
RESUMABLE_KEYS = ("progress", "checkpoint_every", "device", "fsdp")


def config_differences(a: RunConfig, b: RunConfig) -> list[tuple[str, object, object]]:
    """``(dotted key, value in a, value in b)`` for every setting that differs, except :data:`RESUMABLE_KEYS`."""
    from properlm.config import to_dict

    def flat(d: dict, pre: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
        return out

    fa, fb = flat(to_dict(a)), flat(to_dict(b))
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb))
            if k not in RESUMABLE_KEYS and fa.get(k) != fb.get(k)]


def check_resume_config(cfg: RunConfig, run_dir: Path) -> None:
    """Refuse to resume with settings that change training (naming the keys); the saved config stays."""
    from properlm.store.run import read_config

    diff = config_differences(read_config(run_dir), cfg)
    if diff:
        raise ProperError(f"{run_dir}: --resume with settings that differ from the run's saved config: "
                          f"{_shown(diff)}; resume with the saved config (no --config, no overrides of these) or "
                          f"train into a new --out")


def _shown(diff: list[tuple[str, object, object]]) -> str:
    """The first differences of :func:`config_differences`, for an error message."""
    more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
    return ", ".join(f"{k} (saved {a!r}, given {b!r})" for k, a, b in diff[:6]) + more


def check_new_stage_config(cfg: RunConfig, run_dir: Path, stages) -> None:
    """Refuse to train ``stages`` into an existing run with settings that change what it already holds:
    only the sections of the stages trained now (``user.*`` for stage 3) may differ from the saved config."""
    from properlm.store.run import read_config

    own = tuple(f"{s}." for s in stages)
    diff = [d for d in config_differences(read_config(run_dir), cfg) if not d[0].startswith(own)]
    if diff:
        raise ProperError(f"{run_dir}: training stage {', '.join(stages)} with settings that differ from what the run "
                          f"was trained with: {_shown(diff)}; leave --config out (the run's own config is used) and "
                          f"override only {', '.join(k + '*' for k in own)}, or train into a new --out")


def write_manifest(run_dir: Path, cfg: RunConfig) -> None:
    files = {k: v for k, v in FILES.items() if (run_dir / k).exists()}
    write_json(run_dir / "manifest.json", {"properlm_run": 1, "base_model": cfg.base_model,
                                           "stages_done": stages_done(run_dir), "files": files,
                                           "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})


def train(cfg: RunConfig, run_dir: str | Path, stages: list[str] | tuple[str, ...] = STAGES, resume: bool = False) -> Path:
    """Train the given stages in order into ``run_dir``; returns the run directory.

    A stage whose output already exists is skipped when resuming and refused
    otherwise (a finished stage is never silently overwritten).
    """
    run_dir = Path(run_dir)
    stages_done(run_dir)  # repairs a stage directory swap an interruption left half done
    for s in stages:
        if s not in STAGES:
            raise ProperError(f"unknown stage {s!r}: choose from {', '.join(STAGES)}")
    if (run_dir / "config.yaml").exists() and not resume:
        done = [s for s in stages if (run_dir / s).exists()]
        if done:
            raise ProperError(f"{run_dir}: stage {done[0]} is already trained there; pass --resume to continue or choose a new --out")
    if resume and (run_dir / "config.yaml").exists():
        check_resume_config(cfg, run_dir)
    elif (run_dir / "config.yaml").exists() and (run_dir / "split.json").exists():  # a run with data of its own
        check_new_stage_config(cfg, run_dir, stages)
    refuse_pending_forgets(run_dir)
    main = D.is_main()  # several processes: rank 0 writes the run's own files
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        save_config(cfg, run_dir / "config.yaml")
    ds = load_data(cfg, truncate=False)
    D.barrier()
    if (run_dir / "split.json").exists():
        # The split is made once: resuming keeps it (and keeps forgotten users out of it).
        saved = read_split(run_dir)
        by_id = {u.id: u for u in ds.users}
        train_u = [by_id[i] for i in saved["train"] if i in by_id]
        target_u = [by_id[i] for i in saved["target"] if i in by_id]
    else:
        train_u, target_u = split(cfg, ds)
        if main:
            write_json(run_dir / "split.json", {"task": ds.task, "train": [u.id for u in train_u],
                                                "target": [u.id for u in target_u]})
    if cfg.data.max_history is not None:
        for u in ds.users:
            u.history = u.history[-cfg.data.max_history:]
    if main:
        write_manifest(run_dir, cfg)
    D.barrier()
    e2e = cfg.user.end_to_end
    for s in stages:
        if (run_dir / s).exists() or (e2e and s == "group"):  # end-to-end: stage 2 trains inside stage 3
            continue
        need = "population" if (e2e and s == "user") else (STAGES[STAGES.index(s) - 1] if s != "population" else None)
        if need is not None and not (run_dir / need).exists():
            raise ProperError(f"{run_dir}: stage {s} needs stage {need} first")
        model, tok = load_model(cfg, run_dir, "group" if (e2e and s == "user") else s, device=D.device())
        ex = stage_examples(ds.task, s, train_u, target_u)
        if not ex:
            raise ProperError(f"stage {s}: no training examples (check the data split)")
        fn = {"population": train_population, "group": train_group,
              "user": train_end_to_end if e2e else train_users}[s]
        extra = {}
        if s == "group":  # the targets (fitted or given instant embeddings) and the training users' history alone
            extra = {"unseen": stage_examples(ds.task, "user", train_u, target_u),
                     "history": stage_examples(ds.task, "user", [], train_u)}
        fn(cfg, run_dir, model, tok, ex, resume=resume, **extra)
        # Outputs are in place: the in-stage checkpoint is no longer needed.
        D.barrier()
        if main:
            shutil.rmtree(run_dir / "checkpoints" / s, ignore_errors=True)
            write_manifest(run_dir, cfg)
        D.barrier()
    return run_dir


__all__ = ["FILES", "STAGES", "load_data", "read_split", "split", "stage_examples", "train", "write_manifest"]
