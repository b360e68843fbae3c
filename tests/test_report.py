"""Report tables from evaluation results: which run goes in which table, the file formats, efficiency numbers."""

from __future__ import annotations

import csv
import json

import torch
from safetensors.torch import save_file

from properlm.config import save_config, to_dict
from properlm.evaluate.report import markdown_table, report
from properlm.evaluate.tables import ablation_flags, build_tables, efficiency_rows, run_kind, stage_timing
from properlm.run_config import DataConfig, GroupConfig, RunConfig, UserConfig


def _result(name: str, mae: float, data=None, group=None, user=None, methods=("stage1", "proper"), extra=None) -> dict:
    cfg = to_dict(RunConfig(base_model="tiny-random", data=data or DataConfig(), group=group or GroupConfig(),
                            user=user or UserConfig()))
    for k, v in (extra or {}).items():
        cfg[k.split(".")[0]][k.split(".")[1]] = v
    per_user = [{"user_id": "u1", "history_len": 4, "n_queries": 2, "mae": mae, "rmse": mae + 1}]
    return {"run_dir": f"/nonexistent/{name}", "task": "LaMP-3", "lamp_id": "LaMP_3", "config": cfg,
            "methods": {m: {"metrics": {"mae": mae + i, "rmse": mae + i + 1}, "per_user": per_user}
                        for i, m in enumerate(methods)}}


def write_eval_run(root, name: str, users: dict, methods: dict, task: str = "LaMP-3", data=None):
    """A run directory as ``properlm evaluate`` leaves it, without a model: config, ``eval/golds.json``
    (each query naming its user) and, per method, predictions, scores and per-user scores.

    Args:
        users: user id -> (history length, [gold answer per query]).
        methods: method -> user id -> [answer per query].
        data: the run's DataConfig (default: the main split).
    """
    from properlm.data.tasks import get_task
    from properlm.evaluate.metrics import score

    t = get_task(task)
    run = root / name
    (run / "eval").mkdir(parents=True)
    save_config(RunConfig(base_model="tiny-random", data=data or DataConfig()), run / "config.yaml")
    qid = {(u, j): f"{u}-q{j}" for u, (_, golds) in users.items() for j in range(len(golds))}
    golds = [{"id": qid[u, j], "output": g, "user_id": u} for u, (_, gs) in users.items() for j, g in enumerate(gs)]
    (run / "eval" / "golds.json").write_text(json.dumps({"task": t.lamp_id, "golds": golds}))
    summary = {"run_dir": str(run), "task": t.name, "lamp_id": t.lamp_id, "methods": {}}
    for m, answers in methods.items():
        d = run / "eval" / m
        d.mkdir()
        preds = [{"id": qid[u, j], "output": p, "user_id": u} for u, ps in answers.items() for j, p in enumerate(ps)]
        (d / "predictions.json").write_text(json.dumps({"task": t.lamp_id, "golds": preds}))
        every = [p for u in users for p in answers[u]], [g for u in users for g in users[u][1]]
        metrics = score(t.kind, *every, t.labels)
        per_user = [{"user_id": u, "history_len": h, "n_queries": len(gs), **score(t.kind, answers[u], gs, t.labels)}
                    for u, (h, gs) in users.items()]
        entry = {"method": m, "task": t.name, "n_users": len(users), "n_queries": len(golds), "metrics": metrics}
        (d / "scores.json").write_text(json.dumps(entry))
        (d / "per_user.json").write_text(json.dumps(per_user))
        summary["methods"][m] = {"metrics": metrics, "n_users": len(users), "n_queries": len(golds)}
    (run / "eval" / "summary.json").write_text(json.dumps(summary))
    return run


def _runs() -> list[dict]:
    return [
        _result("k2", 0.7, group=GroupConfig(num_experts=2)),
        _result("main", 0.5),
        _result("k8", 0.6, group=GroupConfig(num_experts=8)),
        _result("low", 0.9, data=DataConfig(split="low-resource")),
        _result("loramoe", 0.8, group=GroupConfig(router="text", constraint_weight=0.0), methods=("stage2",)),
        _result("no-lar", 0.55, user=UserConfig(lora_aware_router=False)),
        _result("e2e", 0.65, extra={"user.end_to_end": True}),
    ]


def test_stage_2_ablations_are_compared_at_stage_2():
    """The paper measures the router and constraint ablations at stage 2; after-stage-3 rows are labelled."""
    main = _result("main", 0.5, methods=("stage1", "stage2", "proper"))
    text = _result("text", 0.7, group=GroupConfig(router="text"), methods=("stage2", "proper"))
    e2e = _result("e2e", 0.65, extra={"user.end_to_end": True})
    rows = build_tables([main, text, e2e])["table3"]["rows"]
    assert [(r["variant"], r["method"], r["LaMP-3 mae"]) for r in rows] == [
        ("PROPER (full)", "proper", 2.5), ("PROPER (full), stage 2", "stage2", 1.5),
        ("w/ text router, stage 2", "stage2", 0.7), ("w/ text router, after stage 3", "proper", 1.7),
        ("w/ end-to-end", "proper", 1.65)]


