"""The paper's baselines on a run's own split and base model: OPPU-kv, OPPU-mlp and PAG's profiles.

    properlm evaluate --run runs/demo --methods oppu-kv oppu-mlp pag

* OPPU-kv / OPPU-mlp: one LoRA per target user on the merged stage-1 model, on
  attention k,v (OPPU itself used q,v) or on the FFN, trained on that user's
  history only. Users train many per batch through the same path as PROPER's
  stage 3 (``ProperModel(merged, targets)`` + ``add_users(lora_aware_router=False)``
  + :func:`~properlm.train.user.train_users`), with the run's ``user`` settings
  (rank, alpha, learning rate, steps), so OPPU and PROPER's stage 3 differ only
  in what lies under the user LoRA. Saved as::

      RUN/baselines/oppu-kv/user/user_loras.safetensors   LoRA per target user (ids in the metadata)
      RUN/baselines/oppu-kv/baseline.json                  targets, r, alpha, parameter counts, users
      RUN/baselines/oppu-kv/logs/oppu-kv.jsonl             training log (timings for the efficiency table)

* PAG: a profile of each target user written by the bare base LLM from OPPU's
  profile prompt (:func:`~properlm.evaluate.retrieval.profile_prompt`), cached in
  ``RUN/baselines/pag/profiles.json`` so it is written once per user.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import load_file

from properlm.data.schema import User
from properlm.data.tasks import get_task
from properlm.errors import ProperError
from properlm.evaluate.retrieval import profile_prompt
from properlm.io import read_json, write_json
from properlm.model.base import load_base
from properlm.model.generate import generate
from properlm.model.proper import ATTN_KV_TARGETS, FFN_TARGETS, ProperModel
from properlm.train.config import RunConfig
from properlm.train.examples import user_examples
from properlm.train.population import merge_population
from properlm.train.user import train_users

OPPU_TARGETS: dict[str, tuple[str, ...]] = {"oppu-kv": ATTN_KV_TARGETS, "oppu-mlp": FFN_TARGETS}
#: OPPU's sampling for profiles (gen_profile.py): temperature 0.6, top-p 0.9 (and top-k 10).
PROFILE_SAMPLING = {"temperature": 0.6, "top_p": 0.9}


def baseline_dir(run_dir: str | Path, name: str) -> Path:
    """``RUN/baselines/<name>``."""
    return Path(run_dir) / "baselines" / name


def _check_kind(kind: str) -> None:
    if kind not in OPPU_TARGETS:
        raise ProperError(f"unknown OPPU baseline {kind!r}: choose from {', '.join(OPPU_TARGETS)}")


def oppu_trained(run_dir: str | Path, kind: str) -> bool:
    """Whether ``RUN/baselines/<kind>`` holds trained user LoRAs."""
    return (baseline_dir(run_dir, kind) / "user" / "user_loras.safetensors").exists()


def _merged_model(cfg: RunConfig, run_dir: Path, targets: tuple[str, ...]) -> tuple[ProperModel, object]:
    if not (run_dir / "population").exists():
        raise ProperError(f"{run_dir}: the OPPU baselines sit on the merged stage-1 model; train stage population first")
    lm, tok = load_base(cfg.base_model, seed=cfg.seed, attention=cfg.attention)
    return ProperModel(merge_population(lm, run_dir / "population"), targets=targets), tok


def train_oppu(cfg: RunConfig, run_dir: str | Path, kind: str, task: str, targets: list[User],
               resume: bool = False) -> Path:
    """Train one LoRA per target user on the merged stage-1 model (OPPU-kv or OPPU-mlp).

    Args:
        cfg: the run's config; ``cfg.user`` gives rank, alpha, lr and schedule.
        run_dir: the run directory (stage 1 must be trained).
        kind: ``"oppu-kv"`` (attention k, v) or ``"oppu-mlp"`` (FFN gate, up, down).
        task: the run's task name.
        targets: the target users; each trains on their own history only.
        resume: continue from the baseline's last checkpoint.

    Returns:
        ``RUN/baselines/<kind>``.

    Raises:
        ProperError: unknown kind, stage 1 missing, or no target has history.
    """
    _check_kind(kind)
    run_dir = Path(run_dir)
    out = baseline_dir(run_dir, kind)
    pm, tok = _merged_model(cfg, run_dir, OPPU_TARGETS[kind])
    examples = [e for u in targets for e in user_examples(task, u, history=True, queries=False)]
    if not examples:
        raise ProperError(f"{kind}: the target users have no history to train on")
    # train_users saves into <its run_dir>/user: giving it the baseline dir keeps RUN/user untouched.
    train_users(cfg, out, pm, tok, examples, resume=resume, train_router=False, stage=kind)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    users = pm.user_loras.user_ids
    per_user = sum(v[0].numel() for v in pm.user_loras.params.values())
    write_json(out / "baseline.json", {"method": kind, "targets": list(OPPU_TARGETS[kind]), "r": cfg.user.r,
                                       "alpha": cfg.user.alpha, "users": users, "params_per_user": per_user})
    return out


def run_task(run_dir: str | Path) -> str:
    """The run's task name, from ``split.json``."""
    return read_json(Path(run_dir) / "split.json")["task"]


