"""Forgetting users: every trace of a user removed from a run directory.

    properlm users delete --run runs/demo --users u007

What of a user a run directory can hold, and what :func:`forget_users` does with it:

=======================================  ====================================================
user banks (``RUN/store/*``)             the user's entry and files removed (LoRA, AdamW
                                         moments, stage-2 embedding, OPPU baselines' LoRAs)
``split.json``                           the id removed from the training and target lists
checkpoints (``RUN/checkpoints``,        every checkpoint holding the user's rows removed
``RUN/baselines/*/checkpoints``)         (resuming that stage then restarts it)
``RUN/baselines/pag/profiles.json``      the user's cached profile removed
``RUN/eval/``                            the user's golds, predictions and per-user scores
                                         removed; each method's metrics recomputed without them;
                                         ``unseen.json`` (``properlm instant compare``) removed
``RUN/report/``                          removed when it holds the user's rows (rerun
                                         ``properlm report``)
``RUN/serve/``                           the server's records of the user (API keys, onboarding
                                         jobs, uploaded history) removed
``RUN/{logs,checkpoints}/add-users/``    the logs and checkpoints of a ``users add`` of the user
                                         (an onboarding job, or several users at once) that
                                         failed or was killed
=======================================  ====================================================

Each file is rewritten atomically, only when it holds the user. A delete first
writes its intent (``RUN/forgetting/<sha256 of the id>.json``) and removes it
last: a delete killed half way is finished by the next ``users delete`` (or
``--resume``) and by :func:`properlm.load_run` before anything is served, and
training refuses the run until then; so each user is either as before or
wholly forgotten. What the user's data contributed to the shared population
and group weights is not unlearned.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from properlm.errors import ProperError
from properlm.io import read_json, write_json
from properlm.store.run import banks, is_run, mark_deleted, pending_forgets
from properlm.store.user_store import user_hash
from properlm.train.loop import checkpoints_holding

def forget_users(run_dir: str | Path, user_ids: list[str]) -> dict[str, int]:
    """Remove everything of ``user_ids`` from the run directory; counts of what was removed, by kind."""
    run_dir = Path(run_dir)
    if not is_run(run_dir):
        raise ProperError(f"{run_dir}: not a properlm run directory (no config.yaml)")
    ids = set(user_ids) | set(pending_forgets(run_dir, known=user_ids))
    intents = {u: run_dir / "forgetting" / f"{user_hash(u)}.json" for u in ids}
    for u, p in intents.items():
        write_json(p, {"user": u})  # (again: a damaged intent of a user named now is rewritten whole)
    removed: dict[str, int] = {}

    def count(what: str, n: int) -> None:
        if n:
            removed[what] = removed.get(what, 0) + n
        _drill_point()

    for name, bank in banks(run_dir).items():
        for u in sorted(ids):
            count(f"{name} entries", int(bank.delete(u)))
    mark_deleted(run_dir)  # a server holding them in memory drops them at its next request
    count("split entries", _scrub_split(run_dir / "split.json", ids))
    for u in ids:
        for ck in checkpoints_holding(run_dir, u):
            shutil.rmtree(ck, ignore_errors=True)
            count("checkpoints", 1)
    count("PAG profiles", _scrub_profiles(run_dir / "baselines" / "pag" / "profiles.json", ids))
    count("evaluated queries", _scrub_eval(run_dir, ids))
    report = run_dir / "report"
    if report.is_dir() and _mentions(report, ids):
        shutil.rmtree(report)
        count("report directories", 1)
    from properlm.serve.jobs import forget_serve_state
    from properlm.train.users import add_stage, adds_holding, clean_add

    count("server records (keys, jobs, uploads)", sum(forget_serve_state(run_dir, u) for u in ids))
    # A one-user add that failed or was killed keeps its logs and checkpoints (to resume); they are
    # the loss on the user's own data, under a name derived from their id (onboarding adds one user).
    count("add logs and checkpoints", sum(clean_add(run_dir, add_stage([u])) for u in ids))
    # An add of several users that crashed: found by the list of its users it keeps beside its logs.
    count("add logs and checkpoints", sum(clean_add(run_dir, st) for st in adds_holding(run_dir, ids)))
    for p in intents.values():  # done: the intent, the last file that names the user, goes
        p.unlink(missing_ok=True)
    return removed


def complete_pending(run_dir: str | Path) -> list[str]:
    """Finish deletes that were interrupted; the users they forgot."""
    pending = pending_forgets(run_dir)
    if pending:
        forget_users(run_dir, pending)
    return pending


_DRILL = {"n": 0}


def _drill_point() -> None:
    """Crash drills (scripts/crash_drills.py): ``PROPERLM_DRILL_KILL_AT=k`` SIGKILLs this process at the k-th step."""
    at = os.environ.get("PROPERLM_DRILL_KILL_AT")
    if at:
        _DRILL["n"] += 1
        if _DRILL["n"] == int(at):
            os.kill(os.getpid(), signal.SIGKILL)


def _mentions(root: Path, ids: set[str]) -> bool:
    """Whether any file under ``root`` holds one of ``ids`` as is, JSON-escaped or CSV-quoted."""
    forms = {f for u in ids for f in (u, json.dumps(u)[1:-1], json.dumps(u, ensure_ascii=False)[1:-1],
                                      u.replace('"', '""'))}
    needles = [f.encode("utf-8", "surrogatepass") for f in forms]
    for f in root.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            if any(n in data for n in needles):
                return True
    return False


def _scrub_split(path: Path, ids: set[str]) -> int:
    if not path.exists():
        return 0
    split = read_json(path)
    n = 0
    for key in ("train", "target"):
        kept = [u for u in split.get(key, []) if u not in ids]
        n += len(split.get(key, [])) - len(kept)
        split[key] = kept
    if n:
        write_json(path, split)
    return n


def _scrub_profiles(path: Path, ids: set[str]) -> int:
    if not path.exists():
        return 0
    cached = read_json(path)
    if not isinstance(cached, dict):
        return 0
    kept = {k: v for k, v in cached.items() if k not in ids}
    if len(kept) != len(cached):
        write_json(path, kept)
    return len(cached) - len(kept)


def _scrub_eval(run_dir: Path, ids: set[str]) -> int:
    """Remove the users' rows from every evaluation output; recompute the methods' metrics without them."""
    from properlm.data.tasks import get_task
    from properlm.evaluate.evaluate import write_csv
    from properlm.evaluate.metrics import score

    eval_dir = run_dir / "eval"
    if not eval_dir.is_dir():
        return 0
    golds_path = eval_dir / "golds.json"
    gold = {}
    dropped = 0
    if golds_path.exists():
        g = read_json(golds_path)
        keep = [x for x in g.get("golds", []) if x.get("user_id") not in ids]
        dropped = len(g.get("golds", [])) - len(keep)
        gold = {x["id"]: x["output"] for x in keep}
        if dropped:
            write_json(golds_path, {**g, "golds": keep})
    summary_path = eval_dir / "summary.json"
    summary = read_json(summary_path) if summary_path.exists() else None
    for method_dir in sorted(p for p in eval_dir.iterdir() if p.is_dir()):
        preds_path, per_user_path = method_dir / "predictions.json", method_dir / "per_user.json"
        if not preds_path.exists():
            continue
        p = read_json(preds_path)
        keep = [x for x in p.get("golds", []) if x.get("user_id") not in ids]
        per_user = read_json(per_user_path) if per_user_path.exists() else []
        kept_rows = [r for r in per_user if r.get("user_id") not in ids]
        if len(keep) == len(p.get("golds", [])) and len(kept_rows) == len(per_user):
            continue
        write_json(preds_path, {**p, "golds": keep})
        scores_path = method_dir / "scores.json"
        entry = read_json(scores_path) if scores_path.exists() else {}
        task = get_task(entry["task"]) if entry.get("task") else None
        scored = [(x["output"], gold[x["id"]]) for x in keep if x["id"] in gold]
        if task is not None and entry.get("metrics"):  # no query left: no metrics, not the old ones
            entry["metrics"] = (score(task.kind, [a for a, _ in scored], [b for _, b in scored], task.labels)
                                if scored else {})
        entry["n_users"] = len(kept_rows) if per_user else entry.get("n_users")
        entry["n_queries"] = len(keep)
        write_json(scores_path, entry)
        write_json(per_user_path, kept_rows)
        cols = ["user_id", "history_len", "n_queries", *(task.metric_names if task else [])]
        write_csv(method_dir / "per_user.csv", kept_rows, cols)
        if summary is not None and method_dir.name in summary.get("methods", {}):
            summary["methods"][method_dir.name].update({k: entry.get(k) for k in ("metrics", "n_users", "n_queries")})
    if summary is not None:
        write_json(summary_path, summary)
    if dropped:  # `properlm instant compare`'s aggregate over the targets, with theirs: rerun it
        (eval_dir / "unseen.json").unlink(missing_ok=True)
    return dropped
