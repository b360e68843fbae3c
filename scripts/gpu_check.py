"""The GPU check: numbers, not exit codes. Run it when a CUDA GPU is at hand (CI has none).

    .venv/bin/python scripts/gpu_check.py [--steps 5] [--out DIR] [--no-demo]

Every run starts in a fresh scratch directory (a new temporary one, or ``--out``,
which must not exist yet) and prints one JSON summary: the card, the torch and
CUDA versions, each check's verdict and figures, and timings. Exit 0 only when
every check holds.

Checks, on the tiny random Llama unless said otherwise:

1. ``train``: the three stages trained on the CPU in float32 (``reference``), on
   CUDA in float32 (``fp32``) and on CUDA in bf16 (``bf16``: bf16 base weights, autocast): every logged
   loss finite; each stage's first logged loss on CUDA equal to the CPU's within
   ``--loss-rtol`` (float32) or ``--loss-rtol-bf16``.
2. ``logits``: the CPU-trained run's full model (stage 3, a batch mixing users)
   loaded on the CPU in float32 and on CUDA in float32 and in bf16: logits compared
   with the CPU's, ``max |diff| / max |logit|`` at most ``--rtol-fp32`` and
   ``--rtol-bf16``; the share of equal arg-max tokens is reported too.
3. ``stage3_start``: in bf16 on CUDA, the stage-2 model and the same model with a new
   user's stage-3 LoRA at its initial value (B = 0) give the same logits (stage 3
   starts where stage 2 ends) within ``--start-atol``.
4. ``commands``: on the CUDA bf16 run: ``evaluate`` (free and label decoding),
   ``report`` with figures, ``users add``, ``export``, and one request to
   ``properlm serve`` that must answer with the user's model.
5. ``gpu_tests``: the ``gpu``-marked tests; with two or more GPUs also the
   two-process training tests (NCCL), with and without the base sharded (FSDP).
6. ``demo_timing`` (skipped with ``--no-demo``): a stage-3 training step and a
   16-user generation on the embedded SmolLM2 with ``configs/demo.yaml``'s
   settings, timed, with the peak memory.

``--device cpu`` runs checks 1-4 with the CPU standing in for CUDA (bf16 forced
with ``PROPERLM_CPU_BF16=1``): a rehearsal of the script itself on a machine
without a GPU, not a GPU check.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["base_model=tiny-random", "progress=false", "data.synth_users=16", "data.n_targets=4",
        "population.max_steps=4", "group.max_steps=4", "user.max_steps=4", "checkpoint_every=100"]
PROMPTS = ["Does the user love, like, dislike or hate this post? post: Yesterday the group chat was all about jazz.",
           "Does the user love, like, dislike or hate this post? post: coffee again, third cup.",
           "Does the user love, like, dislike or hate this post? post: robots at the fair."]


def _timed(fn, *a, **kw):
    t = time.time()
    out = fn(*a, **kw)
    return out, round(time.time() - t, 3)


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _losses(run: Path) -> dict[str, list[float]]:
    out = {}
    for stage in ("population", "group", "user"):
        lines = (run / "logs" / f"{stage}.jsonl").read_text().splitlines()
        out[stage] = [float(json.loads(x)["loss"]) for x in lines if '"loss"' in x]
    return out


def check_train(scratch: Path, dev: str) -> tuple[dict, dict[str, Path]]:
    """Train the reference (CPU float32) and the two device runs; compare their losses."""
    from properlm.config import load_config
    from properlm.run_config import RunConfig
    from properlm.train.run import train

    runs, out = {}, {"timings": {}}
    for name, over in (("reference", ["device=cpu", "bf16=false"]), ("fp32", [f"device={dev}", "bf16=false"]),
                       ("bf16", [f"device={dev}", "bf16=true"] + (["base_dtype=bfloat16"] if dev == "cpu" else []))):
        cfg = load_config(RunConfig, None, TINY + over)
        run, secs = _timed(train, cfg, scratch / name)
        _sync()
        runs[name], out["timings"][f"train_{name}_s"] = run, secs
    losses = {name: _losses(run) for name, run in runs.items()}
    out["finite"] = all(math.isfinite(x) for ls in losses.values() for v in ls.values() for x in v)
    out["first_loss"] = {name: {s: round(v[0], 6) for s, v in ls.items()} for name, ls in losses.items()}
    return out, runs


def _batch_logits(run: Path, device: str, bf16: bool, users: list[str]):
    """The run's full model on ``device`` (bf16: bf16 base and autocast), logits of PROMPTS x users, as float32 CPU."""
    import torch

    from properlm.model.device import autocast
    from properlm.store.run import load_model, read_config

    cfg = read_config(run)
    cfg = dataclasses.replace(cfg, bf16=bf16, base_dtype="bfloat16" if bf16 else "float32")
    pm, tok = load_model(cfg, run, "done", device=device)
    rows = [(p, u) for p in PROMPTS for u in users]
    b = _pad(tok, [p for p, _ in rows], pm.device)
    with torch.no_grad(), autocast(bf16, pm.device):
        pm.bind(emb_users=[u for _, u in rows], lora_users=[u for _, u in rows], token_mask=b["attention_mask"])
        logits = pm(b["input_ids"], b["attention_mask"])
        pm.state.clear()
    return logits[b["attention_mask"].bool()].float().cpu()