def load_oppu(cfg: RunConfig, run_dir: str | Path, kind: str) -> tuple[ProperModel, object]:
    """The merged stage-1 model with the trained OPPU user LoRAs: ``(ProperModel, tokenizer)``."""
    _check_kind(kind)
    run_dir = Path(run_dir)
    out = baseline_dir(run_dir, kind)
    if not oppu_trained(run_dir, kind):
        raise ProperError(f"{out}: baseline {kind} is not trained (properlm evaluate trains it when missing)")
    meta = read_json(out / "baseline.json")
    pm, tok = _merged_model(cfg, run_dir, tuple(meta["targets"]))
    pm.add_users(meta["users"], meta["r"], meta["alpha"], lora_aware_router=False, seed=cfg.seed)
    pm.user_loras.load_state_tensors("", load_file(str(out / "user" / "user_loras.safetensors")))
    pm.eval()
    return pm, tok


def user_profiles(cfg: RunConfig, run_dir: str | Path, users: list[User], sample: bool = False,
                  max_new_tokens: int = 200, batch_size: int = 16, progress: bool = True) -> dict[str, str]:
    """PAG's per-user profiles, written by the bare base LLM and cached in ``RUN/baselines/pag/profiles.json``.

    Only users missing from the cache are written; the cache is updated after
    every batch, so an interrupted run keeps what it wrote.

    Args:
        cfg: the run config (base model, seed, bf16).
        run_dir: the run directory.
        users: the users who need a profile.
        sample: OPPU's sampling (temperature 0.6, top-p 0.9) instead of greedy decoding.
        max_new_tokens: profile length limit (OPPU: 200 for test users).
        batch_size: profiles generated per forward pass.
        progress: show a progress bar.

    Returns:
        ``user id -> profile`` for ``users``.
    """
    from tqdm import tqdm

    path = baseline_dir(run_dir, "pag") / "profiles.json"
    cache: dict[str, str] = read_json(path) if path.exists() else {}
    todo = [u for u in users if u.id not in cache]
    if todo:
        task = get_task(run_task(run_dir))
        lm, tok = load_base(cfg.base_model, seed=cfg.seed, attention=cfg.attention)
        sampling = PROFILE_SAMPLING if sample else {}
        for s in tqdm(range(0, len(todo), batch_size), desc="pag profiles", disable=not progress, dynamic_ncols=True):
            chunk = todo[s:s + batch_size]
            prompts = [profile_prompt(task, u.id, u.history, seed=cfg.seed) for u in chunk]
            outs = generate(lm, tok, prompts, max_new_tokens=max_new_tokens, do_sample=sample,
                            batch_size=batch_size, bf16=cfg.bf16, seed=cfg.seed, max_prompt_tokens=1024, **sampling)
            cache.update({u.id: o for u, o in zip(chunk, outs)})
            write_json(path, cache)
    return {u.id: cache[u.id] for u in users}
