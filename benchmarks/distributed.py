"""Two training processes against one on this machine: stage 1 and stage 3 wall time per step.

    .venv/bin/python -m benchmarks.distributed [--model smollm2] [--steps 12] [--fsdp]

The demo config on the embedded model; ``properlm train`` with 1 process (2
torch threads) and with ``--processes 2`` (one thread each), the same steps
(the same global batches). Seconds per step come from the stage's log
timestamps (model loading excluded). On a 2-core CPU the two processes share
the cores the one process used, so this measures the cost of the collectives
and of splitting batches; on a machine with one GPU per process it is the
scaling efficiency. ``--fsdp`` adds two processes with the base sharded
(``fsdp=true``): the cost of gathering each layer's weights for every pass.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def seconds_per_step(log: Path) -> float:
    recs = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    return (recs[-1]["time"] - recs[0]["time"]) / (len(recs) - 1)


def run(out: Path, processes: int, model: str, steps: int, fsdp: bool = False) -> dict:
    args = [sys.executable, "-m", "properlm.cli", "train", "--all", "--config", str(ROOT / "configs" / "demo.yaml"),
            "--out", str(out), f"base_model={model}", "progress=false", f"population.max_steps={steps}",
            f"group.max_steps={steps}", f"user.max_steps={steps}", "checkpoint_every=100000", "data.n_targets=16",
            "group.unseen_epochs=1"] + (["fsdp=true"] if fsdp else [])
    env = dict(os.environ)
    if processes > 1:
        args[4:4] = ["--processes", str(processes)]
        env["OMP_NUM_THREADS"] = "1"
    else:
        env.pop("OMP_NUM_THREADS", None)
    subprocess.run(args, check=True, env=env, cwd=ROOT, capture_output=True)
    return {s: seconds_per_step(out / "logs" / f"{s}.jsonl") for s in ("population", "group", "user")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--fsdp", action="store_true", help="also two processes with the base sharded (fsdp=true)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="properlm-bench-dist-"))
    try:
        one = run(work / "one", 1, a.model, a.steps)
        two = run(work / "two", 2, a.model, a.steps)
        sharded = run(work / "fsdp", 2, a.model, a.steps, fsdp=True) if a.fsdp else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {"model": a.model, "steps": a.steps, "one_process_s_per_step": one, "two_processes_s_per_step": two,
           "speedup": {s: one[s] / two[s] for s in one}}
    if sharded is not None:
        res["two_processes_fsdp_s_per_step"] = sharded
        res["fsdp_vs_two"] = {s: two[s] / sharded[s] for s in two}
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