def _pad(tok, prompts: list[str], device):
    """The prompts as the model sees them (chat template), left-padded: ``input_ids``, ``attention_mask``."""
    import torch

    from properlm.model.prompts import encode_prompt

    seqs = [encode_prompt(tok, p, 256) for p in prompts]
    n = max(len(s) for s in seqs)
    ids = torch.tensor([[tok.pad_token_id] * (n - len(s)) + list(s) for s in seqs], device=device)
    mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs], device=device)
    return {"input_ids": ids, "attention_mask": mask}


def check_logits(run: Path, dev: str, rtol32: float, rtol16: float) -> dict:
    """The CPU-trained run on the CPU (float32) against ``dev`` in float32 and bf16."""
    users = json.loads((run / "split.json").read_text())["target"][:3]
    ref = _batch_logits(run, "cpu", False, users)
    scale = float(ref.abs().max())
    out = {"max_abs_logit": round(scale, 6), "rows": len(PROMPTS) * len(users)}
    for name, bf16, bound in (("fp32", False, rtol32), ("bf16", True, rtol16)):
        got = _batch_logits(run, dev, bf16, users)
        rel = float((got - ref).abs().max()) / scale
        out[name] = {"rel_max_diff": float(f"{rel:.3g}"), "bound": bound, "ok": rel <= bound,
                     "argmax_agree": round(float((got.argmax(-1) == ref.argmax(-1)).float().mean()), 4)}
    out["ok"] = out["fp32"]["ok"] and out["bf16"]["ok"]
    return out


