"""Run properlm's performance benchmarks and print the ratios.

    .venv/bin/python -m benchmarks.run                 # documented numbers (embedded SmolLM2-135M)
    .venv/bin/python -m benchmarks.run --check         # same; exit 1 when a ratio misses its target
    .venv/bin/python -m benchmarks.run --quick         # tiny random model, < 1 minute (smoke check)
    .venv/bin/python -m benchmarks.run --only train,generate --threads 1

Results go to ``runs/bench/results.json`` (``results-quick.json`` with ``--quick``).
Every contender of a benchmark runs in this one process, interleaved with the
others, so the ratios hold even when other processes share the machine; the
absolute numbers do not. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import BenchConfig, compute_dtype, machine_info, matmul_peak, peak_sweep

SECTIONS = ("train", "levers", "generate", "memory", "store", "serve")

# glibc malloc settings the benchmark process runs under (re-executed with them unless
# --default-malloc): one process holds all contenders' models (two ProperModels and a
# PEFT model with 96 adapters) and interleaves them, and with glibc's adaptive mmap
# threshold and heap trimming its large activation buffers were returned to the kernel
# and faulted back in at every step (up to 20% system time, step times drifting up
# by a third over a run). A fixed 32 MiB mmap threshold and no trimming keep them. A
# training process holding one model is affected much less (~4% on the batched step,
# docs/benchmarks.md). The memory benchmark's children run with the default malloc.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184",
              "MALLOC_TOP_PAD_": "268435456"}

# name -> (target, ">=" or "<=", how to read it from the results, section).
TARGETS = {
    "stage-3 training, batched vs sequential PEFT (batch 1), tokens/s":
        (3.0, ">=", lambda r: r["train"]["ratio_vs_seq_b1"], "train"),
    "stage-3 training, no regression from 2.74x (2026-11-26) vs sequential PEFT":
        (2.74, ">=", lambda r: r["train"]["ratio_vs_seq_b1"], "train"),
    "stage-3 training, fraction of bf16 matmul peak":
        (0.6, ">=", lambda r: r["train"]["contenders"]["proper"]["peak_fraction"], "train"),
    "generation, mixed-user batch vs PEFT adapter switching (each at its faster precision)":
        (5.0, ">=", lambda r: r["generate"]["ratio"], "generate"),
    "decode, one user: full stage-3 model vs plain transformers, fp32 s/step":
        (1.10, "<=", lambda r: r["generate"]["decode"]["single"]["proper_vs_plain"], "generate"),
    "decode, 32 users in one batch: PEFT adapter_names vs full stage-3 model, fp32 s/step":
        (2.5, ">=", lambda r: r["generate"]["decode"]["mixed"]["peft_vs_proper"], "generate"),
    "stage-3 peak memory, most vs fewest users at one cohort size (tiny model)":
        (1.2, "<=", lambda r: r["memory"]["ratio_largest_to_smallest"], "memory"),
    "users add of one user, most- vs fewest-user run: time":
        (1.5, "<=", lambda r: r["store"]["add"]["time_ratio"], "store"),
    "users add of one user, most- vs fewest-user run: bytes written":
        (1.5, "<=", lambda r: r["store"]["add"]["bytes_ratio"], "store"),
    "cold load of one user from the store, median ms (SmolLM2 shapes)":
        (50.0, "<=", lambda r: r["store"]["cold_load"]["cold_ms_median"], "store"),
    "server, 32 clients of 32 users: continuous batching vs one request at a time, requests/s":
        (5.0, ">=", lambda r: r["serve"]["throughput_ratio_32"], "serve"),
    "server, batched: worst p99 / p50 latency over 1, 8 and 32 clients":
        (2.0, "<=", lambda r: r["serve"]["worst_p99_over_p50_batched"], "serve"),
}


def checks(res: dict, quick: bool) -> list[tuple[str, float, str, bool]]:
    """(what, value, target text, ok) for every target whose section ran."""
    out = []
    for name, (target, how, get, sec) in TARGETS.items():
        if sec not in res:
            continue
        v = get(res)
        if quick and sec in ("train", "generate", "serve"):  # targets for the embedded model; the tiny one only has to run
            out.append((name, v, "finite (quick)", math.isfinite(v) and v > 0))
        else:
            out.append((name, v, f"{how} {target:g}", v >= target if how == ">=" else v <= target))
    return out


def summary(res: dict) -> str:
    lines = []
    m = res["machine"]
    lines.append(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} threads; "
                 f"load average at start {m['loadavg_start'][0]:.2f}, at end {m['loadavg_end'][0]:.2f}; other busy "
                 f"processes at start {m.get('busy_processes_at_start', '?')}, at end {m.get('busy_processes_at_end', '?')}")
    p = res["peaks_gflops"]
    lines.append("matmul peak: " + ", ".join(f"{k} {v:.0f}" for k, v in p.items()) + " GFLOP/s")
    if "train" in res:
        t = res["train"]
        c = t["contenders"]
        lines.append(f"\nstage-3 training: {t['users']} users x {t['examples_per_user']} examples, {t['tokens']} tokens, "
                     f"bf16 autocast={t['bf16']}, padding efficiency {t['padding_efficiency']:.2f}")
        lines.append(f"  {'contender':<13} {'seconds':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'of peak':>8}")
        for k, v in c.items():
            lines.append(f"  {k:<13} {v['seconds']:8.1f} {v['tokens_per_s']:9.0f} {v['model_gflops_per_s']:8.1f} "
                         f"{v['peak_fraction']:8.2f}")
        lines.append(f"  batched vs sequential PEFT, batch 1: {t['ratio_vs_seq_b1']:.2f}x "
                     f"(median of rounds {t['ratio_vs_seq_b1_round_median']:.2f}x); batch 1 with completion-only "
                     f"LM head: {t['ratio_vs_seq_b1_head']:.2f}x; batch {t['oppu_batch']}: {t['ratio_vs_seq_b16']:.2f}x")
        lines.append(f"  LoRA-only batched (same model as PEFT) vs the same: {t['ratio_lora_only_vs_seq_b1']:.2f}x, "
                     f"{t['ratio_lora_only_vs_seq_b1_head']:.2f}x, {t['ratio_lora_only_vs_seq_b16']:.2f}x")
        lines.append(f"  peak median {t['peak_gflops_median']:.0f} GFLOP/s; batched fraction of peak "
                     f"{c['proper']['peak_fraction']:.2f} (median of rounds {c['proper']['peak_fraction_round_median']:.2f})")
    if "levers" in res:
        lv = res["levers"]
        lines.append(f"\nlevers (one {lv['rows']}-row batch, padding efficiency {lv['padding_efficiency']:.2f}):")
        lines.append(f"  {'variant':<26} {'s/step':>7} {'min':>6} {'tokens/s':>9} {'of peak':>8} {'vs default':>10} "
                     f"{'(mins)':>7}")
        for k, v in lv["variants"].items():
            lines.append(f"  {k:<26} {v['seconds_per_step']:7.2f} {v['seconds_min']:6.2f} {v['tokens_per_s']:9.0f} "
                         f"{v['peak_fraction']:8.2f} {v['speed_vs_default']:10.2f} {v['speed_vs_default_min']:7.2f}")
    if "generate" in res:
        g = res["generate"]
        lines.append(f"\ngeneration: {g['queries']} queries of {g['queries']} users, {g['max_new_tokens']} new tokens")
        for prec, r in g["precisions"].items():
            lines.append(f"  {prec}: mixed batch {r['mixed_batch']['seconds']:.2f}s, LoRA-only mixed batch "
                         f"{r['mixed_batch_lora_only']['seconds']:.2f}s, PEFT switching {r['peft_switch']['seconds']:.2f}s"
                         f" -> {r['ratio']:.1f}x ({r['ratio_lora_only']:.1f}x LoRA-only); "
                         f"LoRA-only = PEFT answers {r['agree']}/{g['queries']}")
        if "decode" in g:
            d = g["decode"]
            s1, mx = d["single"], d["mixed"]
            lines.append(f"  decode, one user ({d['precision']}, median ms/step): plain "
                         f"{s1['plain']['seconds_per_step'] * 1e3:.1f}, full model {s1['proper']['seconds_per_step'] * 1e3:.1f} "
                         f"({s1['proper_vs_plain']:.3f}x plain, {s1['proper_vs_peft_one_lora']:.3f}x PEFT), LoRA-only "
                         f"{s1['proper_lora_only_vs_plain']:.3f}x plain, PEFT one LoRA {s1['peft_one_lora_vs_plain']:.3f}x plain"
                         + (f", full model unfused {s1['proper_unfused_vs_plain']:.3f}x plain"
                            if "proper_unfused_vs_plain" in s1 else ""))
            lines.append(f"  decode, {mx['rows']} users in one batch ({d['precision']}, median s/step): plain "
                         f"{mx['plain']['seconds_per_step']:.3f}, full model "
                         f"{mx['proper']['seconds_per_step']:.3f}, LoRA-only {mx['proper_lora_only']['seconds_per_step']:.3f}, "
                         f"PEFT adapter_names {mx['peft_adapter_names']['seconds_per_step']:.3f} -> "
                         f"{mx['peft_vs_proper']:.2f}x ({mx['peft_vs_proper_lora_only']:.2f}x LoRA-only; PEFT vs plain "
                         f"{mx['peft_vs_plain']:.2f}x)")
    if "memory" in res:
        mm = res["memory"]
        lines.append(f"\nstage-3 memory ({mm['measure']}; {mm['model']}, cohorts of {mm['cohort']}; adapter "
                     f"{mm['adapter_bytes_per_user'] / 2**20:.3f} MiB per user):")
        for s in mm["settings"]:
            lines.append(f"  {s['users']:>6} users: peak RSS {s['peak_rss'] / 2**20:7.0f} MiB, stage 3 "
                         f"{s['train_seconds']:6.0f} s, store {s['store_bytes'] / 2**20:7.0f} MiB on disk")
        lines.append(f"  most / fewest users: {mm['ratio_largest_to_smallest']:.3f}")
    if "store" in res:
        st = res["store"]
        for s in st["add"]["settings"]:
            lines.append(f"\nusers add into a {s['users']}-user run ({st['add']['model']}): {s['seconds']:.2f} s, "
                         f"{s['bytes_written'] / 2**20:.2f} MiB written")
        lines.append(f"  ratios: time {st['add']['time_ratio']:.2f}, bytes {st['add']['bytes_ratio']:.2f}")
        c = st["cold_load"]
        lines.append(f"cold load of one user ({c['model']}, {c['user_param_bytes'] / 2**20:.1f} MiB): median "
                     f"{c['cold_ms_median']:.1f} ms, p99 {c['cold_ms_p99']:.1f} ms; from the page cache "
                     f"{c['page_cached_ms_median']:.1f} / {c['page_cached_ms_p99']:.1f} ms")
    if "serve" in res:
        sv = res["serve"]
        lines.append(f"\nserver ({sv['model']}; {sv['users']} users, greedy, {sv['max_tokens']} new tokens):")
        for name, rows in sv["settings"].items():
            for c, r in rows.items():
                lines.append(f"  {name:<14} {c:>3} clients: {r['requests_per_s']:6.2f} req/s, p50 {r['p50_s']:6.2f} s, "
                             f"p99 {r['p99_s']:6.2f} s (p99/p50 {r['p99_over_p50']:.2f})")
        lines.append(f"  batched vs one at a time at 32 clients: {sv['throughput_ratio_32']:.2f}x; uncached user "
                     f"{sv['uncached_user_latency_s']:.2f} s (warm {sv['warm_single_latency_s']:.2f} s); 32 streams: "
                     f"{sv['stream_tokens_per_s_per_request_32']:.1f} tokens/s each")
    return "\n".join(lines)


def busy_others(seconds: float = 1.0) -> int:
    """Other processes that used more than half a core over ``seconds`` (from /proc)."""
    def ticks() -> dict[int, int]:
        out = {}
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) != os.getpid():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        parts = f.read().rsplit(")", 1)[1].split()
                    out[int(d)] = int(parts[11]) + int(parts[12])  # utime + stime
                except (OSError, IndexError, ValueError):
                    pass
        return out
    a = ticks()
    time.sleep(seconds)
    b = ticks()
    hz = os.sysconf("SC_CLK_TCK")
    return sum(1 for p, t in b.items() if p in a and (t - a[p]) / hz > 0.5 * seconds)


def section(name: str, cfg: BenchConfig, log) -> dict:
    if name == "train":
        from benchmarks.train import bench_train
        return bench_train(cfg, log)
    if name == "levers":
        from benchmarks.levers import bench_levers
        return bench_levers(cfg, log)
    if name == "generate":
        from benchmarks.generation import bench_generation
        return bench_generation(cfg, log)
    if name == "memory":
        from benchmarks.memory import bench_memory
        return bench_memory(cfg, log)
    if name == "serve":
        from benchmarks.serve import bench_serve_section
        return bench_serve_section(cfg, log)
    from benchmarks.store import bench_store
    return bench_store(cfg, log)


def run_section(name: str, args: list[str], log) -> dict:
    """One benchmark in a fresh process (its contenders side by side inside it), so that what
    an earlier benchmark left in the allocator and caches does not slow a later one."""
    fd, tmp = tempfile.mkstemp(prefix=f"properlm-bench-{name}-", suffix=".json")
    os.close(fd)
    keep = []
    skip = False
    for x in args:  # the parent's settings, minus what the child gets its own of
        if skip:
            skip = False
            continue
        if x in ("--only", "--out", "--section"):
            skip = True
            continue
        if x == "--check" or x.startswith(("--only=", "--out=", "--section=")):
            continue
        keep.append(x)
    cmd = [sys.executable, "-m", "benchmarks.run", *keep, "--section", name, "--out", tmp]
    p = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent)
    try:
        if p.returncode != 0:
            raise RuntimeError(f"benchmark section {name!r} failed (exit {p.returncode})")
        return json.loads(Path(tmp).read_text())
    finally:
        os.unlink(tmp)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model, small settings (< 1 minute)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a ratio falls below its target")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, the core count)")
    ap.add_argument("--users", type=int, default=None)
    ap.add_argument("--examples-per-user", type=int, default=None)
    ap.add_argument("--attention", choices=("eager", "sdpa"), default=None,
                    help="attention implementation of every contender (default eager)")
    ap.add_argument("--out", default=None, help="results JSON (default runs/bench/results[-quick].json)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="keep glibc's default malloc behaviour (see MALLOC_ENV in benchmarks/run.py)")
    ap.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # internal: one section, JSON to --out
    args = list(sys.argv[1:] if argv is None else argv)
    a = ap.parse_args(args)
    if not a.default_malloc and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.run", *args], {**os.environ, **MALLOC_ENV})
    if a.section:  # child: one section, its result as JSON to --out
        cfg = (BenchConfig.quick_config if a.quick else BenchConfig)(
            **{k: v for k, v in (("users", a.users), ("examples_per_user", a.examples_per_user),
                                 ("threads", a.threads), ("attention", a.attention)) if v is not None})
        torch.set_num_threads(cfg.threads)
        if cfg.examples_per_user < cfg.oppu_batch:
            cfg.oppu_batch = cfg.examples_per_user
        Path(a.out).write_text(json.dumps(section(a.section, cfg, lambda m: print(m, flush=True))))
        return 0
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    load0 = os.getloadavg()
    kw = {k: v for k, v in (("users", a.users), ("examples_per_user", a.examples_per_user), ("threads", a.threads),
                            ("attention", a.attention)) if v is not None}
    cfg = BenchConfig.quick_config(**kw) if a.quick else BenchConfig(**kw)
    torch.set_num_threads(cfg.threads)  # quick: 1 (the tiny model gains nothing from more, see tests/conftest.py)
    if "oppu_batch" not in kw and cfg.examples_per_user < cfg.oppu_batch:
        cfg.oppu_batch = cfg.examples_per_user

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.time()
    res: dict = {"command": "python -m benchmarks.run " + " ".join(args),
                 "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
                 "config": cfg.to_dict(), "machine": machine_info()}
    res["machine"]["loadavg_start"] = list(load0)
    log(f"properlm benchmarks ({'quick, tiny-random' if a.quick else cfg.model}); {cfg.threads} torch threads; "
        f"load average {load0[0]:.2f}")
    others = busy_others()
    res["machine"]["busy_processes_at_start"] = others
    if others:
        log(f"  note: {others} other busy process(es) on this machine; ratios are measured side by side, absolute "
            f"rates will be low{'; with 2 threads per process a contended core slows small ops badly (--threads 1)' if cfg.threads > 1 else ''}")
    peaks = peak_sweep(seconds=0.5 if a.quick else 1.5)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    peaks[f"{'bf16' if compute_dtype() == torch.bfloat16 else 'fp32'}_2048_1thread"] = \
        matmul_peak(2048, 0.5 if a.quick else 1.5) / 1e9
    torch.set_num_threads(n)
    res["peaks_gflops"] = peaks
    log("matmul peaks (GFLOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))

    for sec in SECTIONS:
        if sec in only:  # --quick (a smoke check that must stay under a minute) runs them in this process
            res[sec] = section(sec, cfg, log) if a.quick else run_section(sec, args, log)
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    res["machine"]["busy_processes_at_end"] = busy_others()
    res["seconds"] = time.time() - t0
    res["checks"] = [{"what": w, "value": v, "target": t, "ok": ok} for w, v, t, ok in checks(res, a.quick)]

    out = Path(a.out or f"runs/bench/results{'-quick' if a.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print("\n" + summary(res))
    print("\ntargets:")
    for c in res["checks"]:
        print(f"  [{'ok' if c['ok'] else 'MISS'}] {c['what']}: {c['value']:.2f} (target {c['target']})")
    print(f"\n{res['seconds']:.0f} s; results in {out}")
    if a.check and not all(c["ok"] for c in res["checks"]):
        print("benchmark check failed: a ratio is below its target", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
