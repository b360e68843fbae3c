"""Every method and baseline end to end on a tiny random model, the report's files and figures, the CLI.

One run is trained once for the module (a few steps per stage) and evaluated
with every method; a second run shares its stage 1 and trains a plain LoRAMoE
stage 2 (text router, no constraint loss) for the density figure and Table 3.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from properlm.errors import ProperError
from properlm.evaluate import baselines, figures
from properlm.evaluate.commands import register
from properlm.evaluate.evaluate import METHODS, evaluate_run, load_targets
from properlm.evaluate.report import report
from properlm.run_config import DataConfig, GroupConfig, PopulationConfig, RunConfig, UserConfig
from properlm.store.run import open_bank
from properlm.train.run import train

pytestmark = pytest.mark.slow
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory, h):
    root = tmp_path_factory.mktemp("eval")
    cfg = RunConfig(base_model="tiny-random", progress=False, data=DataConfig(synth_users=12, n_targets=3, max_len=64),
                    population=PopulationConfig(max_steps=3), group=GroupConfig(max_steps=3),
                    user=UserConfig(max_steps=3))
    main, plain = root / "main", root / "plain"
    train(cfg, main)
    user_loras = h.bank_files(main, "lora")
    result = evaluate_run(main, max_new_tokens=3, profile_max_new_tokens=6, batch_size=8, progress=False)
    shutil.copytree(main / "population", plain / "population")
    train(replace(cfg, group=GroupConfig(max_steps=3, router="text", constraint_weight=0.0)), plain,
          stages=("population", "group"))
    evaluate_run(plain, methods=["stage2"], max_new_tokens=3, progress=False)
    return SimpleNamespace(root=root, main=main, plain=plain, cfg=cfg, result=result, user_loras=user_loras, h=h)


def _copy(src: Path, dst: Path) -> Path:
    """A run without its evaluation and baselines."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("eval", "baselines"))
    return dst