def check_stage3_start(run: Path, dev: str, atol: float) -> dict:
    """bf16 on ``dev``: the stage-2 model and the same with a zero-initialised user LoRA give the same logits."""
    import torch

    from properlm.model.device import autocast
    from properlm.store.run import load_model, read_config

    cfg = read_config(run)
    cfg = dataclasses.replace(cfg, bf16=True, base_dtype="bfloat16")
    pm, tok = load_model(cfg, run, "user", device=dev)
    user = json.loads((run / "split.json").read_text())["target"][0]
    b = _pad(tok, PROMPTS, pm.device)

    def logits(lora):
        with torch.no_grad(), autocast(True, pm.device):
            pm.bind(emb_users=[user] * len(PROMPTS), lora_users=[lora] * len(PROMPTS) if lora else None,
                    token_mask=b["attention_mask"])
            out = pm(b["input_ids"], b["attention_mask"])[b["attention_mask"].bool()].float()
            pm.state.clear()
        return out

    want = logits(None)
    pm.add_user_lora(cfg.user.r, cfg.user.alpha, cfg.user.lora_aware_router and not cfg.user.end_to_end)
    pm.user_loras = pm.new_lora_bank([user])
    pm.to(pm.device)
    got = logits(user)
    diff = float((got - want).abs().max())
    return {"max_abs_diff": diff, "bound": atol, "ok": math.isfinite(diff) and diff <= atol}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_one(run: Path, user: str) -> dict:
    """Start ``properlm serve`` on loopback, ask one completion for ``user``, stop it."""
    import httpx

    key, port = "gpu-check-admin-key", _free_port()
    env = {**os.environ, "PROPERLM_ADMIN_KEY": key}
    log = open(run.parent / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "properlm.cli", "serve", "--run", str(run), "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        t = time.time()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                       headers={"Authorization": f"Bearer {key}"},
                       json={"model": user, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0})
        ok = r.status_code == 200 and r.headers.get("x-properlm-model") == "user-lora"
        return {"ok": ok, "status": r.status_code, "seconds": round(time.time() - t, 3)}
    except httpx.HTTPError as e:
        return {"ok": False, "error": type(e).__name__}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def check_commands(run: Path, scratch: Path) -> dict:
    """evaluate, report, users add, export and one served request on ``run`` (its config names the device)."""
    from properlm.cli import main

    split = json.loads((run / "split.json").read_text())
    target, newcomer = split["target"][0], split["train"][0]
    steps = {
        "evaluate_free": ["evaluate", "--run", str(run), "--quiet", "--max-new-tokens", "4"],
        "evaluate_labels": ["evaluate", "--run", str(run), "--quiet", "--decode", "labels"],
        "report": ["report", str(run), "--out", str(scratch / "report")],
        "users_add": ["users", "add", "--run", str(run), "--users", newcomer],
        "export": ["export", "--run", str(run), "--user", target, "--out", str(scratch / "export")],
    }
    out = {}
    for name, argv in steps.items():
        with contextlib.redirect_stdout(sys.stderr):  # stdout holds the JSON summary alone
            rc, secs = _timed(main, argv)
        out[name] = {"rc": rc, "seconds": secs}
    summary = json.loads((run / "eval" / "summary.json").read_text())["methods"]
    out["evaluate_finite"] = all(math.isfinite(v) for m in summary.values() for v in m["metrics"].values())
    out["serve"] = _serve_one(run, target)
    out["ok"] = (all(v["rc"] == 0 for k, v in out.items() if isinstance(v, dict) and "rc" in v)
                 and out["evaluate_finite"] and out["serve"]["ok"])
    return out


def check_gpu_tests() -> dict:
    import torch

    t = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(ROOT / "tests" / "test_device.py")],
                       cwd=ROOT, capture_output=True, text=True)
    out = {"rc": t.returncode, "tail": t.stdout.strip().splitlines()[-1:]}
    if torch.cuda.device_count() >= 2:
        d = subprocess.run([sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "test_train_distributed.py"),
                            "-k", "fsdp or train_the_same_adapters_as_one"], cwd=ROOT, capture_output=True, text=True)
        out["distributed"] = {"gpus": torch.cuda.device_count(), "rc": d.returncode,
                              "tail": d.stdout.strip().splitlines()[-1:]}
    out["ok"] = out["rc"] == 0 and out.get("distributed", {"rc": 0})["rc"] == 0
    return out


