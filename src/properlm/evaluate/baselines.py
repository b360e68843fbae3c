"""The paper's baselines on a run's own split and base model: OPPU-kv, OPPU-mlp and PAG's profiles.

    properlm evaluate --run runs/demo --methods oppu-kv oppu-mlp pag

* OPPU-kv / OPPU-mlp: one LoRA per target user on the merged stage-1 model, on
  attention k,v (OPPU itself used q,v) or on the FFN, trained on that user's
  history only. Users train many per batch through the same path as PROPER's
  stage 3 (``ProperModel(merged, targets)`` + ``add_users(lora_aware_router=False)``
  + :func:`~properlm.train.user.train_users`), with the run's ``user`` settings
  (alpha / rank, learning rate, steps), so OPPU and PROPER's stage 3 differ only
  in what lies under the user LoRA. As in the paper, the methods are compared at
  equal per-user sizes: OPPU-mlp adapts the same FFN linears as PROPER's user
  LoRA at the same rank; OPPU-kv's k and v are much narrower (grouped KV heads:
  on SmolLM2-135M a rank-r LoRA on k, v has a quarter of the parameters of one on
  the FFN), so its rank is raised to the nearest rank with as many parameters per
  user as PROPER's (:func:`oppu_rank`; 16 for PROPER's 4 there), at the same
  ``alpha / r``. ``baseline.json`` records the rank and both sizes. Saved as::

      RUN/store/oppu-kv/                                   user bank: LoRA per target user (the user store)
      RUN/baselines/oppu-kv/baseline.json                  targets, r, alpha, parameter counts (no user ids)
      RUN/baselines/oppu-kv/logs/oppu-kv.jsonl             training log (timings for the efficiency table)

* PAG: a profile of each target user written by the bare base LLM from OPPU's
  profile prompt (:func:`~properlm.evaluate.retrieval.profile_prompt`), cached in
  ``RUN/baselines/pag/profiles.json`` so it is written once per user.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from properlm.data.schema import User
from properlm.data.tasks import get_task
from properlm.errors import ProperError
from properlm.evaluate.retrieval import profile_prompt
from properlm.io import read_json, write_json
from properlm.model.generate import generate
from properlm.model.proper import ATTN_KV_TARGETS, FFN_TARGETS, ProperModel
from properlm.run_config import RunConfig
from properlm.store.cache import UserCache
from properlm.store.run import DEFAULT_CACHE_BYTES, load_model, open_bank
from properlm.train.examples import user_examples
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
    """Whether the baseline is trained (``baseline.json`` is written last)."""
    return (baseline_dir(run_dir, kind) / "baseline.json").exists() and open_bank(run_dir, kind) is not None


def _width(lm, targets: tuple[str, ...]) -> int:
    """The parameters of a rank-1 LoRA on ``targets`` in every decoder layer: the sum of in + out features."""
    total = 0
    for layer in lm.get_decoder().layers:
        for t in targets:
            m = layer.get_submodule(t)
            m = getattr(m, "base", m)  # a linear properlm has wrapped
            total += m.in_features + m.out_features
    return total


def oppu_rank(kind: str, lm, r: int) -> int:
    """OPPU's per-user rank: the rank on ``kind``'s linears whose size is nearest to PROPER's user LoRA
    (rank ``r`` on the FFN), never below ``r``."""
    _check_kind(kind)
    return max(r, round(r * _width(lm, FFN_TARGETS) / _width(lm, OPPU_TARGETS[kind])))


def _merged_model(cfg: RunConfig, run_dir: Path, targets: tuple[str, ...]) -> tuple[ProperModel, object]:
    if not (run_dir / "population").exists():
        raise ProperError(f"{run_dir}: the OPPU baselines sit on the merged stage-1 model; train stage population first")
    from properlm.model.population import merge_population

    lm, tok = load_model(cfg, run_dir, "population")
    return ProperModel(merge_population(lm, run_dir / "population"), targets=targets), tok


def train_oppu(cfg: RunConfig, run_dir: str | Path, kind: str, task: str, targets: list[User],
               resume: bool = False) -> Path:
    """Train one LoRA per target user on the merged stage-1 model (OPPU-kv or OPPU-mlp).

    Args:
        cfg: the run's config; ``cfg.user`` gives alpha / rank, lr and schedule; the rank is
            :func:`oppu_rank`'s (PROPER's per-user size).
        run_dir: the run directory (stage 1 must be trained).
        kind: ``"oppu-kv"`` (attention k, v) or ``"oppu-mlp"`` (FFN gate, up, down).
        task: the run's task name.
        targets: the target users; each trains on their own history only.
        resume: continue from the baseline's last checkpoint (``properlm evaluate`` and the grid
            do: an evaluation stopped while it trained a baseline goes on where it stopped).

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
    r = oppu_rank(kind, pm.lm, cfg.user.r)
    ucfg = dataclasses.replace(cfg.user, r=r, alpha=cfg.user.alpha * r / cfg.user.r)  # the same alpha / r
    # Its LoRAs go to the bank RUN/store/<kind>; logs and checkpoints under RUN/baselines/<kind>.
    train_users(dataclasses.replace(cfg, user=ucfg), run_dir, pm, tok, examples, resume=resume, train_router=False,
                stage=kind, bank=kind, work_dir=out)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    per_user = sum(_numel(s) for s in pm.lora_shapes.values())
    write_json(out / "baseline.json", {"method": kind, "targets": list(OPPU_TARGETS[kind]), "r": r,
                                       "alpha": ucfg.alpha, "params_per_user": per_user,
                                       "proper_params_per_user": cfg.user.r * _width(pm.lm, FFN_TARGETS)})
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def run_task(run_dir: str | Path) -> str:
    """The run's task name, from ``split.json``."""
    return read_json(Path(run_dir) / "split.json")["task"]


def load_oppu(cfg: RunConfig, run_dir: str | Path, kind: str, cache_bytes: int = DEFAULT_CACHE_BYTES
              ) -> tuple[ProperModel, object]:
    """The merged stage-1 model with the trained OPPU user LoRAs: ``(ProperModel, tokenizer)``."""
    _check_kind(kind)
    run_dir = Path(run_dir)
    out = baseline_dir(run_dir, kind)
    if not oppu_trained(run_dir, kind):
        raise ProperError(f"{out}: baseline {kind} is not trained (properlm evaluate trains it when missing)")
    meta = read_json(out / "baseline.json")
    pm, tok = _merged_model(cfg, run_dir, tuple(meta["targets"]))
    pm.add_user_lora(meta["r"], meta["alpha"], lora_aware_router=False)
    # Users come from the bank itself, on demand: there is no separate list to go stale.
    pm.user_loras = UserCache(open_bank(run_dir, kind), pm.device, cache_bytes)
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
        lm, tok = load_model(cfg, run_dir, "population")
        sampling = PROFILE_SAMPLING if sample else {}
        for s in tqdm(range(0, len(todo), batch_size), desc="pag profiles", disable=not progress, dynamic_ncols=True):
            chunk = todo[s:s + batch_size]
            prompts = [profile_prompt(task, u.id, u.history, seed=cfg.seed) for u in chunk]
            outs = generate(lm, tok, prompts, max_new_tokens=max_new_tokens, do_sample=sample,
                            batch_size=batch_size, bf16=cfg.bf16, seed=cfg.seed, max_prompt_tokens=1024, **sampling)
            cache.update({u.id: o for u, o in zip(chunk, outs)})
            write_json(path, cache)
    return {u.id: cache[u.id] for u in users}
