"""Peak memory of stage 3 as the number of users grows, at one cohort size; one fresh process per setting.

Measure: the process's peak resident set size (``VmHWM``, the kernel's high-water
mark), which counts everything torch allocates on the CPU and the model,
tokenizer and Python itself; a fresh subprocess per setting keeps the settings
from sharing a high-water mark. Each child builds a stage-2 model (experts with
random B, so routing is not trivial), then runs properlm's real stage 3
(``train_users``: cohorts of ``cohort`` users, the shared LoRA-aware router
training, every user written to the user store with its AdamW moments) for
``N`` users with ``memory_examples`` history examples each. Reported: peak RSS,
seconds, the store's bytes on disk, and the ratio of the largest setting's peak
to the smallest's (target <= 1.2: memory follows the cohort, not the users).

    .venv/bin/python -m benchmarks.memory --child --users 1000 --cohort 256 [--model tiny-random]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import BenchConfig, randomize_


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark (``VmHWM``).

    Not ``getrusage().ru_maxrss``: after fork + exec Linux keeps the parent's
    high-water mark in it, so every child would report at least the parent's RSS.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def stage2_model(model: str, seed: int = 0):
    """A stage-2 ProperModel (random-B experts, a user-aware router with a random fallback) and its tokenizer."""
    from properlm.model.base import load_base
    from properlm.model.proper import ProperModel

    lm, tok = load_base(model, attention="eager")
    pm = ProperModel(lm)
    pm.add_group(5, 4, 8.0, 0.05, "user-aware", 32, [f"g{i}" for i in range(8)], seed=seed)
    randomize_(pm.user_embs.params.values(), 1.0, seed)
    randomize_([s.experts.lora_B for s in pm.sites.values()], 0.02, seed + 1)
    pm.set_fallback_embedding()
    pm.user_embs = None  # stage 3's users are unseen in stage 2: they route with the fallback
    for p in pm.parameters():
        p.requires_grad_(False)
    return pm, tok


def synthetic_examples(n_users: int, per_user: int):
    from properlm.train.examples import Example

    topics = ("jazz", "soccer", "coffee", "taxes", "robots", "hiking")
    return [Example(f"user{i:06d}", f"Does the user love or hate this post? post: a note about {topics[(i + j) % 6]} "
                                    f"number {j}.", ("love", "hate")[(i + j) % 2])
            for i in range(n_users) for j in range(per_user)]


def child(model: str, n_users: int, cohort: int, per_user: int, bf16: bool) -> dict:
    from properlm.run_config import DataConfig, RunConfig, UserConfig
    from properlm.train.user import train_users

    t0 = time.perf_counter()
    pm, tok = stage2_model(model)
    examples = synthetic_examples(n_users, per_user)
    cfg = RunConfig(base_model=model, progress=False, bf16=bf16, checkpoint_every=10 ** 9,
                    data=DataConfig(max_len=64), user=UserConfig(users_per_step=16, cohort_size=cohort, epochs=1))
    run_dir = Path(tempfile.mkdtemp(prefix="properlm-bench-mem-"))
    try:
        t1 = time.perf_counter()
        train_users(cfg, run_dir, pm, tok, examples)
        t2 = time.perf_counter()
        store_bytes = dir_bytes(run_dir / "store")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    bank = pm.user_loras
    per_user_bytes = sum(int(torch.Size(s).numel()) for s in bank.shapes.values()) * 4
    return {"users": n_users, "cohort": cohort, "peak_rss": peak_rss_bytes(), "train_seconds": t2 - t1,
            "seconds": time.perf_counter() - t0, "store_bytes": store_bytes, "adapter_bytes_per_user": per_user_bytes,
            "examples_per_user": per_user, "model": model}


def bench_memory(cfg: BenchConfig, log=print) -> dict:
    rows = []
    for n in cfg.memory_users:
        cmd = [sys.executable, "-m", "benchmarks.memory", "--child", "--users", str(n), "--model", cfg.memory_model,
               "--cohort", str(cfg.memory_cohort), "--examples", str(cfg.memory_examples), "--threads", str(cfg.threads)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's defaults
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"memory child for {n} users failed:\n{p.stderr[-3000:]}")
        row = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append(row)
        log(f"[memory] {n} users, cohorts of {row['cohort']}: peak RSS {row['peak_rss'] / 2**20:.0f} MiB, "
            f"stage 3 {row['train_seconds']:.0f} s, store {row['store_bytes'] / 2**20:.0f} MiB on disk")
    return {"settings": rows, "model": cfg.memory_model, "cohort": cfg.memory_cohort,
            "measure": "peak RSS (VmHWM), one process per setting",
            "ratio_largest_to_smallest": rows[-1]["peak_rss"] / rows[0]["peak_rss"],
            "adapter_bytes_per_user": rows[0]["adapter_bytes_per_user"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help="measure one setting in this process and print JSON")
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--cohort", type=int, default=256)
    ap.add_argument("--examples", type=int, default=2)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.child:
        cfg = BenchConfig(memory_model=a.model, memory_cohort=a.cohort, memory_examples=a.examples)
        print(json.dumps(bench_memory(cfg), indent=1))
        return
    print(json.dumps(child(a.model, a.users, a.cohort, a.examples, a.bf16)))


if __name__ == "__main__":
    main()
