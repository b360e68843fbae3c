"""How the target users are routed at stage 2: the mean, the instant and the fitted embedding, and PROPER.

    properlm instant compare --run runs/demo [--routings mean instant fit proper] [--decode labels|expected]

The run's target users were not in stage 2. The stage-2 model answers their
held-out queries with each way of giving them an embedding:

==========  ================================================================
mean        the fallback, the mean learned embedding (``group.unseen=mean``)
instant     the run's instant encoder on their history, no gradient step
            (``group.unseen=instant``; :mod:`properlm.train.instant`)
fit         fitted on their history by gradient steps (``group.unseen=fit``;
            :func:`properlm.train.group.fit_unseen`), done afresh here
proper      the run's full PROPER: their stage-3 LoRA, with the embedding the
            run gave them (``properlm evaluate --methods proper``)
==========  ================================================================

Each is filed like an evaluated method under ``RUN/eval/stage2-<routing>/``
(``RUN/eval/proper/`` for PROPER), with ``@labels`` for label decoding (the best
label by summed likelihood) and ``@expected`` for the expected rating under the
labels' likelihoods (rating tasks: what MAE is best read on), but not
in ``summary.json`` (``properlm report`` leaves them out); ``RUN/eval/unseen.json``
has the comparison: per routing the metrics, the per-query mean with a 95%
interval from resampling users, the difference to ``mean`` (paired, resampling
users), and the seconds per user it took to give the targets their embedding
(for PROPER: the seconds per user of stage 3's training, from its log).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from properlm.errors import ProperError
from properlm.evaluate.evaluate import (MAX_NEW_TOKENS, SUFFIXES, _generate, _history_lengths, _label_decode,
                                        evaluate_run, lamp_predictions, load_targets, query_owners, score_predictions,
                                        write_csv)
from properlm.evaluate.metrics import per_example_scores
from properlm.evaluate.stats import PER_QUERY, cluster_bootstrap
from properlm.io import read_json, write_json

ROUTINGS = ("mean", "instant", "fit", "proper")
#: free generation; the best label by summed likelihood; the expected rating under the labels' likelihoods.
DECODES = ("free", "labels", "expected")
_SUFFIX = {"free": "", "labels": SUFFIXES["labels"], "expected": SUFFIXES["expected"]}
RESULT = "unseen.json"


def method_name(routing: str, decode: str = "free") -> str:
    """Where a routing's answers are filed in ``RUN/eval``: ``stage2-instant``, ``proper@labels`` ..."""
    base = "proper" if routing == "proper" else f"stage2-{routing}"
    return base + _SUFFIX[decode]


def target_embeddings(routing: str, cfg, run_dir: Path, pm, tok, examples) -> tuple[object | None, float]:
    """(an embedding bank holding the targets' embeddings, seconds it took), for ``instant`` or ``fit``;
    (None, 0) for ``mean``. Nothing of it is written to the run."""
    from properlm.train.group import fit_unseen, load_encoder
    from properlm.train.instant import instant_embeddings

    users = sorted({e.user_id for e in examples})
    if routing == "mean" or not users:
        return None, 0.0
    if routing == "instant":
        encoder = load_encoder(run_dir)
        t0 = time.perf_counter()
        embs = instant_embeddings(pm, tok, encoder, examples, cfg.data.max_len, cfg.bf16)
        seconds = time.perf_counter() - t0
        bank = pm.new_emb_bank(users, seed=cfg.seed)
        for u, tensors in embs.items():
            for k, v in tensors.items():
                bank.params[k][bank.index(u)] = v.to(bank.params[k].device)
        return bank, seconds
    from properlm.store.run import EMB, open_bank

    scratch = Path(tempfile.mkdtemp(prefix="properlm-fit-"))
    try:
        t0 = time.perf_counter()
        fit_unseen(cfg, scratch, pm, tok, examples, stage="compare/fit")
        seconds = time.perf_counter() - t0
        pm.eval()
        store = open_bank(scratch, EMB)
        bank = pm.new_emb_bank(users, seed=cfg.seed)
        for u in users:
            for k, v in store.get(u)["params"].items():
                bank.params[k][bank.index(u)] = v.to(bank.params[k].device)
        return bank, seconds
    finally:  # the scratch bank was read whole above: nothing of it is kept
        shutil.rmtree(scratch, ignore_errors=True)


