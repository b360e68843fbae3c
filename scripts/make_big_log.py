"""Write a large, realistic JSONL interaction log in properlm's format (docs/data.md), seeded.

    python scripts/make_big_log.py --users 10000 --records 1000000 --out /tmp/big.jsonl [--bad-line N]

Users have Pareto-like activity (most write a few records, a few write thousands;
every user at least two); records are interleaved in time order like a real log, each
``{"user_id", "prompt", "response", "time"}`` with an ISO time. About one user in ten
marks its records with ``split`` (its last few are queries), and about one in five
gives its records an ``id``. The same arguments always write the same bytes.

``--bad-line N`` replaces line N with a record that lacks its ``prompt`` (what a
truncated export looks like), to check that the error names line N; ``--bad-kind``
picks another fault: ``json`` (a cut-off line) or ``utf8`` (a byte that is not UTF-8).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys

import numpy as np

NAMES = ("Sam", "Kim", "Lee", "Ana", "Raj", "Mia", "Tom", "Zoe", "Ali", "Eva", "Ben", "Ivy")
TOPICS = ("dinner tonight", "the quarterly report", "a movie on Friday", "the broken printer", "my flight",
          "the gym schedule", "a birthday gift", "the rent", "weekend hiking", "the new intern", "coffee",
          "the budget review", "tickets for the game", "the dentist", "a recipe for soup", "the school run")
TASKS = ("Reply to {name} about {topic}.", "Summarize my notes on {topic}.", "Write a short text to {name}: {topic}?",
         "Draft an email to {name} about {topic}.", "Remind me about {topic}.")
# Each user writes in one style: (openers, closers).
STYLES = ((("sure!", "sounds good,", "ok cool,"), ("see ya", "np", "cheers")),
          (("Certainly.", "Of course.", "Thank you."), ("Kind regards.", "Best wishes.", "I will follow up.")),
          (("ya", "lol ok", "kk"), ("gr8", "ttyl", "xx")),
          (("Noted:", "As discussed,", "Update:"), ("Thanks in advance.", "Please confirm.", "Regards.")),
          (("Yes!", "Great idea:", "Totally,"), ("let's do it!", "see you then!", "can't wait!")),
          (("Hmm,", "Not sure,", "Maybe"), ("will confirm later.", "let me think.", "ask me tomorrow.")))


def activity(rng: np.random.Generator, users: int, records: int) -> np.ndarray:
    """Records per user: Pareto-like, at least 2 each, summing to ``records``."""
    if records < 2 * users:
        raise SystemExit(f"need at least 2 records per user ({2 * users}), got {records}")
    w = rng.pareto(1.2, users)  # Lomax: most weights near 0, a heavy tail
    extra = records - 2 * users
    counts = np.floor(w / w.sum() * extra).astype(np.int64)
    rest = extra - int(counts.sum())  # < users: what flooring dropped
    counts[rng.choice(users, size=rest, replace=False)] += 1
    return counts + 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bad-line", type=int, default=None, help="make line N a bad record (1-based)")
    ap.add_argument("--bad-kind", default="field", choices=("field", "json", "utf8"))
    args = ap.parse_args(argv)
    if args.bad_line is not None and not 1 <= args.bad_line <= args.records:
        raise SystemExit(f"--bad-line must be within 1..{args.records}")

    rng = np.random.default_rng(args.seed)
    counts = activity(rng, args.users, args.records)
    owner = np.repeat(np.arange(args.users, dtype=np.int32), counts)
    rng.shuffle(owner)  # interleaved like a real log
    start = dt.datetime(2024, 1, 1)
    seconds = np.sort(rng.integers(0, 365 * 24 * 3600, size=args.records))
    style = rng.integers(0, len(STYLES), size=args.users)
    with_split = rng.random(args.users) < 0.1
    with_id = rng.random(args.users) < 0.2
    seen = np.zeros(args.users, dtype=np.int64)  # records written per user so far
    picks = rng.integers(0, 1 << 30, size=(args.records, 3))

    tmp = f"{args.out}.tmp"
    with open(tmp, "wb") as f:
        for i in range(args.records):
            u = int(owner[i])
            k = int(seen[u])
            seen[u] += 1
            a, b, c = (int(x) for x in picks[i])
            name, topic = NAMES[a % len(NAMES)], TOPICS[b % len(TOPICS)]
            openers, closers = STYLES[style[u]]
            rec = {"user_id": f"u{u:05d}",
                   "prompt": TASKS[c % len(TASKS)].format(name=name, topic=topic),
                   "response": f"{openers[a % 3]} {topic} with {name} {closers[c % 3]}",
                   "time": (start + dt.timedelta(seconds=int(seconds[i]))).isoformat()}
            if with_id[u]:
                rec["id"] = f"u{u:05d}-r{k}"
            if with_split[u]:
                rec["split"] = "query" if k >= counts[u] - min(3, counts[u] - 1) else "history"
            line = json.dumps(rec, ensure_ascii=False).encode()
            if args.bad_line == i + 1:
                if args.bad_kind == "field":
                    del rec["prompt"]
                    line = json.dumps(rec).encode()
                elif args.bad_kind == "json":
                    line = line[: len(line) // 2]
                else:
                    line = line.replace(b'"prompt": "', b'"prompt": "\xff', 1)
            f.write(line + b"\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {args.users} users, {args.records} records, {os.path.getsize(args.out)} bytes"
          + (f", bad line {args.bad_line} ({args.bad_kind})" if args.bad_line else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