def demo_timing(scratch: Path, steps: int) -> dict:
    """A stage-3 step and a 16-user generation on the embedded SmolLM2, demo settings, on CUDA."""
    import torch

    from properlm import load_run
    from properlm.config import load_config
    from properlm.run_config import RunConfig
    from properlm.train.run import train

    out_dir = scratch / "demo"
    cfg = load_config(RunConfig, ROOT / "configs" / "demo.yaml",
                      ["device=cuda", "progress=false", "population.max_steps=2", "group.max_steps=2",
                       f"user.max_steps={steps}", "data.n_targets=16"])
    torch.cuda.reset_peak_memory_stats()
    _, t12 = _timed(train, cfg, out_dir, stages=("population", "group"))
    _, t3 = _timed(train, cfg, out_dir, stages=("user",), resume=True)
    _sync()
    lm = load_run(out_dir)
    users = lm.users[:16]
    answers, tg = _timed(lm.generate, [PROMPTS[1]] * len(users), users, max_new_tokens=8)
    _sync()
    return {"stages_1_2_seconds": t12, "stage3_seconds_per_step": round(t3 / steps, 3),
            "generate_16_users_8_tokens_seconds": tg,
            "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "ok": len(answers) == len(users)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="scratch directory (must not exist; default: a new temporary one)")
    ap.add_argument("--steps", type=int, default=5, help="stage-3 steps to time on the embedded model")
    ap.add_argument("--no-demo", action="store_true", help="skip the embedded model's timing")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: rehearse checks 1-4 without a GPU (not a GPU check)")
    ap.add_argument("--rtol-fp32", type=float, default=1e-4, help="logits bound, float32 against the CPU")
    ap.add_argument("--rtol-bf16", type=float, default=5e-2, help="logits bound, bf16 against the CPU's float32")
    ap.add_argument("--loss-rtol", type=float, default=1e-4, help="first-loss bound per stage, float32")
    ap.add_argument("--loss-rtol-bf16", type=float, default=2e-2, help="first-loss bound per stage, bf16")
    ap.add_argument("--start-atol", type=float, default=1e-6, help="stage-3 start against stage 2, bf16")
    args = ap.parse_args()

    import torch

    report = {"card": None, "torch": torch.__version__, "cuda": torch.version.cuda, "device": args.device}
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print(json.dumps({**report, "ok": False, "error": "CUDA is not available"}))
            return 2
        report["card"] = torch.cuda.get_device_name(0)
    else:
        os.environ["PROPERLM_CPU_BF16"] = "1"
        torch.set_num_threads(1)
    if args.out:
        scratch = Path(args.out)
        if scratch.exists():
            print(json.dumps({**report, "ok": False, "error": f"{scratch} exists: give a new directory"}))
            return 2
        scratch.mkdir(parents=True)
    else:
        scratch = Path(tempfile.mkdtemp(prefix="properlm-gpu-check-"))
    report["scratch"] = str(scratch)
    t0 = time.time()
    dev = args.device
    with contextlib.redirect_stdout(sys.stderr):
        train_out, runs = check_train(scratch, dev)
    ref = train_out["first_loss"]["reference"]
    for name, bound in (("fp32", args.loss_rtol), ("bf16", args.loss_rtol_bf16)):
        rel = max(abs(train_out["first_loss"][name][s] - ref[s]) / abs(ref[s]) for s in ref)
        train_out[f"first_loss_rel_diff_{name}"] = {"value": float(f"{rel:.3g}"), "bound": bound, "ok": rel <= bound}
    train_out["ok"] = train_out["finite"] and all(v["ok"] for k, v in train_out.items()
                                                  if k.startswith("first_loss_rel_diff"))
    report["train"] = train_out
    report["logits"] = check_logits(runs["reference"], dev, args.rtol_fp32, args.rtol_bf16)
    report["stage3_start"] = check_stage3_start(runs["reference"], dev, args.start_atol)
    report["commands"] = check_commands(runs["bf16"], scratch)
    if dev == "cuda":
        report["gpu_tests"] = check_gpu_tests()
        if not args.no_demo:
            report["demo_timing"] = demo_timing(scratch, args.steps)
    report["seconds"] = round(time.time() - t0, 1)
    report["ok"] = all(v["ok"] for v in report.values() if isinstance(v, dict) and "ok" in v)
    print(json.dumps(report, indent=1))
    if report["ok"]:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