def stage3_seconds_per_user(run_dir: Path, n_users: int) -> float | None:
    """Seconds per target user of the run's stage-3 training (from ``logs/user.jsonl``; None without one)."""
    log = run_dir / "logs" / "user.jsonl"
    if not log.exists() or not n_users:
        return None
    recs = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(recs) < 2:
        return None
    return (recs[-1]["time"] - recs[0]["time"]) * len(recs) / (len(recs) - 1) / n_users


def _file(run_dir: Path, task, targets, name: str, preds: dict[str, str], extra: dict) -> dict:
    """Write one routing's predictions and scores under ``RUN/eval/<name>`` (not in the summary)."""
    out = run_dir / "eval" / name
    write_json(out / "predictions.json", lamp_predictions(task, preds, query_owners(targets)))
    metrics, per_user = score_predictions(task, targets, preds, _history_lengths(targets))
    entry = {"method": name, "task": task.name, "n_users": len(targets), "n_queries": len(preds), **extra,
             "metrics": metrics}
    write_json(out / "scores.json", entry)
    write_json(out / "per_user.json", per_user)
    write_csv(out / "per_user.csv", per_user, ["user_id", "history_len", "n_queries", *task.metric_names])
    return entry


def _answer(model, tok, rows, task, settings: dict, decode: str, batch_size: int, progress: bool) -> dict[str, str]:
    """Query id -> answer: freely generated, the best label by summed likelihood, or the expected rating."""
    if decode in ("labels", "expected"):
        return _label_decode(model, tok, rows, task, settings, batch_size, "x")["x" + _SUFFIX[decode]]
    return _generate(model, tok, rows, settings, batch_size, "compare", progress)


def compare_unseen(run_dir: str | Path, routings: Sequence[str] | None = None, decode: str = "free",
                   batch_size: int = 32, max_prompt_tokens: int = 512, progress: bool = True,
                   n_boot: int = 10000) -> dict:
    """Answer the run's targets' queries with each routing, file them, and compare them (see the module doc).

    Returns:
        What ``RUN/eval/unseen.json`` holds: ``{"task", "metric", "n_users", "routings": {routing:
        {"method", "metrics", "per_query": {"mean", "ci95"}, "vs_mean": {"diff", "ci95", ...},
        "seconds_per_user", "seconds"}}}``.
    """
    from properlm.store.run import load_model
    from properlm.train.examples import user_examples

    run_dir = Path(run_dir)
    if decode not in DECODES:
        raise ProperError(f"unknown decoding {decode!r}: choose from {', '.join(DECODES)}")
    routings = list(dict.fromkeys(routings or ROUTINGS))
    bad = [r for r in routings if r not in ROUTINGS]
    if bad:
        raise ProperError(f"unknown routing {bad[0]!r}: choose from {', '.join(ROUTINGS)}")
    cfg, task, targets = load_targets(run_dir)
    if decode != "free" and not task.labels:
        raise ProperError(f"--decode {decode} needs a task with a label set; {task.name} is a {task.kind} task")
    if decode == "expected" and task.kind != "rating":
        raise ProperError(f"--decode expected is for rating tasks; {task.name} is a {task.kind} task")
    gold = {q.id: q.gold for u in targets for q in u.queries if q.gold is not None}
    if not gold:
        raise ProperError(f"{run_dir}: the target users' queries have no gold answers: nothing to compare")
    settings = {"max_new_tokens": MAX_NEW_TOKENS[task.kind], "do_sample": False, "max_prompt_tokens": max_prompt_tokens,
                "bf16": cfg.bf16, "seed": cfg.seed}
    history = [e for u in targets for e in user_examples(task.name, u, history=True)]
    preds: dict[str, dict[str, str]] = {}
    out: dict = {"task": task.name, "decode": decode, "n_users": len(targets), "routings": {}}
    stage2 = [r for r in routings if r != "proper"]
    if stage2:
        pm, tok = load_model(cfg, run_dir, "user")
        pm.eval()
        if pm.user_embs is None and set(stage2) - {"mean"}:
            raise ProperError(f"{run_dir}: stage 2 has no user embeddings (a text router): only mean applies")
        for routing in stage2:
            bank, seconds = target_embeddings(routing, cfg, run_dir, pm, tok, history)
            pm.user_embs = bank
            rows = [(q.id, task.query_prompt(q), None, u.id if bank is not None else None)
                    for u in targets for q in u.queries]
            preds[routing] = _answer(pm, tok, rows, task, settings, decode, batch_size, progress)
            extra = {"routing": routing, "embedding_seconds": round(seconds, 3), "settings": {**settings,
                                                                                             "decode": decode}}
            out["routings"][routing] = {"method": method_name(routing, decode), "seconds": round(seconds, 3),
                                        "seconds_per_user": seconds / len(targets) if targets else None,
                                        **_file(run_dir, task, targets, method_name(routing, decode),
                                                preds[routing], extra)}
        del pm
    if "proper" in routings:
        res = evaluate_run(run_dir, methods=["proper"], decode="free" if decode == "free" else "labels",
                           batch_size=batch_size,
                           max_prompt_tokens=max_prompt_tokens, progress=progress)
        name = method_name("proper", decode)
        filed = read_json(run_dir / "eval" / name / "predictions.json")["golds"]
        preds["proper"] = {p["id"]: p["output"] for p in filed}
        per_user = stage3_seconds_per_user(run_dir, len(targets))
        out["routings"]["proper"] = {"method": name, "metrics": res["methods"][name]["metrics"],
                                     "seconds_per_user": per_user, "seconds_note": "stage-3 training, from its log"}
    out.update(_intervals(task, targets, gold, preds, n_boot))
    write_json(run_dir / "eval" / RESULT, out)
    return out


