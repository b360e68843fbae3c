"""Data that streams: ``properlm data inspect`` / ``data convert`` on a generated 1M-record JSONL log.

    python -m benchmarks.data_stream [--users 10000] [--records 1000000] [--work /tmp/properlm-data-bench]
                                     [--baseline] [--check] [--json results.json]

Writes the log with ``scripts/make_big_log.py`` (seeded; kept in ``--work`` and reused
when it is already there), then runs each command in its own subprocess and reports its
wall time and peak RSS. Each command runs under a small wrapper process that starts it,
waits, and reads ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, so every number is
that one command's peak. Then a copy of the log with a bad record planted near its end
(``--bad-line records - 10``): the time until ``inspect`` and ``convert`` report it, and
a check that the error names the line and that ``convert`` wrote nothing.

``--baseline`` also measures the in-memory path the commands used before streaming
(``load_dataset`` then ``inspect_dataset`` / ``export_lamp``), and checks that it
prints the same summary; ``--baseline-src DIR`` runs that path from another checkout's
``src`` (the code before streaming: ``git archive 7326926 src | tar -x -C /tmp/old``,
then ``--baseline-src /tmp/old/src``). ``--check`` exits 1 when ``inspect``'s peak RSS
is over the target (1 GiB).
"""

from __future__ import annotations

import argparse
import datetime as dt
import filecmp
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_INSPECT_RSS = 1 << 30  # bytes

# Runs argv[1:], then prints {"rc", "wall_s", "maxrss_kb"} of that child as the last line of stderr.
_WRAPPER = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call(sys.argv[1:])
wall = time.perf_counter() - t
print(json.dumps({"rc": rc, "wall_s": wall, "maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}),
      file=sys.stderr)
"""

_IN_MEMORY_INSPECT = """
import json, sys
from properlm.data import inspect_dataset, load_dataset
print(json.dumps(inspect_dataset(load_dataset(sys.argv[1])), indent=2))
"""

_IN_MEMORY_CONVERT = """
import sys
from properlm.data import export_lamp, load_dataset
export_lamp(load_dataset(sys.argv[1]), sys.argv[2])
"""


def measure(cmd: list[str], stdout: Path | None = None, src: Path | None = None) -> dict:
    """Run ``cmd`` under the wrapper (properlm from ``src``); its rc, wall time, peak RSS (bytes) and stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(src or ROOT / "src")}
    with open(stdout or os.devnull, "w") as out:
        p = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], stdout=out, stderr=subprocess.PIPE,
                           text=True, env=env, cwd=ROOT)
    lines = p.stderr.strip().splitlines()
    stats = json.loads(lines[-1])
    return {"rc": stats["rc"], "wall_s": round(stats["wall_s"], 2), "peak_rss": stats["maxrss_kb"] * 1024,
            "stderr": "\n".join(lines[:-1])}


