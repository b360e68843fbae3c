"""The server under load: requests/s and latency at 1, 8 and 32 concurrent clients of 32 distinct users.

    .venv/bin/python -m benchmarks.serve --run runs/demo [--requests 64] [--max-tokens 16]
    .venv/bin/python -m benchmarks.serve --quick            # a tiny run, a few seconds
    .venv/bin/python -m benchmarks.serve --memory           # 10,000 users, a 1 MiB cache: memory stays bounded
    .venv/bin/python -m benchmarks.serve --onboarding [--run R] [--model smollm2]   # upload to first answers

Contenders, the same run, prompts, users and greedy decoding: ``properlm
serve`` with continuous batching (``--max-batch 32``) against the same server
decoding one request at a time (``--max-batch 1``), each a live process on a
free loopback port, driven by client threads over HTTP. Every load is bounded
(a fixed number of requests per setting). Reported per concurrency: requests/s,
p50 and p99 latency; the throughput ratio at 32 clients (target >= 5x) and
p99/p50 at each concurrency (target <= 2: no request starves); the latency of a
request whose user is not in the cache; and tokens/s per request while 32
stream at once. A run with fewer than 32 users with a LoRA gets synthetic
users added to a copy of its store (random adapters of the run's shapes: speed
does not depend on their values).

``--onboarding``: the time from a new user's history upload
(``POST /v1/users/{id}/history``) to their first answer by their group
(``X-Properlm-Model: group``) and to their first answer by their own LoRA
(``user-lora``), a client asking for one token every 0.2 s; once with the
run's instant encoder giving the embedding (``group.unseen=instant``) and once
with it fitted by gradient steps (``group.unseen=fit``: 2 passes over the
history, no step limit), on copies of one run. Users added later train their
LoRA for one pass over their history. Beside it, in this process and with no
server, the phases of one add timed alone: loading the final model, the instant
embedding, the fit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Does the user love, like, dislike or hate this post? post: Yesterday the group chat was all about {}."
TOPICS = ("jazz", "soccer", "coffee", "taxes", "robots", "hiking", "poetry", "sushi")
KEY = "bench-admin"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, run: Path, *args: str, threads: int | None = None):
        import httpx

        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PROPERLM_ADMIN_KEY": KEY}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen([sys.executable, "-m", "properlm.cli", "serve", "--run", str(run), "--port",
                                      str(self.port), *args], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        t_end = time.time() + 300
        while time.time() < t_end:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("server did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def prepare(run: Path, n_users: int, work: Path) -> tuple[Path, list[str]]:
    """A copy of the run whose LoRA bank has at least ``n_users`` users; the first ``n_users`` of them."""
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from properlm.store.run import open_bank

    copy = work / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval", "report", "checkpoints", "serve", "logs"))
    bank = open_bank(copy, "lora")
    users = sorted(bank.users())
    g = torch.Generator().manual_seed(0)
    extra = [f"bench{i:03d}" for i in range(max(0, n_users + 1 - len(users)))]  # +1: one never asked for
    bank.put_many({u: {"params": {k: torch.randn(s, generator=g) * 0.02 for k, s in bank.schema["params"].items()}}
                   for u in extra})
    users = sorted(bank.users())
    return copy, users


def load(url: str, jobs: list[tuple[str, str]], clients: int, max_tokens: int) -> dict:
    """Send ``jobs`` (user, prompt) from ``clients`` threads; latencies and wall time."""
    import httpx

    lat, lock, it = [], threading.Lock(), iter(list(enumerate(jobs)))
    errors = []

    def worker():
        with httpx.Client(timeout=600) as c:
            while True:
                with lock:
                    nxt = next(it, None)
                if nxt is None:
                    return
                _, (user, prompt) = nxt
                t = time.perf_counter()
                r = c.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                           json={"model": user, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                 "stop": []})
                dt = time.perf_counter() - t
                with lock:
                    (lat.append(dt) if r.status_code == 200 else errors.append(r.status_code))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")  # noqa: E731
    return {"clients": clients, "requests": len(jobs), "errors": errors, "seconds": wall,
            "requests_per_s": len(lat) / wall, "p50_s": q(0.5), "p99_s": q(0.99), "p99_over_p50": q(0.99) / q(0.5)}


def stream_rate(url: str, jobs: list[tuple[str, str]], max_tokens: int) -> float:
    """Median tokens/s of each stream while all of ``jobs`` stream at once."""
    import httpx

    rates = []

    def one(user, prompt):
        n, t = 0, time.perf_counter()
        with httpx.stream("POST", f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=600,
                          json={"model": user, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"text": ""' not in line:
                    n += 1
        rates.append(n / (time.perf_counter() - t))

    ths = [threading.Thread(target=one, args=j) for j in jobs]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    rates.sort()
    return rates[len(rates) // 2]


def bench_serve(run: Path, requests: int, max_tokens: int, threads: int | None, log=print) -> dict:
    work = Path(tempfile.mkdtemp(prefix="properlm-bench-serve-"))
    try:
        copy, users = prepare(run, 32, work)
        cold_user, users = users[32], users[:32]
        jobs = [(users[i % 32], PROMPT.format(TOPICS[i % len(TOPICS)])) for i in range(requests)]
        out = {"users": 32, "requests_per_setting": requests, "max_tokens": max_tokens, "settings": {}}
        for name, args in (("batched", ("--max-batch", "32")), ("one_at_a_time", ("--max-batch", "1"))):
            srv = Server(copy, *args, "--timeout", "3600", threads=threads)
            try:
                load(srv.url, jobs[:32], 32, max_tokens)  # warm-up: every user read once, kernels warm
                rows = {}
                for c in (1, 8, 32):
                    rows[c] = load(srv.url, jobs[:max(c, requests // (4 if c == 1 else 1))], c, max_tokens)
                    log(f"[serve] {name}, {c} clients: {rows[c]['requests_per_s']:.2f} req/s, p50 "
                        f"{rows[c]['p50_s']:.2f} s, p99 {rows[c]['p99_s']:.2f} s")
                out["settings"][name] = rows
                if name == "batched":
                    t = time.perf_counter()
                    load(srv.url, [(cold_user, PROMPT.format("jazz"))], 1, max_tokens)
                    out["uncached_user_latency_s"] = time.perf_counter() - t
                    out["warm_single_latency_s"] = rows[1]["p50_s"]
                    out["stream_tokens_per_s_per_request_32"] = stream_rate(srv.url, jobs[:32], max_tokens)
                    log(f"[serve] uncached user {out['uncached_user_latency_s']:.2f} s (warm {rows[1]['p50_s']:.2f} s);"
                        f" 32 streams: {out['stream_tokens_per_s_per_request_32']:.1f} tokens/s each")
            finally:
                srv.stop()
        b, s = out["settings"]["batched"], out["settings"]["one_at_a_time"]
        out["throughput_ratio_32"] = b[32]["requests_per_s"] / s[32]["requests_per_s"]
        out["worst_p99_over_p50_batched"] = max(r["p99_over_p50"] for r in b.values())
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _short_run(work: Path, model: str, *overrides: str) -> Path:
    """A run of ``model`` trained for a few steps: the server's speed does not depend on the weights."""
    out = work / "run"
    subprocess.run([sys.executable, "-m", "properlm.cli", "train", "--all", "--out", str(out),
                    f"base_model={model}", "progress=false", "data.synth_users=16", "data.n_targets=4",
                    "population.max_steps=2", "group.max_steps=2", "user.max_steps=2", "group.unseen_epochs=1",
                    *overrides], check=True, cwd=ROOT, capture_output=True)
    return out