def test_table_3_says_how_each_row_routes_the_targets_at_stage_2_from_its_config(tmp_path):
    """Table 1's stage-2 row fits an embedding per target user; a text router has none to fit, so its
    stage-2 row is not on the same footing. The column says which rows are, read from each run's config."""
    from properlm.evaluate.tables import ROUTING_COLUMN

    runs = [_result("main", 0.5, methods=("stage2", "proper")),
            _result("text", 0.7, group=GroupConfig(router="text"), methods=("stage2",)),
            _result("nocon", 0.6, group=GroupConfig(constraint_weight=0.0), methods=("stage2",)),
            _result("nocon-mean", 0.65, group=GroupConfig(constraint_weight=0.0, unseen="mean"), methods=("stage2",)),
            _result("nocon-instant", 0.66, group=GroupConfig(constraint_weight=0.0, unseen="instant"),
                    methods=("stage2",)),
            _result("e2e", 0.8, extra={"user.end_to_end": True})]
    t3 = build_tables(runs)["table3"]
    assert t3["columns"][:3] == ["variant", ROUTING_COLUMN, "method"]
    assert [(r["variant"], r[ROUTING_COLUMN]) for r in t3["rows"]] == [
        ("PROPER (full)", "fitted embedding"), ("PROPER (full), stage 2", "fitted embedding"),
        ("w/ text router, stage 2", "text only (no user embedding)"),
        ("w/ no constraint loss, stage 2", "fitted embedding"), ("w/ no constraint loss, stage 2", "mean embedding"),
        ("w/ no constraint loss, stage 2", "instant-encoder embedding"),
        ("w/ end-to-end", "embedding learned end-to-end")]
    report(runs, tmp_path / "rep", figures=False)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| w/ text router, stage 2 | text only (no user embedding) | stage2 |" in md
    assert "router reads the text alone, so its stage-2 row gets no per-user fit" in md


def test_seeds_report_keeps_table_3s_routing_column():
    from properlm.evaluate.seeds import combine_tables
    from properlm.evaluate.tables import ROUTING_COLUMN

    runs = lambda mae: [_result("main", mae), _result("text", 0.7, group=GroupConfig(router="text"),  # noqa: E731
                                                      methods=("stage2",))]
    t = combine_tables({0: build_tables(runs(0.5)), 1: build_tables(runs(0.7))})["table3"]
    assert [(r["variant"], r[ROUTING_COLUMN], r["LaMP-3 mae"]["n"]) for r in t["rows"]] == [
        ("PROPER (full)", "fitted embedding", 2), ("w/ text router, stage 2", "text only (no user embedding)", 2)]


def test_decoding_note_names_every_label_decoding():
    from properlm.evaluate.report import decoding_note

    note = decoding_note([_result("main", 0.5, methods=("proper", "proper@labels", "proper@labels-norm",
                                                         "proper@expected"))])
    assert "`@labels`: the label with the highest likelihood (summed log-probability)" in note
    assert "`@labels-norm`: the label with the best mean log-probability per token" in note
    assert "`@expected`" in note and "(methods without a suffix)" in note
    assert "@labels-norm" not in decoding_note([_result("main", 0.5, methods=("proper", "proper@labels"))])


def test_runs_are_sorted_into_tables():
    runs = _runs()
    assert [run_kind(r["config"]) for r in runs] == ["main", "main", "main", "low-resource", "ablation", "ablation",
                                                    "ablation"]
    assert ablation_flags(runs[4]["config"]) == ["text router", "no constraint loss"]
    t = build_tables(runs)
    assert set(t) == {"table1", "table2", "table3", "experts"}  # no efficiency: the run dirs do not exist
    # Table 1 is the K=5 run's methods, not the first run given
    assert t["table1"]["columns"] == ["method", "LaMP-3 mae", "LaMP-3 rmse"]
    assert t["table1"]["rows"] == [{"method": "stage1", "LaMP-3 mae": 0.5, "LaMP-3 rmse": 1.5},
                                   {"method": "proper", "LaMP-3 mae": 1.5, "LaMP-3 rmse": 2.5}]
    assert t["table2"]["rows"][0]["LaMP-3 mae"] == 0.9
    assert [(r["variant"], r["method"], r["LaMP-3 mae"]) for r in t["table3"]["rows"]] == [
        ("PROPER (full)", "proper", 1.5), ("w/ text router + no constraint loss, stage 2", "stage2", 0.8),
        ("w/ no LoRA-aware router", "proper", 1.55), ("w/ end-to-end", "proper", 1.65)]
    assert [(r["num_experts"], r["LaMP-3 mae"]) for r in t["experts"]["rows"]] == [(2, 1.7), (5, 1.5), (8, 1.6)]