def properlm(*args: str) -> list[str]:
    return [sys.executable, "-m", "properlm.cli", *args]


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def make_log(path: Path, users: int, records: int, *extra: str) -> dict:
    if path.exists() and not extra:
        return {"reused": True, "bytes": path.stat().st_size}
    r = measure([sys.executable, str(ROOT / "scripts" / "make_big_log.py"), "--users", str(users),
                 "--records", str(records), "--out", str(path), *extra])
    if r["rc"] != 0:
        raise SystemExit(f"make_big_log failed: {r['stderr']}")
    return {"reused": False, "bytes": path.stat().st_size, "wall_s": r["wall_s"]}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = "load %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = ""
    return f"{os.cpu_count()} CPUs ({cpu}), {load}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--work", default="/tmp/properlm-data-bench", help="where the logs and outputs go")
    ap.add_argument("--baseline", action="store_true", help="also measure the in-memory path")
    ap.add_argument("--baseline-src", default=None, help="run the in-memory path from this src directory")
    ap.add_argument("--check", action="store_true", help="exit 1 when inspect's peak RSS misses the target")
    ap.add_argument("--keep", action="store_true", help="keep the converted output")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"log-{args.users}u-{args.records}r.jsonl"
    bad_line = max(1, args.records - 10)
    bad_log = work / f"log-{args.users}u-{args.records}r-bad{bad_line}.jsonl"
    out = work / "converted"
    res: dict = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
                 "users": args.users, "records": args.records}
    res["log"] = make_log(log, args.users, args.records)
    print(f"log: {log} ({res['log']['bytes'] / 2**20:,.0f} MiB)", flush=True)

    shutil.rmtree(out, ignore_errors=True)
    inspect_out = work / "inspect.json"
    res["inspect"] = measure(properlm("data", "inspect", str(log), "--json"), inspect_out)
    summary = json.loads(inspect_out.read_text()) if res["inspect"]["rc"] == 0 else None
    res["summary"] = {k: summary[k] for k in ("users", "items", "queries", "history")} if summary else None
    print(f"inspect: {res['inspect']['wall_s']} s, peak RSS {mib(res['inspect']['peak_rss'])}", flush=True)
    res["convert"] = measure(properlm("data", "convert", str(log), "--out", str(out)))
    if res["convert"]["rc"] == 0:
        res["convert"]["out_bytes"] = sum(p.stat().st_size for p in out.iterdir())
    print(f"convert: {res['convert']['wall_s']} s, peak RSS {mib(res['convert']['peak_rss'])}, "
          f"wrote {res['convert'].get('out_bytes', 0) / 2**20:,.0f} MiB", flush=True)

    res["bad_log"] = make_log(bad_log, args.users, args.records, "--bad-line", str(bad_line))
    bad_out = work / "converted-bad"
    shutil.rmtree(bad_out, ignore_errors=True)
    for name, cmd in (("bad_inspect", properlm("data", "inspect", str(bad_log))),
                      ("bad_convert", properlm("data", "convert", str(bad_log), "--out", str(bad_out)))):
        r = res[name] = measure(cmd)
        r["names_line"] = r["rc"] == 2 and f"record line {bad_line}:" in r["stderr"]
        r["wrote_nothing"] = not bad_out.exists()
        print(f"{name}: {r['wall_s']} s to report it (rc {r['rc']}, names line {bad_line}: {r['names_line']}, "
              f"nothing written: {r['wrote_nothing']}): {r['stderr'].strip()[-160:]}", flush=True)
    bad_log.unlink()

    if args.baseline:
        mem_out = work / "inspect-in-memory.json"
        src = Path(args.baseline_src).resolve() if args.baseline_src else None
        res["baseline_src"] = str(src or ROOT / "src")
        res["inspect_in_memory"] = measure([sys.executable, "-c", _IN_MEMORY_INSPECT, str(log)], mem_out, src)
        if res["inspect_in_memory"]["rc"] == 0 and summary is not None:
            res["inspect_in_memory"]["same_summary"] = json.loads(mem_out.read_text()) == summary
        mem_dir = work / "converted-in-memory"
        shutil.rmtree(mem_dir, ignore_errors=True)
        res["convert_in_memory"] = measure([sys.executable, "-c", _IN_MEMORY_CONVERT, str(log), str(mem_dir)],
                                           None, src)
        if res["convert_in_memory"]["rc"] == 0 and res["convert"]["rc"] == 0:
            names = sorted(p.name for p in out.iterdir())
            res["convert_in_memory"]["same_files"] = names == sorted(p.name for p in mem_dir.iterdir()) and all(
                filecmp.cmp(out / n, mem_dir / n, shallow=False) for n in names)
        shutil.rmtree(mem_dir, ignore_errors=True)
        for name in ("inspect_in_memory", "convert_in_memory"):
            r = res[name]
            print(f"{name}: {r['wall_s']} s, peak RSS {mib(r['peak_rss'])} (rc {r['rc']})"
                  + (f", same summary: {r['same_summary']}" if "same_summary" in r else "")
                  + (f", same files as convert: {r['same_files']}" if "same_files" in r else ""), flush=True)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)

    ok = res["inspect"]["rc"] == 0 and res["inspect"]["peak_rss"] <= TARGET_INSPECT_RSS
    res["target"] = {"inspect_peak_rss_le_1GiB": ok}
    print(f"target: inspect peak RSS <= 1 GiB: {'met' if ok else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