def test_every_method_writes_lamp_predictions_and_per_user_scores(run):
    _, _, targets = load_targets(run.main)
    qids = [q.id for u in targets for q in u.queries]
    assert list(run.result["methods"]) == [*METHODS, "user-bm25"]  # the no-model reference that applies
    golds = json.loads((run.main / "eval" / "golds.json").read_text())
    assert golds["task"] == "synth-cls" and [g["id"] for g in golds["golds"]] == qids
    gold = {q.id: q.gold for u in targets for q in u.queries}
    for m in (*METHODS, "user-bm25"):
        d = run.main / "eval" / m
        pred = json.loads((d / "predictions.json").read_text())
        assert pred["task"] == "synth-cls" and [p["id"] for p in pred["golds"]] == qids
        out = {p["id"]: p["output"] for p in pred["golds"]}
        scores = json.loads((d / "scores.json").read_text())
        assert set(scores["metrics"]) == {"accuracy", "f1"} and scores["n_queries"] == len(qids)
        # The scores are those of the filed predictions: accuracy by hand, overall and per user.
        right = {q: out[q].strip() == g for q, g in gold.items()}
        assert scores["metrics"]["accuracy"] == pytest.approx(sum(right.values()) / len(right))
        with open(d / "per_user.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["user_id", "history_len", "n_queries", "accuracy", "f1"]
        assert [(r["user_id"], int(r["history_len"])) for r in rows] == [(u.id, len(u.history)) for u in targets]
        assert [float(r["accuracy"]) for r in rows] == pytest.approx(
            [sum(right[q.id] for q in u.queries) / len(u.queries) for u in targets])
    summary = json.loads((run.main / "eval" / "summary.json").read_text())
    assert list(summary["methods"]) == [*METHODS, "user-bm25"]


def _oppu_params_per_user(kind: str, r: int) -> int:
    """A user's LoRA size on the tiny base (2 layers, hidden 64, 2 of 4 heads for k and v, FFN 128), by hand."""
    from properlm.model.base import tiny_random_config

    c = tiny_random_config()
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    shapes = [(c.hidden_size, kv)] * 2 if kind == "oppu-kv" else \
        [(c.hidden_size, c.intermediate_size)] * 2 + [(c.intermediate_size, c.hidden_size)]
    return c.num_hidden_layers * sum(r * (d_in + d_out) for d_in, d_out in shapes)


def test_oppu_baselines_are_saved_apart_from_stage_3(run):
    _, _, targets = load_targets(run.main)
    for kind, part in (("oppu-kv", "self_attn."), ("oppu-mlp", "mlp.")):
        d = run.main / "baselines" / kind
        bank = open_bank(run.main, kind)
        assert sorted(bank.users()) == sorted(u.id for u in targets)
        params = bank.get(targets[0].id)["params"]
        assert params and all(part in k for k in params)
        meta = json.loads((d / "baseline.json").read_text())
        assert "users" not in meta  # the bank is the one list of users
        assert meta["params_per_user"] == sum(v.numel() for v in params.values()) == \
            _oppu_params_per_user(kind, meta["r"])
        assert (d / "logs" / f"{kind}.jsonl").exists() and not (d / "checkpoints").exists()
    kv = json.loads((run.main / "baselines" / "oppu-kv" / "baseline.json").read_text())
    assert kv["targets"] == ["self_attn.k_proj", "self_attn.v_proj"]
    assert run.h.bank_files(run.main, "lora") == run.user_loras  # stage 3 untouched


def test_pag_profiles_are_cached_per_user(run, monkeypatch):
    _, _, targets = load_targets(run.main)
    cached = json.loads((run.main / "baselines" / "pag" / "profiles.json").read_text())
    assert set(cached) == {u.id for u in targets}

    def no_generation(*args, **kwargs):
        raise AssertionError("profiles must come from the cache")

    monkeypatch.setattr(baselines, "generate", no_generation)
    assert baselines.user_profiles(run.cfg, run.main, targets, progress=False) == cached


def test_known_predictions_are_scored_through_evaluate_run(run, tmp_path, monkeypatch):
    import properlm.model.generate as gen

    copy = _copy(run.main, tmp_path / "run")
    _, _, targets = load_targets(copy)
    right = {q.input: q.gold for q in targets[0].queries}  # the first user answered right, the others "meh"
    calls = []

    def fake(model, tok, prompts, lora_users=None, **kwargs):
        calls.append(list(lora_users or []))
        return [right.get(p, "meh") for p in prompts]

    monkeypatch.setattr(gen, "generate", fake)
    res = evaluate_run(copy, methods=["stage1", "stage3"], batch_size=4, progress=False)
    m = res["methods"]["stage1"]
    # 3 of 9 queries right ("meh" is no label, so never right)
    assert m["metrics"]["accuracy"] == pytest.approx(3 / 9)
    assert [r["accuracy"] for r in m["per_user"]] == [1.0, 0.0, 0.0]
    pred = json.loads((copy / "eval" / "stage1" / "predictions.json").read_text())
    assert sum(p["output"] != "meh" for p in pred["golds"]) == 3
    # stage 3: rows carry their own users, and one batch mixes several users
    lora_calls = calls[-3:]
    assert all(set(c) <= {u.id for u in targets} for c in lora_calls)
    assert max(len(set(c)) for c in lora_calls) >= 2


def test_targets_history_length_is_what_they_trained_on_when_histories_are_cut(run, tmp_path):
    from properlm.config import load_config, save_config

    copy = _copy(run.main, tmp_path / "run")
    cfg = load_config(RunConfig, copy / "config.yaml")
    cfg.data.max_history = 2
    save_config(cfg, copy / "config.yaml")
    _, _, full = load_targets(run.main)
    _, _, cut = load_targets(copy)
    assert all(len(u.history) == 2 for u in cut) and any(len(u.history) > 2 for u in full)
    assert [int(u.meta["history_len"]) for u in cut] == [2] * len(cut)   # who gains groups by trained length
    assert [int(u.meta["history_len"]) for u in full] == [len(u.history) for u in full]


def test_report_tables_and_figures_from_real_runs(run, tmp_path):
    out = report([run.main, run.plain], tmp_path / "rep")
    for name in ("tsne", "expert_density", "score_vs_history"):
        path = Path(out["figures"][name])
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 1000
    with open(tmp_path / "rep" / "table1.csv", newline="") as f:
        assert [r["method"] for r in csv.DictReader(f)] == [*METHODS, "user-bm25"]  # the no-model reference last
    with open(tmp_path / "rep" / "efficiency.csv", newline="") as f:
        eff = {r["stage"]: r for r in csv.DictReader(f)}
    assert set(eff) == {"population", "group", "user", "oppu-kv", "oppu-mlp"}
    for kind in ("oppu-kv", "oppu-mlp"):
        r = json.loads((run.main / "baselines" / kind / "baseline.json").read_text())["r"]
        assert int(eff[kind]["params_per_user"]) == _oppu_params_per_user(kind, r)
    # Stage 3's time is its log's: the span of its step records, stretched by one step (n records, n-1 gaps).
    t = [json.loads(line)["time"] for line in (run.main / "logs" / "user.jsonl").read_text().splitlines()]
    assert int(eff["user"]["steps"]) == len(t) == 3
    assert float(eff["user"]["train_seconds"]) == pytest.approx((t[-1] - t[0]) * 3 / 2, abs=1e-3)
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [r["variant"] for r in data["tables"]["table3"]["rows"]] == [
        "PROPER (full)", "PROPER (full), stage 2", "w/ text router + no constraint loss, stage 2"]
    assert "Decoding: free generation" in (tmp_path / "rep" / "report.md").read_text()
    # The report's ARI is the one figures.routing_ari measures (tested on planted partitions below).
    assert data["routing_ari"] == pytest.approx(figures.routing_ari(run.main))
    assert data["routing_ari_per_site"] == pytest.approx(figures.routing_ari(run.main, per_site=True))
    assert "![tsne](tsne.png)" in (tmp_path / "rep" / "report.md").read_text()


def test_routing_ari_is_one_for_a_perfect_partition(run, monkeypatch):
    _, _, users = figures._routed_users(run.main)
    ids = [u.id for u in users]
    one_hot = np.eye(5)[[u.group for u in users]]
    assert len(set(u.group for u in users)) > 1
    monkeypatch.setattr(figures, "user_routing", lambda run_dir: (ids, one_hot))
    assert figures.routing_ari(run.main) == pytest.approx(1.0)


@pytest.mark.filterwarnings("ignore:Number of distinct clusters")  # the averaged points coincide on purpose
def test_per_site_ari_sees_a_partition_that_the_site_average_blurs(run, monkeypatch):
    """Two sites, each putting every group on its own expert but with its own expert labels:
    the per-site weights recover the groups; averaged over sites, groups g and K-1-g coincide."""
    _, _, users = figures._routed_users(run.main)
    ids, groups = [u.id for u in users], [u.group for u in users]
    k = 5
    assert len(set(groups)) > 2
    site_a = np.eye(k)[groups]                            # group g -> expert g
    site_b = np.eye(k)[[k - 1 - g for g in groups]]       # group g -> expert K-1-g
    w = np.stack([site_a, site_b], 1)                     # (U, sites, K)
    monkeypatch.setattr(figures, "user_routing_sites", lambda *a, **kw: (ids, w))
    monkeypatch.setattr(figures, "user_routing", lambda *a, **kw: (ids, w.mean(1)))
    assert figures.routing_ari(run.main, per_site=True) == pytest.approx(1.0)
    assert figures.routing_ari(run.main) < 0.99


def test_stage2_and_proper_route_targets_with_their_fitted_embeddings(run, tmp_path, monkeypatch):
    """The targets were not in stage 2; their embeddings were fitted on their own history after it (the default
    group.unseen=fit) and every stage2 and proper row carries its own user's, not the fallback (None)."""
    import properlm.model.generate as gen
    from properlm.data.tasks import get_task

    copy = _copy(run.main, tmp_path / "run")
    _, _, targets = load_targets(copy)
    split = json.loads((copy / "split.json").read_text())
    bank = open_bank(copy, "emb")
    assert all(u.id in bank and u.id not in split["train"] for u in targets)
    task = get_task("synth-cls")
    owners = {}
    for u in targets:
        for q in u.queries:
            owners.setdefault(task.query_prompt(q), set()).add(u.id)
    seen = {}

    def fake(model, tok, prompts, lora_users=None, emb_users=None, **kwargs):
        seen.setdefault(model.user_loras is not None, []).extend(zip(prompts, lora_users, emb_users))
        return ["love"] * len(prompts)

    monkeypatch.setattr(gen, "generate", fake)
    evaluate_run(copy, methods=["stage2", "proper"], progress=False)
    n_rows = sum(len(u.queries) for u in targets)
    assert len(seen[False]) == len(seen[True]) == n_rows
    assert all(lora is None and emb in owners[p] for p, lora, emb in seen[False])  # stage2: the fitted embedding
    assert all(lora == emb and emb in owners[p] for p, lora, emb in seen[True])    # proper: LoRA and embedding


def test_end_to_end_targets_route_with_their_own_embeddings(run, tmp_path, monkeypatch):
    import properlm.model.generate as gen

    e2e = tmp_path / "e2e"
    shutil.copytree(run.main / "population", e2e / "population")
    train(replace(run.cfg, user=UserConfig(max_steps=2, end_to_end=True)), e2e)
    _, _, targets = load_targets(e2e)
    seen = []

    def fake(model, tok, prompts, lora_users=None, emb_users=None, **kwargs):
        seen.append((list(lora_users), list(emb_users)))
        return ["love"] * len(prompts)

    monkeypatch.setattr(gen, "generate", fake)
    res = evaluate_run(e2e, methods=["proper"], progress=False)
    assert all(lora == emb and set(emb) <= {u.id for u in targets} for lora, emb in seen)
    golds = [q.gold for u in targets for q in u.queries]
    assert res["methods"]["proper"]["metrics"]["accuracy"] == pytest.approx(golds.count("love") / len(golds))
    data = report([res], tmp_path / "rep", figures=False)
    assert data["tables"]["table3"]["rows"][0]["variant"] == "w/ end-to-end"


def test_label_decoding_scores_every_label_and_files_it_apart(run, tmp_path, monkeypatch):
    """--decode labels: each query's answer is the label with the highest likelihood, per user's model."""
    import torch

    import properlm.model.scoring as scoring
    from properlm.data.tasks import get_task
    from properlm.model.scoring import label_token_ids

    copy = _copy(run.main, tmp_path / "run")
    res = evaluate_run(copy, methods=["stage1", "proper"], decode="labels", batch_size=8, progress=False)
    labels = set(get_task("synth-cls").labels)
    assert set(res["methods"]) == {f"{m}@{d}" for m in ("stage1", "proper") for d in ("labels", "labels-norm")}
    for m in res["methods"]:
        preds = json.loads((copy / "eval" / m / "predictions.json").read_text())["golds"]
        assert preds and all(p["output"] in labels for p in preds)
        assert json.loads((copy / "eval" / m / "scores.json").read_text())["settings"]["decode"] == m.split("@")[1]
    # The prediction is the argmax of the scored likelihoods, computed with each row's own user.
    seen = []
    real = scoring.label_loglik

    def spy(model, tok, prompts, labels_, lora_users=None, **kw):
        nonlocal run_tok
        run_tok = tok
        out = real(model, tok, prompts, labels_, lora_users=lora_users, **kw)
        seen.append((list(lora_users), out))
        return out

    run_tok = None

    monkeypatch.setattr(scoring, "label_loglik", spy)
    res = evaluate_run(copy, methods=["proper"], decode="labels", batch_size=8, progress=False)
    users, ll = seen[-1]
    _, task, targets = load_targets(copy)
    assert users == [u.id for u in targets for _ in u.queries]
    preds = json.loads((copy / "eval" / "proper@labels" / "predictions.json").read_text())["golds"]
    assert [p["output"] for p in preds] == [task.labels[i] for i in ll.argmax(-1).tolist()]
    # @labels-norm: the best mean log-likelihood per scored token (the label's tokens and the end of answer).
    n_tok = torch.tensor([len(t) for t in label_token_ids(run_tok, list(task.labels))], dtype=torch.float32)
    preds = json.loads((copy / "eval" / "proper@labels-norm" / "predictions.json").read_text())["golds"]
    assert [p["output"] for p in preds] == [task.labels[i] for i in (ll / n_tok).argmax(-1).tolist()]
    rep = report([copy], tmp_path / "rep", figures=False)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "`@labels`: the label with the highest likelihood" in md and rep["tables"]["table1@labels"]
    with pytest.raises(ProperError, match="unknown decoding"):
        evaluate_run(copy, methods=["stage1"], decode="beam", progress=False)


def test_missing_stage_is_a_clear_error(run):
    with pytest.raises(ProperError, match="needs stage user"):
        evaluate_run(run.plain, methods=["proper"], progress=False)


def test_cli_evaluate_and_report(run, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="properlm")
    register(parser.add_subparsers())
    copy = _copy(run.main, tmp_path / "run")
    args = parser.parse_args(["evaluate", "--run", str(copy), "--methods", "stage1", "--max-new-tokens", "2", "--quiet",
                              "--sample"])
    assert args.func(args) == 0
    assert "stage1" in capsys.readouterr().out
    assert (copy / "eval" / "stage1" / "predictions.json").exists()
    args = parser.parse_args(["report", str(copy), "--out", str(tmp_path / "rep"), "--no-figures"])
    assert args.func(args) == 0
    assert (tmp_path / "rep" / "table1.csv").exists() and not (tmp_path / "rep" / "tsne.png").exists()


def test_external_prediction_file_is_scored_and_filed(run, tmp_path):
    from properlm.evaluate.evaluate import score_prediction_file

    copy = _copy(run.main, tmp_path / "run")
    golds = json.loads((run.main / "eval" / "golds.json").read_text())
    path = tmp_path / "preds.json"
    path.write_text(json.dumps({"task": "synth-cls", "golds": golds["golds"] + [{"id": "other", "output": "x"}]}))
    parser = argparse.ArgumentParser(prog="properlm")
    register(parser.add_subparsers())
    args = parser.parse_args(["evaluate", "--run", str(copy), "--predictions", str(path), "--name", "oracle"])
    assert args.func(args) == 0
    scores = json.loads((copy / "eval" / "oracle" / "scores.json").read_text())
    assert scores["metrics"]["accuracy"] == 1.0 and scores["source"] == str(path)
    assert "oracle" in json.loads((copy / "eval" / "summary.json").read_text())["methods"]
    path.write_text(json.dumps({"task": "synth-cls", "golds": golds["golds"][1:]}))
    with pytest.raises(ProperError, match="no prediction for target query"):
        score_prediction_file(copy, path, "partial")
    with pytest.raises(ProperError, match="not a built-in method"):
        score_prediction_file(copy, path, "proper")
