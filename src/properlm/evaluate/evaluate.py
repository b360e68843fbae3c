"""Evaluate PROPER and its baselines on a run's target users with LaMP's metrics.

    properlm evaluate --run runs/demo --methods stage1 proper rag

Every method answers the held-out queries of the run's target users (the users
stage 3 personalises; none of them trained stages 1-2), on the run's base model:

=========  ===================================================================
stage1     the merged stage-1 model: the non-personalised baseline
stage2     + the stage-2 group experts; target users were not in stage 2, so each
           routes with an embedding fitted on their own history after it
           (``group.unseen=fit``, the default; ``mean``: the fallback, the mean
           learned embedding)
proper     + each user's stage-3 LoRA and the LoRA-aware router, which also
           reads that stage-2 embedding (the method)
rag        stage 1 with the user's top-1 BM25 history item prepended (LaMP)
pag        rag with a base-LLM-written profile of the user in front (OPPU)
oppu-kv    stage 1 + a LoRA per user on attention k, v (trained when missing)
oppu-mlp   stage 1 + a LoRA per user on the FFN (trained when missing)
user-mean  rating tasks: the user's mean history rating (no model)
item-mean  rating tasks: the item's mean rating over all users' histories
user-bm25  any task: the answer of the user's history item closest to the query
           by BM25, RAG's retrieval with no model (evaluate/references.py)
=========  ===================================================================

Queries of many users decode together (each row gathers its own user's LoRA).
Decoding is greedy; ``sample=True`` uses OPPU's settings (temperature 0.1,
top-p 0.9, top-k 10). Files written::

    RUN/eval/golds.json                 the target queries' golds, LaMP's gold layout
    RUN/eval/<method>/predictions.json  {"task": "LaMP_3", "golds": [{"id", "output"}]}
    RUN/eval/<method>/scores.json       metrics over all target queries, settings, timing
    RUN/eval/<method>/per_user.csv      user_id, history_len (items trained on), n_queries, metrics (also .json)
    RUN/eval/summary.json               every evaluated method's metrics (updated in place)

:func:`score_prediction_file` files predictions made elsewhere (LaMP's layout,
e.g. OPPU's own output) under a new method name, scored on the same users.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Sequence

from properlm.config import load_config, to_dict
from properlm.data.schema import User
from properlm.data.tasks import Task, get_task
from properlm.errors import ProperError
from properlm.evaluate import baselines
from properlm.evaluate.metrics import score
from properlm.evaluate.references import REFERENCES, reference_predictions, references_for, user_bm25_predictions
from properlm.evaluate.retrieval import pag_prompt, rag_prompt
from properlm.io import read_json, write_json, write_text
from properlm.run_config import RunConfig

METHODS = ("stage1", "stage2", "proper", "rag", "pag", "oppu-kv", "oppu-mlp")
#: No model (evaluate/references.py): the user's and the item's mean rating (rating tasks only), and the
#: user's closest past answer by BM25 (any task).
REFERENCE_METHODS = REFERENCES
ALIASES = {"stage3": "proper", "non-personalized": "stage1", "oppu_kv": "oppu-kv", "oppu_mlp": "oppu-mlp"}
#: Answer length by task kind (OPPU decodes up to 200 tokens; labels and scores need a few).
MAX_NEW_TOKENS = {"classification": 16, "rating": 8, "generation": 64}
#: OPPU's decoding (OPPU.py): do_sample, temperature 0.1, top-p 0.9, top-k 10.
OPPU_SAMPLING = {"temperature": 0.1, "top_p": 0.9, "top_k": 10}
_STAGE_NEEDED = {"stage1": "population", "rag": "population", "pag": "population", "oppu-kv": "population",
                 "oppu-mlp": "population", "stage2": "group", "proper": "user"}


#: Ways of decoding: LaMP's free generation, or the best label by likelihood (classification, rating).
DECODES = ("free", "labels")
#: Suffixes of methods decoded another way: ``proper@labels`` (the label of highest summed log-likelihood),
#: ``proper@labels-norm`` (highest mean log-likelihood per token: length-normalised); for ratings also
#: ``proper@expected`` (the expected rating under the labels' likelihoods).
LABEL_SUFFIX, NORM_SUFFIX, EXPECTED_SUFFIX = "@labels", "@labels-norm", "@expected"
#: Each label decoding's suffix, by its name in the files' settings.
SUFFIXES = {"labels": LABEL_SUFFIX, "labels-norm": NORM_SUFFIX, "expected": EXPECTED_SUFFIX}


def canonical_method(name: str) -> str:
    """``"stage3"`` -> ``"proper"`` etc.; raises ProperError on an unknown method."""
    m = ALIASES.get(name, name)
    if m not in METHODS + REFERENCE_METHODS:
        raise ProperError(f"unknown method {name!r}: choose from {', '.join(METHODS + REFERENCE_METHODS)}")
    return m


def decoding_of(method: str) -> str:
    """How a filed method was decoded: ``free``, ``labels``, ``labels-norm`` or ``expected``."""
    for how, suffix in SUFFIXES.items():
        if method.endswith(suffix):
            return how
    return "free"


def write_csv(path: str | Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Write dict rows as CSV with a header (atomically); absent values are empty cells."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


# --- scoring ------------------------------------------------------------------------------------


def score_predictions(task: Task | str, users: Sequence[User], predictions: dict[str, str],
                      history_lengths: dict[str, int] | None = None) -> tuple[dict[str, float], list[dict]]:
    """LaMP's metrics over all users' labelled queries, and per user.

    Args:
        task: the task (its kind and labels choose the metrics).
        users: the evaluated users; their queries with a gold are scored.
        predictions: query id -> predicted output.
        history_lengths: user id -> history length to report (default: ``len(user.history)``;
            :func:`load_targets` gives the lengths the users trained on, after ``data.max_history``).

    Returns:
        ``(metrics, per_user)``: metrics over all scored queries (e.g.
        ``{"mae", "rmse"}``) and one row per user with a scored query:
        ``{"user_id", "history_len", "n_queries", <metric>: value}``. Per-user
        macro F1 is over the full label list on that user's few queries.

    Raises:
        ProperError: a scored query has no prediction, or nothing to score.
    """
    task = get_task(task) if isinstance(task, str) else task
    preds, golds, rows = [], [], []
    for u in users:
        qs = [q for q in u.queries if q.gold is not None]
        if not qs:
            continue
        missing = [q.id for q in qs if q.id not in predictions]
        if missing:
            raise ProperError(f"no prediction for query {missing[0]} of user {u.id} ({len(missing)} missing in all)")
        p, g = [predictions[q.id] for q in qs], [q.gold for q in qs]
        preds += p
        golds += g
        n_hist = (history_lengths or {}).get(u.id, len(u.history))
        rows.append({"user_id": u.id, "history_len": n_hist, "n_queries": len(qs),
                     **score(task.kind, p, g, task.labels)})
    if not golds:
        raise ProperError("no query with a gold answer among the evaluated users: nothing to score")
    return score(task.kind, preds, golds, task.labels), rows


def lamp_predictions(task: Task, predictions: dict[str, str], owners: dict[str, str] | None = None) -> dict:
    """Predictions in LaMP's gold layout: ``{"task": "LaMP_3", "golds": [{"id", "output"}]}``.

    With ``owners`` (query id -> user id) each entry also names its ``user_id`` (LaMP's
    readers ignore it), so a user's rows can be found and removed when they are forgotten.
    """
    owners = owners or {}
    return {"task": task.lamp_id, "golds": [{"id": k, "output": v, **({"user_id": owners[k]} if k in owners else {})}
                                            for k, v in predictions.items()]}


def query_owners(users: Sequence[User]) -> dict[str, str]:
    """Query id -> user id."""
    return {q.id: u.id for u in users for q in u.queries}


# --- models and prompts -------------------------------------------------------------------------


def load_targets(run_dir: str | Path) -> tuple[RunConfig, Task, list[User]]:
    """The run's config, task and target users (with their history and queries).

    Histories are cut to the latest ``data.max_history`` items as in training,
    and ``user.meta["history_len"]`` is that cut length: the items the user's
    adapters trained on, which is what "sparse" means in who gains (a cap of 12
    leaves a user with 95 commits as dense as one with 12).
    """
    from properlm.store.run import read_split
    from properlm.train.run import load_data

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ProperError(f"{run_dir}: not a run directory (no config.yaml); train one with properlm train")
    cfg = load_config(RunConfig, run_dir / "config.yaml")
    ds = load_data(cfg, truncate=False)
    split = read_split(run_dir)
    by_id = {u.id: u for u in ds.users}
    missing = [uid for uid in split["target"] if uid not in by_id]
    if missing:
        raise ProperError(f"{run_dir}: target user {missing[0]} of split.json is not in the run's data")
    targets = [by_id[uid] for uid in split["target"]]
    keep = getattr(cfg.data, "max_history", None)
    for u in targets:
        if keep is not None:
            u.history = u.history[-keep:]
        u.meta["history_len"] = str(len(u.history))
    return cfg, get_task(ds.task), targets


def _history_lengths(users: Sequence[User]) -> dict[str, int]:
    return {u.id: int(u.meta.get("history_len", len(u.history))) for u in users}


def _model(method: str, cfg: RunConfig, run_dir: Path, task: Task, targets: list[User]):
    """(model, tokenizer) for a method, training an OPPU baseline first when it is missing."""
    from properlm.store.run import load_model

    need = _STAGE_NEEDED[method]
    if not (run_dir / need).exists():
        raise ProperError(f"{run_dir}: method {method} needs stage {need}; train it first")
    if method in baselines.OPPU_TARGETS:
        if not baselines.oppu_trained(run_dir, method):
            baselines.train_oppu(cfg, run_dir, method, task.name, targets, resume=True)
        model, tok = baselines.load_oppu(cfg, run_dir, method)
    else:
        upto = {"stage2": "user", "proper": "done"}.get(method, "group")
        model, tok = load_model(cfg, run_dir, upto)
    model.eval()  # modules added after loading start in training mode (dropout on)
    return model, tok


def _rows(method: str, model, cfg: RunConfig, run_dir: Path, task: Task, targets: list[User], tok, rag_k: int,
          max_prompt_tokens: int, sample: bool, profile_tokens: int, progress: bool
          ) -> list[tuple[str, str, str | None, str | None]]:
    """(query id, prompt, LoRA user, embedding user) for every target query, labelled or not.

    A row's user is its LoRA user when the method has user LoRAs, and, for
    stage2 and proper, its embedding user when the run's embedding bank holds
    an embedding for that user: a target's embedding fitted on their own
    history after stage 2 (``group.unseen=fit``, the default) or, in the
    end-to-end ablation, learned with everything else. Otherwise (``unseen=mean``,
    a text router) there is none and the router uses its fallback, the mean
    learned embedding.
    """
    embs = getattr(model, "user_embs", None)
    profiles = {}
    if method == "pag":
        profiles = baselines.user_profiles(cfg, run_dir, targets, sample=sample, max_new_tokens=profile_tokens,
                                           progress=progress)
    out = []
    for u in targets:
        for q in u.queries:
            prompt = task.query_prompt(q)
            if method in ("rag", "pag"):
                profile = profiles.get(u.id, "")
                budget = max_prompt_tokens - (len(tok(profile)["input_ids"]) if profile else 0)
                prompt = rag_prompt(task, prompt, u.history, k=rag_k, tok=tok, max_length=max(budget, 64))
                prompt = pag_prompt(profile, prompt) if method == "pag" else prompt
            lora_user = u.id if method in ("proper", "oppu-kv", "oppu-mlp") else None
            emb_user = u.id if method in ("stage2", "proper") and embs is not None and u.id in embs else None
            out.append((q.id, prompt, lora_user, emb_user))
    return out


def _generate(model, tok, rows, settings: dict, batch_size: int, desc: str, progress: bool) -> dict[str, str]:
    """Answer all rows, many users per batch, prompts of similar length together; query id -> answer."""
    from tqdm import tqdm

    from properlm.model.generate import generate

    order = sorted(range(len(rows)), key=lambda i: len(rows[i][1]))  # less left padding per batch
    answers: dict[str, str] = {}
    bar = tqdm(total=len(rows), desc=desc, disable=not progress, dynamic_ncols=True)
    for s in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[s:s + batch_size]]
        outs = generate(model, tok, [r[1] for r in chunk], lora_users=[r[2] for r in chunk],
                        emb_users=[r[3] for r in chunk], batch_size=batch_size, **settings)
        answers.update({r[0]: o for r, o in zip(chunk, outs)})
        bar.update(len(chunk))
    bar.close()
    return {r[0]: answers[r[0]] for r in rows}  # back in query order


# --- the public entry ---------------------------------------------------------------------------


def evaluate_run(run_dir: str | Path, methods: Sequence[str] | None = None, sample: bool = False,
                 max_new_tokens: int | None = None, batch_size: int = 32, max_prompt_tokens: int = 512,
                 rag_k: int = 1, profile_max_new_tokens: int = 200, progress: bool = True,
                 decode: str = "free") -> dict:
    """Evaluate methods on a run's target users and write their predictions and scores.

    Args:
        run_dir: a run directory made by ``properlm train``.
        methods: any of :data:`METHODS` (aliases: ``stage3``) or, for rating tasks,
            :data:`REFERENCE_METHODS`; None: all of them that apply (the mean ratings only for
            rating tasks).
        sample: OPPU's sampling instead of greedy decoding (see the module doc).
        max_new_tokens: answer length limit; None: by task kind (:data:`MAX_NEW_TOKENS`).
        batch_size: queries decoded per forward pass (mixing users).
        max_prompt_tokens: prompt token budget (RAG and PAG prompts are built to fit it).
        rag_k: history items retrieved for RAG and PAG (the paper: 1).
        profile_max_new_tokens: length limit of PAG's profiles (OPPU: 200).
        progress: show progress bars.
        decode: ``"free"`` (LaMP's free generation, the default, comparable with the paper)
            or ``"labels"`` (classification and rating tasks: every label is scored by its
            likelihood as the answer and the best one is the prediction; filed as
            ``<method>@labels`` (summed log-likelihood) and ``<method>@labels-norm`` (mean
            log-likelihood per token, which does not favour short labels), and for ratings
            also ``<method>@expected``, the expected rating under the summed likelihoods).

    Returns:
        ``{"run_dir", "task", "lamp_id", "config", "methods": {method: {"metrics",
        "n_users", "n_queries", "generation_seconds", "settings", "per_user"}}}``;
        methods whose queries have no golds get predictions but no metrics.

    Raises:
        ProperError: not a run directory, a stage a method needs is missing, unknown method.
    """
    run_dir = Path(run_dir)
    if decode not in DECODES:
        raise ProperError(f"unknown decoding {decode!r}: choose from {', '.join(DECODES)}")
    cfg, task, targets = load_targets(run_dir)
    if decode == "labels" and not task.labels:
        raise ProperError(f"--decode labels needs a task with a label set; {task.name} is a {task.kind} task")
    default = METHODS + references_for(task.kind)
    methods = list(dict.fromkeys(canonical_method(m) for m in (methods or default)))
    gold_qs = [q for u in targets for q in u.queries if q.gold is not None]
    owners = query_owners(targets)
    write_json(run_dir / "eval" / "golds.json", lamp_predictions(task, {q.id: q.gold for q in gold_qs}, owners))
    settings = {"max_new_tokens": max_new_tokens or MAX_NEW_TOKENS[task.kind], "do_sample": sample,
                "max_prompt_tokens": max_prompt_tokens, "bf16": cfg.bf16, "seed": cfg.seed,
                **(OPPU_SAMPLING if sample else {})}
    result = {"run_dir": str(run_dir), "task": task.name, "lamp_id": task.lamp_id, "config": to_dict(cfg), "methods": {}}
    for method in methods:
        if method in REFERENCE_METHODS:
            from properlm.train.run import load_data

            try:
                preds = (user_bm25_predictions(task, targets) if method == "user-bm25"
                         else reference_predictions(task, load_data(cfg), targets)[method])
            except ValueError as e:
                raise ProperError(f"method {method}: {e}") from None
            result["methods"][method] = _write_method(run_dir, task, targets, method, preds, generation_seconds=0.0,
                                                      settings={})
            continue
        model, tok = _model(method, cfg, run_dir, task, targets)
        rows = _rows(method, model, cfg, run_dir, task, targets, tok, rag_k, max_prompt_tokens, sample,
                     profile_max_new_tokens, progress)
        t0 = time.time()
        if decode == "labels":
            for name, preds in _label_decode(model, tok, rows, task, settings, batch_size, method).items():
                result["methods"][name] = _write_method(run_dir, task, targets, name, preds,
                                                        generation_seconds=round(time.time() - t0, 3),
                                                        settings={**settings, "decode": decoding_of(name)})
            del model
            continue
        preds = _generate(model, tok, rows, settings, batch_size, f"eval {method}", progress)
        seconds = time.time() - t0
        del model
        entry = _write_method(run_dir, task, targets, method, preds, generation_seconds=round(seconds, 3),
                              settings={**settings, "decode": "free"})
        result["methods"][method] = entry
    return result


def _label_decode(model, tok, rows, task: Task, settings: dict, batch_size: int, method: str
                  ) -> dict[str, dict[str, str]]:
    """``{method@labels: preds, method@labels-norm: preds}`` (and ``method@expected`` for ratings) from the
    labels' likelihoods: the best label by summed log-likelihood, and by mean log-likelihood per token."""
    from properlm.model.scoring import expected_value, label_lengths, label_loglik, per_token

    labels = list(task.labels)
    ll = label_loglik(model, tok, [r[1] for r in rows], labels, lora_users=[r[2] for r in rows],
                      emb_users=[r[3] for r in rows], max_prompt_tokens=settings["max_prompt_tokens"],
                      batch_size=max(batch_size, len(labels)), bf16=settings["bf16"])
    out = {}
    for suffix, scores in ((LABEL_SUFFIX, ll), (NORM_SUFFIX, per_token(ll, label_lengths(tok, labels)))):
        out[method + suffix] = {r[0]: labels[b] for r, b in zip(rows, scores.argmax(-1).tolist())}
    if task.kind == "rating":
        ev = expected_value(ll, [float(x) for x in labels]).tolist()
        out[method + EXPECTED_SUFFIX] = {r[0]: f"{v:.4f}" for r, v in zip(rows, ev)}
    return out


def _write_method(run_dir: Path, task: Task, targets: list[User], method: str, preds: dict[str, str],
                  **extra) -> dict:
    """Write one method's predictions, scores and per-user scores; update the run's summary."""
    eval_dir = run_dir / "eval"
    out = eval_dir / method
    write_json(out / "predictions.json", lamp_predictions(task, preds, query_owners(targets)))
    entry = {"method": method, "task": task.name, "n_users": len(targets), "n_queries": len(preds), **extra,
             "metrics": {}}
    per_user: list[dict] = []
    if any(q.gold is not None for u in targets for q in u.queries):
        entry["metrics"], per_user = score_predictions(task, targets, preds, _history_lengths(targets))
    write_json(out / "scores.json", entry)
    write_json(out / "per_user.json", per_user)
    write_csv(out / "per_user.csv", per_user, ["user_id", "history_len", "n_queries", *task.metric_names])
    summary_path = eval_dir / "summary.json"
    summary = read_json(summary_path) if summary_path.exists() else {"methods": {}}
    summary.update({"run_dir": str(run_dir), "task": task.name, "lamp_id": task.lamp_id})
    summary["methods"][method] = {k: entry.get(k) for k in ("metrics", "n_users", "n_queries", "generation_seconds")}
    write_json(summary_path, summary)
    return {**entry, "per_user": per_user}


def score_prediction_file(run_dir: str | Path, path: str | Path, method: str = "external") -> dict:
    """Score a prediction file in LaMP's layout (from any system) on the run's target users.

    The file's outputs are filed under ``RUN/eval/<method>/`` like an evaluated
    method's, so they appear in the run's summary and reports.

    Args:
        run_dir: the run whose target users (and golds) are the reference.
        path: ``{"task": ..., "golds": [{"id", "output"}]}``; extra ids are ignored.
        method: the name to file the scores under.

    Returns:
        The method's entry, as in :func:`evaluate_run`'s ``"methods"``.

    Raises:
        ProperError: a malformed file, or a target query without a prediction.
    """
    if method in METHODS or method in ALIASES or not method or any(c in method for c in "/\\"):
        raise ProperError(f"cannot file external predictions as {method!r}: choose a new name (not a built-in method)")
    run_dir = Path(run_dir)
    _, task, targets = load_targets(run_dir)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("golds"), list):
        raise ProperError(f"{path}: expected LaMP's layout {{\"task\": ..., \"golds\": [{{\"id\", \"output\"}}]}}")
    given = {str(p["id"]): str(p["output"]) for p in data["golds"] if isinstance(p, dict) and "id" in p and "output" in p}
    wanted = [q.id for u in targets for q in u.queries]
    missing = [q for q in wanted if q not in given]
    if missing:
        raise ProperError(f"{path}: no prediction for target query {missing[0]} ({len(missing)} missing in all)")
    return _write_method(run_dir, task, targets, method, {q: given[q] for q in wanted}, source=str(path))


def load_results(run_dir: str | Path) -> dict:
    """An evaluated run's results as :func:`evaluate_run` returns them, read back from ``RUN/eval``."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "eval" / "summary.json"
    if not summary_path.exists():
        raise ProperError(f"{run_dir}: not evaluated yet (no eval/summary.json); run properlm evaluate --run {run_dir}")
    summary = read_json(summary_path)
    cfg = load_config(RunConfig, run_dir / "config.yaml")
    methods = {}
    for m in summary["methods"]:
        d = run_dir / "eval" / m
        methods[m] = {**read_json(d / "scores.json"), "per_user": read_json(d / "per_user.json")}
    return {"run_dir": str(run_dir), "task": summary["task"], "lamp_id": summary["lamp_id"],
            "config": to_dict(cfg), "methods": methods}
