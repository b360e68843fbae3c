"""The user store: what one user costs, whatever the number of users.

Two measurements:

- ``add``: ``users add`` of one new user into a finished run whose store holds 10
  users, and into the same run with 10,000 users (tiny random model: the users
  are written straight into the store with the run's own shapes, and
  ``split.json`` lists them all, as a real 10,000-user run's would). Each add
  runs in a fresh process; measured: wall seconds of ``add_users`` and the bytes
  that process wrote (``wchar`` of ``/proc/self/io``: everything passed to
  write(2), logs and checkpoints included). Target: 10,000 vs 10 within 1.5x.
- ``cold_load``: reading one user who is not in memory into the inference cache
  (``UserCache.gather_users``: index lookup, sha256 of the file, ``safe_open``,
  the tensors on the model's device), embedded SmolLM2-135M shapes (90 sites,
  r=4: 3.0 MB of parameters). Before each read the user's files are dropped from
  the OS page cache (``posix_fadvise(DONTNEED)``), so the bytes come from disk.
  Target: median <= 50 ms; p99 reported.

    .venv/bin/python -m benchmarks.store [--users 10,10000] [--loads 200]
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

from benchmarks.common import BenchConfig

ROOT = Path(__file__).resolve().parent.parent


def _wchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


def base_run(root: Path) -> Path:
    """A finished tiny run (a few steps per stage) to add users to."""
    from properlm.run_config import DataConfig, GroupConfig, PopulationConfig, RunConfig, UserConfig
    from properlm.train.run import train

    cfg = RunConfig(base_model="tiny-random", progress=False, checkpoint_every=10 ** 9,
                    data=DataConfig(synth_users=12, n_targets=4, max_len=64),
                    population=PopulationConfig(max_steps=2), group=GroupConfig(max_steps=2),
                    user=UserConfig(max_steps=2))
    return train(cfg, root / "base")


def fill_store(run: Path, n: int) -> None:
    """Put ``n`` users (random LoRA + moments, the run's shapes) into the run's LoRA bank; list them in split.json."""
    from properlm.io import read_json, write_json
    from properlm.store.run import LORA, open_bank

    bank = open_bank(run, LORA)
    g = torch.Generator().manual_seed(0)
    have = len(bank)
    ids = [f"bulk{i:06d}" for i in range(max(0, n - have))]
    for s in range(0, len(ids), 1000):
        bank.put_many({u: {part: {k: torch.randn(shape, generator=g) if k != "steps" else torch.tensor([3])
                                  for k, shape in keys.items()} for part, keys in bank.schema.items()}
                       for u in ids[s:s + 1000]})
    split = read_json(run / "split.json")
    split["target"] = split["target"] + ids
    write_json(run / "split.json", split)


def add_child(run: str, user: str) -> dict:
    from properlm.train.examples import Example
    from properlm.train.users import add_users

    examples = [Example(user, f"Does the user love or hate this post? post: about coffee, part {j}.", "love")
                for j in range(4)]
    w0, t0 = _wchar(), time.perf_counter()
    add_users(run, [user], examples=examples)
    return {"seconds": time.perf_counter() - t0, "bytes_written": _wchar() - w0}


def bench_add(users: tuple[int, ...], repeats: int = 3, log=print) -> dict:
    root = Path(tempfile.mkdtemp(prefix="properlm-bench-store-"))
    try:
        base = base_run(root)
        rows = []
        for n in users:
            run = root / f"run{n}"
            shutil.copytree(base, run)
            t = time.perf_counter()
            fill_store(run, n)
            log(f"[store] a run with {n} users ready ({time.perf_counter() - t:.0f} s)")
            got = []
            for r in range(repeats):  # a new user each time: each add is one user's work
                cmd = [sys.executable, "-m", "benchmarks.store", "--add-child", str(run), f"newcomer{r}"]
                p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if p.returncode != 0:
                    raise RuntimeError(f"add child failed:\n{p.stderr[-3000:]}")
                got.append(json.loads(p.stdout.strip().splitlines()[-1]))
            row = {"users": n, "seconds": sorted(g["seconds"] for g in got)[len(got) // 2],
                   "bytes_written": sorted(g["bytes_written"] for g in got)[len(got) // 2], "repeats": got}
            rows.append(row)
            log(f"[store] users add into {n} users: {row['seconds']:.2f} s, {row['bytes_written'] / 2**20:.2f} MiB written")
        return {"settings": rows, "model": "tiny-random",
                "time_ratio": rows[-1]["seconds"] / rows[0]["seconds"],
                "bytes_ratio": rows[-1]["bytes_written"] / rows[0]["bytes_written"]}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def smollm2_shapes(r: int = 4) -> dict[str, tuple[int, ...]]:
    from transformers import AutoConfig

    from properlm.model.base import _smollm2_dir

    c = AutoConfig.from_pretrained(str(_smollm2_dir()))
    out = {}
    for i in range(c.num_hidden_layers):
        for name, (din, dout) in (("gate_proj", (c.hidden_size, c.intermediate_size)),
                                  ("up_proj", (c.hidden_size, c.intermediate_size)),
                                  ("down_proj", (c.intermediate_size, c.hidden_size))):
            out[f"layers.{i}.mlp.{name}.lora_A"] = (r, din)
            out[f"layers.{i}.mlp.{name}.lora_B"] = (dout, r)
    return out


def _drop_page_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_cold_load(n_loads: int = 200, log=print) -> dict:
    from properlm.store.cache import UserCache
    from properlm.train.user import bank_schema
    from properlm.store.user_store import UserStore

    root = Path(tempfile.mkdtemp(prefix="properlm-bench-load-"))
    try:
        shapes = smollm2_shapes()
        store = UserStore(root / "lora", schema=bank_schema(shapes))
        g = torch.Generator().manual_seed(0)
        users = [f"user{i:05d}" for i in range(n_loads)]
        for s in range(0, n_loads, 50):
            store.put_many({u: {p: {k: torch.randn(sh, generator=g) if k != "steps" else torch.tensor([1])
                                    for k, sh in keys.items()} for p, keys in store.schema.items()}
                            for u in users[s:s + 50]})
        cache = UserCache(store, "cpu", budget_bytes=1 << 40)
        cold, warm = [], []
        for u in users:
            shard = store.shard(u)
            _drop_page_cache([shard / "index.json", shard / store.entry(u)["parts"]["params"]["file"]])
            t = time.perf_counter()
            cache.gather_users([u])
            cold.append(time.perf_counter() - t)
            cache.evict(u)
            t = time.perf_counter()
            cache.gather_users([u])  # again, not in properlm's cache but in the OS page cache
            warm.append(time.perf_counter() - t)
        cold.sort()
        warm.sort()
        pick = lambda xs, q: 1000 * xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
        out = {"loads": n_loads, "model": "smollm2 shapes", "user_param_bytes": store.user_bytes("params"),
               "cold_ms_median": pick(cold, 0.5), "cold_ms_p99": pick(cold, 0.99),
               "page_cached_ms_median": pick(warm, 0.5), "page_cached_ms_p99": pick(warm, 0.99)}
        log(f"[store] cold load of one user ({out['user_param_bytes'] / 2**20:.1f} MiB): median "
            f"{out['cold_ms_median']:.1f} ms, p99 {out['cold_ms_p99']:.1f} ms (page-cached: "
            f"{out['page_cached_ms_median']:.1f} / {out['page_cached_ms_p99']:.1f} ms)")
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bench_store(cfg: BenchConfig, log=print) -> dict:
    return {"add": bench_add(cfg.store_users, repeats=cfg.store_repeats, log=log),
            "cold_load": bench_cold_load(cfg.store_loads, log=log)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--add-child", nargs=2, metavar=("RUN", "USER"), help="(internal) time one add in this process")
    ap.add_argument("--users", default="10,10000")
    ap.add_argument("--loads", type=int, default=200)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.add_child:
        print(json.dumps(add_child(*a.add_child)))
        return
    cfg = BenchConfig(store_users=tuple(int(x) for x in a.users.split(",")), store_loads=a.loads)
    print(json.dumps(bench_store(cfg), indent=1))


if __name__ == "__main__":
    main()
