"""The GPU check: run when a CUDA GPU is at hand (CI has none).

    .venv/bin/python scripts/gpu_check.py [--steps 5] [--out /tmp/gpu_check]

1. The ``gpu``-marked tests (the tiny pipeline on CUDA in bf16): ``pytest -m gpu``.
2. One stage-3 training step on the embedded SmolLM2 with ``configs/demo.yaml``'s
   settings on CUDA (bf16 base weights, SDPA), and a mixed-user generation,
   timed, with the card's name and peak memory.
3. With two or more GPUs: the two-process training tests (NCCL, one GPU each), with and
   without the base sharded (FSDP), against one process: ``tests/test_train_distributed.py``.

Prints one JSON object; exits non-zero when CUDA is missing or a check fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="stage-3 steps to time")
    ap.add_argument("--out", default="/tmp/gpu_check", help="scratch run directory")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "CUDA is not available"}))
        return 2
    report = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__}
    t = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(ROOT / "tests" / "test_device.py")],
                       cwd=ROOT, capture_output=True, text=True)
    report["gpu_tests"] = {"rc": t.returncode, "tail": t.stdout.strip().splitlines()[-1:]}
    dist_rc = 0
    if torch.cuda.device_count() >= 2:
        d = subprocess.run([sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "test_train_distributed.py"),
                            "-k", "fsdp or train_the_same_adapters_as_one"], cwd=ROOT, capture_output=True, text=True)
        dist_rc = d.returncode
        report["distributed_tests"] = {"gpus": torch.cuda.device_count(), "rc": d.returncode,
                                       "tail": d.stdout.strip().splitlines()[-1:]}
    else:
        report["distributed_tests"] = "skipped: one GPU"

    from properlm.config import load_config
    from properlm.model.generate import generate
    from properlm.run_config import RunConfig
    from properlm.train.run import train

    out = Path(args.out)
    cfg = load_config(RunConfig, ROOT / "configs" / "demo.yaml",
                      ["device=cuda", "progress=false", "population.max_steps=2", "group.max_steps=2",
                       f"user.max_steps={args.steps}", "data.n_targets=16"])
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    train(cfg, out, stages=("population", "group"), resume=True)
    t1 = time.time()
    import shutil

    shutil.rmtree(out / "user", ignore_errors=True)
    shutil.rmtree(out / "store" / "lora", ignore_errors=True)
    train(cfg, out, stages=("user",), resume=True)
    torch.cuda.synchronize()
    t2 = time.time()
    from properlm import load_run

    lm = load_run(out)
    users = lm.users[:16]
    torch.cuda.synchronize()
    t3 = time.time()
    answers = lm.generate(["Does the user love, like, dislike or hate this post? post: coffee again."] * len(users),
                          users, max_new_tokens=8)
    torch.cuda.synchronize()
    t4 = time.time()
    report.update({
        "stages_1_2_seconds": round(t1 - t0, 2),
        "stage3_seconds_per_step": round((t2 - t1) / args.steps, 3),
        "generate_16_users_8_tokens_seconds": round(t4 - t3, 3),
        "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
        "base_dtype": str(next(p for n, p in lm.model.lm.named_parameters() if ".base." in n).dtype),
        "answers": answers[:3],
    })
    report["ok"] = t.returncode == 0 and dist_rc == 0 and len(answers) == len(users)
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