def _intervals(task, targets, gold: dict[str, str], preds: dict[str, dict[str, str]], n_boot: int) -> dict:
    """Per routing: the per-query mean with a 95% interval over users, and the paired difference to ``mean``."""
    metric = PER_QUERY[task.kind][0]
    owner = query_owners(targets)
    ids = [q for q in gold if all(q in p for p in preds.values())]
    users = [owner[q] for q in ids]
    vals = {r: np.asarray(per_example_scores(task.kind, [p[q] for q in ids], [gold[q] for q in ids],
                                             task.labels)[metric], float) for r, p in preds.items()}
    rows = {}
    for r, v in vals.items():
        one = cluster_bootstrap(v, np.zeros_like(v), users, n=n_boot)
        rows[r] = {"per_query": {"mean": one["diff"], "ci95": one["ci95"], "n_users": one["n_users"],
                                 "n_queries": one["n_queries"]}}
        if "mean" in vals and r != "mean":
            d = cluster_bootstrap(v, vals["mean"], users, n=n_boot)
            rows[r]["vs_mean"] = {k: d[k] for k in ("diff", "ci95", "p_le_0", "n_users", "n_queries")}
    return {"metric": metric, "intervals": rows}


def format_comparison(result: dict) -> str:
    """A plain-text table of :func:`compare_unseen`'s result: one line per routing."""
    lines = [f"{result['task']}: {result['n_users']} target users, per-query {result['metric']} "
             f"(95% interval over users)"]
    for r, e in result["routings"].items():
        iv = result["intervals"].get(r, {})
        pq, vs = iv.get("per_query", {}), iv.get("vs_mean")
        spu = e.get("seconds_per_user")
        line = (f"{r:<8} {pq.get('mean', float('nan')):.4f} [{pq.get('ci95', [0, 0])[0]:.4f}, "
                f"{pq.get('ci95', [0, 0])[1]:.4f}]")
        if vs:
            line += f"  vs mean {vs['diff']:+.4f} [{vs['ci95'][0]:+.4f}, {vs['ci95'][1]:+.4f}]"
        line += f"  {'-' if spu is None else f'{spu:.3f}'} s/user"
        lines.append(line)
    return "\n".join(lines)