def test_markdown_marks_the_best_value_by_metric_direction():
    md = markdown_table(build_tables(_runs())["experts"])
    assert "LaMP-3 mae ↓" in md
    assert "| 5 | proper | **1.5000** | **2.5000** |" in md  # lower MAE is better
    tie = {"columns": ["method", "LaMP-3 mae"], "rows": [{"method": "a", "LaMP-3 mae": 1.0},
                                                         {"method": "b", "LaMP-3 mae": 1.0}]}
    assert "**" not in markdown_table(tie)


def test_report_files_are_well_formed(tmp_path):
    out = report(_runs(), tmp_path / "rep", figures=False)
    names = {p.rsplit("/", 1)[-1] for p in out["files"]}
    assert names == {"table1.csv", "table2.csv", "table3.csv", "experts.csv", "per_user.csv", "report.md",
                     "report.json"}
    with open(tmp_path / "rep" / "table3.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["variant", "stage-2 routing of targets", "method", "LaMP-3 mae", "LaMP-3 rmse"]
    assert len(rows) == 4
    with open(tmp_path / "rep" / "per_user.csv", newline="") as f:
        pu = list(csv.DictReader(f))
    assert list(pu[0]) == ["run", "task", "method", "user_id", "history_len", "n_queries", "mae", "rmse"]
    assert len(pu) == 13  # 6 runs x 2 methods + 1 run x 1 method, one user each
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert set(data["tables"]) == {"table1", "table2", "table3", "experts"} and data["routing_ari"] is None
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Table 1" in md and "## Table 2" in md and "## Table 3" in md and "experts K" in md


def test_efficiency_from_saved_tensors_and_log_timestamps(tmp_path):
    run = tmp_path / "run"
    (run / "population").mkdir(parents=True)
    (run / "group").mkdir()
    (run / "user").mkdir()
    (run / "logs").mkdir()
    (run / "split.json").write_text(json.dumps({"train": ["a", "b", "c", "d"], "target": ["x", "y"]}))
    save_file({"l.lora_A": torch.zeros(8, 16), "l.lora_B": torch.zeros(16, 8)}, str(run / "population" / "adapter_model.safetensors"))
    save_file({"s.experts.lora_A": torch.zeros(10, 16), "s.router.w_text.weight": torch.zeros(5, 16),
               "s.router.fallback_emb": torch.zeros(4)}, str(run / "group" / "experts.safetensors"))
    from properlm.store.user_store import UserStore

    emb = UserStore(run / "store" / "emb", schema={"params": {"s.user_emb": (4,)}})
    emb.put_many({u: {"params": {"s.user_emb": torch.zeros(4)}} for u in ["a", "b", "c", "d", "x"]})  # x: fitted unseen
    lora = UserStore(run / "store" / "lora", schema={"params": {"s.lora_A": (3, 16)}})
    lora.put_many({u: {"params": {"s.lora_A": torch.zeros(3, 16)}} for u in ["x", "y"]})
    for stage, times in (("population", [100.0, 104.0, 108.0]), ("user", [10.0, 11.0])):
        (run / "logs" / f"{stage}.jsonl").write_text(
            "".join(json.dumps({"stage": stage, "step": i + 1, "time": t}) + "\n" for i, t in enumerate(times)))
    # 3 records 8 s apart in all: the first step's time is one more interval -> 8 * 3/2 = 12 s
    assert stage_timing(run / "logs" / "population.jsonl") == (3, 12.0)
    assert stage_timing(run / "logs" / "missing.jsonl") == (0, None)
    rows = {r["stage"]: r for r in efficiency_rows(run)}
    assert set(rows) == {"population", "group", "user"}
    assert rows["population"]["trainable_params"] == 256 and rows["population"]["train_seconds"] == 12.0
    # experts 160 + router 80 (the fallback buffer is not trained) + embeddings 16 = 256; 4 per user
    assert rows["group"]["trainable_params"] == 256 and rows["group"]["params_per_user"] == 4
    assert rows["group"]["train_seconds"] is None  # no log
    assert rows["user"]["params_per_user"] == 48 and rows["user"]["n_users"] == 2
    assert rows["user"]["train_seconds"] == 2.0 and rows["user"]["seconds_per_user"] == 1.0


def test_report_resamples_users_and_prints_users_and_queries_beside_each_interval(tmp_path):
    """12 users x 4 queries; PROPER is exact on every query of 8 users and off by 2 on the other 4."""
    users = {f"u{i:02d}": (10 + i, ["3"] * 4) for i in range(12)}
    proper = {u: ["3"] * 4 if i < 8 else ["5"] * 4 for i, u in enumerate(users)}
    run = write_eval_run(tmp_path, "main", users, {"stage1": {u: ["4"] * 4 for u in users}, "proper": proper})
    out = report([run], tmp_path / "rep", figures=False)
    (b,) = out["bootstrap"]
    assert (b["other"], b["n_users"], b["n_queries"]) == ("stage1", 12, 48)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| task | vs | metric | difference | 95% interval | users | queries | beyond noise |" in md
    assert f"| LaMP-3 | stage1 | abs_error | {b['diff']:+.4f} | [{b['ci95'][0]:+.4f}, {b['ci95'][1]:+.4f}] | 12 | 48 |" in md
    assert "resamples of the users" in md