def _onboarding_copy(run: Path, work: Path, unseen: str) -> Path:
    """A copy of the run, no server state, whose users added later get their embedding as ``unseen`` says and
    train their LoRA for one pass over their history (no step limit)."""
    sys.path.insert(0, str(ROOT / "src"))
    import dataclasses

    from properlm.config import save_config
    from properlm.store.run import read_config

    copy = work / f"run-{unseen}"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval", "report", "checkpoints", "serve", "logs"))
    cfg = read_config(copy)
    cfg = dataclasses.replace(cfg, group=dataclasses.replace(cfg.group, unseen=unseen, unseen_epochs=2, max_steps=None),
                              user=dataclasses.replace(cfg.user, max_steps=None, epochs=1))
    save_config(cfg, copy / "config.yaml")
    return copy


def _history(records: int) -> list[tuple[str, str]]:
    return [(PROMPT.format(TOPICS[i % len(TOPICS)]), ("love", "hate")[i % 2]) for i in range(records)]


def time_onboarding(url: str, user: str, records: int, timeout: float = 1800, poll: float = 0.2) -> dict:
    """Upload ``records`` history records of a new user, then ask for one token every ``poll`` seconds until
    their LoRA answers: seconds from the upload to the first ``group`` and the first ``user-lora`` answer."""
    import httpx

    head = {"Authorization": f"Bearer {KEY}"}
    body = "".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in _history(records))
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/users/{user}/history", headers=head, content=body.encode(), timeout=600)
    r.raise_for_status()
    out = {"records": records, "upload_s": time.perf_counter() - t0, "first_group_s": None, "first_user_lora_s": None,
           "answers": {}}
    with httpx.Client(timeout=600) as c:
        while time.perf_counter() - t0 < timeout and out["first_user_lora_s"] is None:
            a = c.post(f"{url}/v1/completions", headers=head,
                       json={"model": user, "prompt": PROMPT.format("jazz"), "max_tokens": 1, "temperature": 0})
            kind, at = a.headers.get("x-properlm-model", str(a.status_code)), time.perf_counter() - t0
            out["answers"][kind] = out["answers"].get(kind, 0) + 1
            key = {"group": "first_group_s", "user-lora": "first_user_lora_s"}.get(kind)
            if key and out[key] is None:
                out[key] = at
            time.sleep(poll)
    out["job"] = httpx.get(f"{url}/v1/jobs/{r.json()['job']['id']}", headers=head, timeout=60).json()
    return out


