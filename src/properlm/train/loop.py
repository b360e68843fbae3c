"""What every stage's training loop shares: schedules, logging, checkpoints, progress.

- Schedules are pure functions of the seed, so a resumed run replays the same
  data order from the step it stopped at.
- Checkpoints are directories written under a temporary name and renamed into
  place; ``latest`` points at the newest one. A crash mid-write leaves the
  previous checkpoint intact. Each records the sha256 of its files and the two
  newest are kept: a checkpoint whose bytes changed is refused, and resuming
  falls back to the one before it.
- Logs are JSONL (one record per step) plus TensorBoard event files.
"""

from __future__ import annotations

import json
import random
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from properlm.errors import CorruptFile
from properlm.io import atomic_dir, sha256_file, write_text

#: Checkpoints kept per stage: the newest, and the one before it to fall back to.
KEEP_CHECKPOINTS = 2


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def plain_schedule(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Shuffled batches of example indices, epoch after epoch."""
    steps = []
    for ep in range(epochs):
        perm = np.random.default_rng([seed, ep]).permutation(n).tolist()
        steps += [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    return steps


def user_schedule(by_user: dict[str, list[int]], per_user_batch: int, users_per_step: int,
                  epochs: int, seed: int) -> list[list[tuple[str, list[int]]]]:
    """Steps that each hold ``per_user_batch`` examples of up to ``users_per_step`` users.

    Each user's sequence of mini-batches depends only on the seed and the user
    id, never on which other users train alongside: training users together or
    one at a time (``users_per_step=1``) feeds each user the same batches in the
    same order, which is what makes the two give the same adapters.
    """
    chunks: dict[str, list[list[int]]] = {}
    for u, idx in by_user.items():
        seq = []
        for ep in range(epochs):
            perm = np.random.default_rng([seed, zlib.crc32(u.encode()), ep]).permutation(len(idx))
            seq += [[idx[j] for j in perm[i:i + per_user_batch]] for i in range(0, len(idx), per_user_batch)]
        chunks[u] = seq
    # Round-robin: a user's k-th batch comes before anyone's (k+1)-th, so long
    # histories do not starve short ones. Within a round the users come in a
    # seeded random order, so a user shares steps with different users from one
    # round to the next (stage 2's constraint loss compares the users of a step).
    order = sorted(chunks)
    pending = []
    for k in range(max((len(c) for c in chunks.values()), default=0)):
        active = [u for u in order if k < len(chunks[u])]
        pending += [(k, active[j]) for j in np.random.default_rng([seed, k]).permutation(len(active))]
    steps, cur, seen = [], [], set()
    for k, u in pending:
        if len(cur) == users_per_step or u in seen:
            steps.append(cur)
            cur, seen = [], set()
        cur.append((u, chunks[u][k]))
        seen.add(u)
    if cur:
        steps.append(cur)
    return steps


class RunLogger:
    """JSONL + TensorBoard logging for one stage of a run."""

    def __init__(self, run_dir: Path, stage: str):
        self.path = Path(run_dir) / "logs" / f"{stage}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(Path(run_dir) / "logs" / "tb" / stage))
        except Exception:  # TensorBoard is optional at run time; JSONL is the record
            self._tb = None

    def log(self, step: int, **metrics: float) -> None:
        rec = {"stage": self.stage, "step": step, "time": time.time(), **metrics}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{self.stage}/{k}", v, step)

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run rewrites them)."""
        if not self.path.exists():
            return
        keep = [l for l in self.path.read_text().splitlines() if l and json.loads(l)["step"] <= step]
        write_text(self.path, "".join(l + "\n" for l in keep))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def save_checkpoint(ckpt_root: Path, step: int, tensors: dict[str, torch.Tensor], extra: dict,
                    users: list[str] | None = None) -> Path:
    """Write ``tensors`` (safetensors) and ``extra`` (torch: optimizer and RNG states) atomically.

    ``step.json`` records the step, the sha256 of both files and ``users``: whose
    per-user rows the checkpoint holds (so that forgetting a user can find it).
    """
    final = ckpt_root / f"step-{step:08d}"
    with atomic_dir(final) as tmp:  # the directory appears only when complete
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        torch.save(extra, tmp / "extra.pt")
        sums = {f: sha256_file(tmp / f) for f in ("state.safetensors", "extra.pt")}
        (tmp / "step.json").write_text(json.dumps({"step": step, "sha256": sums, "users": list(users or [])}))
    write_text(ckpt_root / "latest", final.name)
    kept = sorted(ckpt_root.glob("step-*"))[-KEEP_CHECKPOINTS:]
    for old in ckpt_root.glob("step-*"):  # keep only the newest few
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _read_checkpoint(d: Path) -> tuple[int, dict[str, torch.Tensor], dict]:
    """One checkpoint directory, its files checked against their recorded sha256 (``CorruptFile`` otherwise)."""
    try:
        info = json.loads((d / "step.json").read_text())
    except (OSError, ValueError) as e:
        raise CorruptFile(d / "step.json", f"unreadable: {e}") from None
    for f, want in info.get("sha256", {}).items():
        if not (d / f).exists() or sha256_file(d / f) != want:
            raise CorruptFile(d / f)
    try:
        return info["step"], load_file(str(d / "state.safetensors")), torch.load(d / "extra.pt", weights_only=False)
    except Exception as e:
        raise CorruptFile(d, f"does not load: {str(e).splitlines()[0]}") from None


def load_checkpoint(ckpt_root: Path, warn=print) -> tuple[int, dict[str, torch.Tensor], dict] | None:
    """The newest good checkpoint as (step, tensors, extra), or None when there is none.

    A checkpoint whose files do not match their checksums is skipped with a
    one-line warning, and the one before it is used; if every checkpoint there
    is corrupt, :class:`~properlm.errors.CorruptFile` names the newest.
    """
    if not (ckpt_root / "latest").exists() and not any(ckpt_root.glob("step-*")):
        return None
    first_error = None
    for d in sorted(ckpt_root.glob("step-*"), reverse=True):
        try:
            return _read_checkpoint(d)
        except CorruptFile as e:
            first_error = first_error or e
            warn(f"properlm: warning: {e}; trying the checkpoint before it")
    if first_error is not None:
        raise first_error
    return None


def checkpoints_holding(root: Path, user_id: str) -> list[Path]:
    """Checkpoint directories under ``root`` (any depth) whose per-user rows include ``user_id``."""
    out = []
    for info in root.rglob("step-*/step.json"):
        try:
            users = json.loads(info.read_text()).get("users", [])
        except (OSError, ValueError):
            users = None  # unreadable: it may hold anyone
        if users is None or user_id in users:
            out.append(info.parent)
    return out


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


class Progress:
    """A tqdm bar showing loss and trained tokens per second."""

    def __init__(self, total: int, desc: str, start: int = 0, enabled: bool = True):
        self.bar = tqdm(total=total, initial=start, desc=desc, disable=not enabled, dynamic_ncols=True)
        self.t0, self.tokens = time.time(), 0

    def update(self, loss: float, tokens: int) -> float:
        self.tokens += tokens
        tps = self.tokens / max(time.time() - self.t0, 1e-9)
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}")
        self.bar.update(1)
        return tps

    def close(self) -> None:
        self.bar.close()
