"""Peak memory of stage 3 with 1, 100 and 1,000 users, one fresh process per setting.

Measure: the process's peak resident set size (``VmHWM``, the kernel's high-water
mark), which counts everything torch allocates on the CPU (tracemalloc sees none
of it) and the model, tokenizer and Python itself; a fresh subprocess per setting
keeps the settings from sharing a high-water mark or allocator caches. Each child
loads the base, adds stage-2 experts and ``N`` user LoRAs (LoRA-aware router),
then runs ``memory_steps`` stage-3 steps of ``run_multiuser`` with 8 rows per step
(stage 3's default ``users_per_step``; the same activations for every ``N``). Also reported: the exact
bytes of the user bank (LoRA factors + AdamW moments) and the RSS just before the
bank was created, so the per-user slope can be compared with adapter bytes x 3
(parameters, first and second moments).

    .venv/bin/python -m benchmarks.memory --child --users 100 [--model smollm2]
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

from benchmarks.common import BenchConfig, make_data, proper_stage3


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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


def child(cfg: BenchConfig, n_users: int) -> dict:
    from properlm.model.base import load_base
    from benchmarks.train import batched_step, multiuser_spec

    t0 = time.perf_counter()
    # Every setting trains the same number of rows per step (``cfg.memory_rows``, stage 3's
    # default users_per_step), so activations are the same: with fewer users than that,
    # each user brings several examples per step.
    ups = min(cfg.memory_rows, n_users)
    pub = -(-cfg.memory_rows // ups)
    lm, tok = load_base(cfg.model, attention=cfg.attention)
    # Data only for the users that train here; the bank holds all n_users (the rest never train).
    trained, enc, _ = make_data(cfg, tok, n_users=min(n_users, ups * cfg.memory_steps), per_user=pub)
    users = trained + [f"idle{i:06d}" for i in range(n_users - len(trained))]
    rss_model = rss_bytes()
    pm, tok, shared = proper_stage3(cfg, users, experts=True, base=(lm, tok))
    rss_bank = rss_bytes()
    for p in shared.values():
        p.requires_grad_(True)
    spec = multiuser_spec(cfg, shared, ups, per_user_batch=pub)
    run_dir = Path(tempfile.mkdtemp(prefix="properlm-bench-mem-"))
    for s in range(cfg.memory_steps):
        batch_users = [trained[(s * ups + i) % len(trained)] for i in range(ups)]
        batched_step(cfg, pm, spec, [e for u in batch_users for e in enc[u]], tok.pad_token_id, run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    bank = pm.user_loras
    per_user = sum(int(torch.Size(s).numel()) for s in bank.shapes.values()) * 4  # fp32
    bank_bytes = sum(v.nbytes for d in (bank.params, bank.exp_avg, bank.exp_avg_sq) for v in d.values())
    return {"users": n_users, "peak_rss": peak_rss_bytes(), "rss_before_bank": rss_model, "rss_after_bank": rss_bank,
            "bank_bytes": bank_bytes, "adapter_bytes_per_user": per_user, "steps": cfg.memory_steps,
            "users_per_step": ups, "examples_per_user_per_step": pub, "seconds": time.perf_counter() - t0}


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def bench_memory(cfg: BenchConfig, log=print) -> dict:
    import gc

    gc.collect()
    rows, skipped = [], []
    for n in cfg.memory_users:
        if rows:  # a setting that would not fit (with 2 GiB to spare) is skipped, not run into the OOM killer
            last = rows[-1]
            need = last["peak_rss"] + 1.1 * 3 * last["adapter_bytes_per_user"] * (n - last["users"])
            if need + 1.5 * 2**30 > mem_available():
                log(f"[memory] {n} users skipped: needs ~{need / 2**30:.1f} GiB, "
                    f"{mem_available() / 2**30:.1f} GiB available (other processes)")
                skipped.append(n)
                continue
        cmd = [sys.executable, "-m", "benchmarks.memory", "--child", "--users", str(n), "--model", cfg.model,
               "--steps", str(cfg.memory_steps), "--threads", str(cfg.threads), "--rows", str(cfg.memory_rows)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's defaults
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"memory child for {n} users failed:\n{p.stderr[-3000:]}")
        row = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append(row)
        log(f"[memory] {n} users: peak RSS {row['peak_rss'] / 2**20:.0f} MiB, bank {row['bank_bytes'] / 2**20:.1f} MiB")
    per_user = rows[0]["adapter_bytes_per_user"]
    out = {"settings": rows, "skipped": skipped, "adapter_bytes_per_user": per_user,
           "measure": "peak RSS (VmHWM), one process per setting"}
    if len(rows) < 2:
        out.update(slope_bytes_per_user=float("nan"), slope_last_two=float("nan"),
                   slope_over_adapter_bytes=float("nan"), bank_over_adapter_bytes=float("nan"))
        return out
    # Least-squares slope of peak RSS over the number of users, and the slope between the two largest settings.
    xs, ys = [r["users"] for r in rows], [r["peak_rss"] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    out["slope_bytes_per_user"] = slope
    out["slope_last_two"] = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    out["slope_over_adapter_bytes"] = slope / per_user
    out["bank_over_adapter_bytes"] = rows[-1]["bank_bytes"] / rows[-1]["users"] / per_user
    pred = [my + slope * (x - mx) for x in xs]
    out["max_fit_error_bytes"] = max(abs(a - b) for a, b in zip(ys, pred))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help="measure one setting in this process and print JSON")
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rows", type=int, default=8, help="examples per training step")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = BenchConfig(model=a.model, memory_steps=a.steps, memory_rows=a.rows)
    if not a.child:
        print(json.dumps(bench_memory(cfg), indent=1))
        return
    print(json.dumps(child(cfg, a.users)))


if __name__ == "__main__":
    main()