def phase_times(run: Path, records: int) -> dict:
    """Seconds of the phases of one user's add, alone in this process: the final model loaded, the instant
    embedding (twice: the first call warms up), the fit (2 passes over the history)."""
    sys.path.insert(0, str(ROOT / "src"))
    from properlm.store.run import load_model, read_config
    from properlm.train.examples import Example
    from properlm.train.group import fit_unseen, load_encoder
    from properlm.train.instant import instant_embeddings

    cfg = read_config(run)
    ex = [Example("phase-user", p, r) for p, r in _history(records)]
    t = time.perf_counter()
    pm, tok = load_model(cfg, run, "done")
    out = {"load_final_model_s": time.perf_counter() - t}
    enc = load_encoder(run)
    for i in range(2):
        t = time.perf_counter()
        instant_embeddings(pm, tok, enc, ex, cfg.data.max_len, cfg.bf16)
        out[f"instant_embedding_s_{i + 1}"] = time.perf_counter() - t
    scratch = Path(tempfile.mkdtemp(prefix="properlm-bench-fit-"))
    try:
        t = time.perf_counter()
        fit_unseen(cfg, scratch, pm, tok, ex, stage="bench")
        out["fit_s"] = time.perf_counter() - t
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def bench_onboarding(run: Path, records: int = 20, threads: int | None = None, log=print) -> dict:
    """Upload to first group answer and to first user-LoRA answer, instant embedding against fitted one."""
    work = Path(tempfile.mkdtemp(prefix="properlm-bench-onboard-"))
    try:
        out = {"records": records, "routings": {}}
        out["phases_alone"] = phase_times(_onboarding_copy(run, work / "phases", "fit"), records)
        log(f"[serve] one add's phases alone: {out['phases_alone']}")
        for unseen in ("instant", "fit"):
            srv = Server(_onboarding_copy(run, work, unseen), "--timeout", "3600", threads=threads)
            try:
                res = time_onboarding(srv.url, f"onboard-{unseen}", records)
            finally:
                srv.stop()
            res["job_state"] = res.pop("job").get("state")
            out["routings"][unseen] = res
            log(f"[serve] onboarding, {unseen} embedding: first group answer {res['first_group_s']} s, first "
                f"user-LoRA answer {res['first_user_lora_s']} s after the upload ({records} records)")
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_serve_section(cfg, log=print) -> dict:
    """``python -m benchmarks.run --only serve``: the load benchmark on a short run of ``cfg.model``
    (the tiny model, 16 requests and 8 tokens with ``--quick``)."""
    work = Path(tempfile.mkdtemp(prefix="properlm-bench-serve-run-"))
    try:
        run = _short_run(work, "tiny-random" if cfg.quick else cfg.model)
        res = bench_serve(run, 16 if cfg.quick else 64, 8 if cfg.quick else cfg.gen_tokens, cfg.threads, log)
        return {**res, "model": "tiny-random" if cfg.quick else cfg.model}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _rss(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def bench_memory_bound(n_users: int = 10000, asked: int = 3000, cache_mb: float = 1.0, log=print) -> dict:
    """A tiny run with ``n_users`` in its store, served with a small cache: RSS after 50 users vs after ``asked``."""
    work = Path(tempfile.mkdtemp(prefix="properlm-bench-servemem-"))
    try:
        copy, users = prepare(_short_run(work / "base", "tiny-random"), n_users, work)
        srv = Server(copy, "--cache-mb", str(cache_mb), threads=1)
        try:
            jobs = [(users[i], "hi") for i in range(asked)]
            load(srv.url, jobs[:50], 8, 2)
            after_50 = _rss(srv.proc.pid)
            res = load(srv.url, jobs, 8, 2)
            after = _rss(srv.proc.pid)
            import httpx

            cache = httpx.get(f"{srv.url}/health").json()["cache"]
        finally:
            srv.stop()
        out = {"model": "tiny-random", "users_in_store": len(users), "distinct_users_asked": asked,
               "cache_mb": cache_mb, "rss_after_50_users_mib": after_50 / 2**20,
               "rss_after_all_mib": after / 2**20, "ratio": after / after_50, "errors": len(res["errors"]),
               "cache_at_end": cache}
        log(f"[serve] {asked} distinct users of {len(users)}, cache {cache_mb} MiB: RSS {after_50 / 2**20:.0f} MiB after "
            f"50 users, {after / 2**20:.0f} MiB after {asked}")
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="a trained run (default with --quick: a tiny one made here)")
    ap.add_argument("--requests", type=int, default=64, help="requests per setting at 8 and 32 clients")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="OMP threads of the server")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="results JSON")
    ap.add_argument("--memory", action="store_true",
                    help="instead: a tiny run with 10,000 users served with a 1 MiB cache, RSS as 1,000 distinct users ask")
    ap.add_argument("--onboarding", action="store_true",
                    help="instead: seconds from a new user's upload to their first group and first user-LoRA answer, "
                         "instant embedding against fitted (a short run of --model unless --run)")
    ap.add_argument("--model", default="smollm2", help="base model of the short run --onboarding trains")
    ap.add_argument("--records", type=int, default=20, help="history records of the --onboarding user")
    a = ap.parse_args(argv)
    if a.onboarding:
        tmp = Path(tempfile.mkdtemp(prefix="properlm-bench-onboard-run-"))
        try:
            run = Path(a.run) if a.run else _short_run(tmp, "tiny-random" if a.quick else a.model,
                                                       "group.unseen=instant")
            sys.path.insert(0, str(ROOT / "src"))
            from properlm.store.run import read_config

            res = {"model": read_config(run).base_model, **bench_onboarding(run, a.records, a.threads)}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(json.dumps(res, indent=1))
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1))
        return 0
    if a.memory:
        res = bench_memory_bound()
        print(json.dumps(res, indent=1))
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1))
        return 0
    tmp = None
    run = Path(a.run) if a.run else None
    if run is None:
        if not a.quick:
            ap.error("--run is needed (or --quick)")
        tmp = Path(tempfile.mkdtemp(prefix="properlm-bench-serve-run-"))
        run = _short_run(tmp, "tiny-random")
    try:
        res = bench_serve(run, 16 if a.quick else a.requests, 8 if a.quick else a.max_tokens, a.threads)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
