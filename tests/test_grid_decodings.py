"""The grid's report per decoding: Tables 1-3, the expert sweep and the seeds report once per decoding
suffix (free generation, ``@labels``, ``@labels-norm``, ``@expected``), each title naming its decoding."""

from __future__ import annotations

from properlm.evaluate.report import report
from properlm.evaluate.tables import build_tables, decoding_suffixes
from properlm.run_config import DataConfig, GroupConfig, UserConfig
from tests.test_report import _result, write_eval_run

_LABELS = ("stage1@labels", "stage2@labels", "proper@labels", "stage1@labels-norm", "stage2@labels-norm",
           "proper@labels-norm")


def _grid() -> list[dict]:
    """A grid as ``properlm experiments`` evaluates it by default on a rating task: the main run decoded
    freely and by labels, every other variant by labels only."""
    free = ("stage1", "stage2", "proper")
    return [
        _result("main", 0.5, methods=(*free, *_LABELS, "proper@expected")),
        _result("low", 0.9, data=DataConfig(split="low-resource"), methods=_LABELS),
        _result("text", 0.7, group=GroupConfig(router="text"), methods=("stage2@labels", "proper@labels")),
        _result("no-lar", 0.55, user=UserConfig(lora_aware_router=False), methods=("proper@labels",)),
        _result("k2", 0.6, group=GroupConfig(num_experts=2), methods=("proper@labels",)),
    ]


def test_decoding_suffixes_put_label_scoring_before_the_expected_rating():
    assert decoding_suffixes(["proper@expected", "proper@labels-norm", "proper", "proper@labels"]) == [
        "", "@labels", "@labels-norm", "@expected"]
    assert decoding_suffixes(["proper@labels"]) == ["", "@labels"]


def test_each_table_is_built_per_decoding_from_that_decodings_methods():
    t = build_tables(_grid())
    assert list(t) == ["table1", "table1@labels", "table1@labels-norm", "table1@expected", "table2@labels",
                       "table2@labels-norm", "table3@labels", "experts@labels"]
    assert [r["method"] for r in t["table1"]["rows"]] == ["stage1", "stage2", "proper"]
    assert [r["method"] for r in t["table1@labels"]["rows"]] == ["stage1@labels", "stage2@labels", "proper@labels"]
    assert [r["method"] for r in t["table2@labels-norm"]["rows"]] == ["stage1@labels-norm", "stage2@labels-norm",
                                                                     "proper@labels-norm"]
    # Table 3 from the label-decoded rows: the variants have no freely generated method at all.
    main = {m: i for i, m in enumerate(_grid()[0]["methods"])}
    assert [(r["variant"], r["method"], r["LaMP-3 mae"]) for r in t["table3@labels"]["rows"]] == [
        ("PROPER (full)", "proper@labels", 0.5 + main["proper@labels"]),
        ("PROPER (full), stage 2", "stage2@labels", 0.5 + main["stage2@labels"]),
        ("w/ text router, stage 2", "stage2@labels", 0.7), ("w/ text router, after stage 3", "proper@labels", 1.7),
        ("w/ no LoRA-aware router", "proper@labels", 0.55)]
    assert [(r["num_experts"], r["method"]) for r in t["experts@labels"]["rows"]] == [
        (2, "proper@labels"), (5, "proper@labels")]
    assert t["table1"]["title"].endswith("[decoding: free generation]")
    assert "@labels)" in t["table3@labels"]["title"] and "@labels-norm)" in t["table2@labels-norm"]["title"]
    assert "@expected)" in t["table1@expected"]["title"]
    assert {t[k]["decoding"] for k in t} == {"", "@labels", "@labels-norm", "@expected"}


def test_report_writes_one_csv_and_one_section_per_decoding(tmp_path):
    out = report(_grid(), tmp_path / "rep", figures=False)
    assert (tmp_path / "rep" / "table3@labels.csv").exists() and not (tmp_path / "rep" / "table3.csv").exists()
    md = (tmp_path / "rep" / "report.md").read_text()
    for t in out["tables"].values():
        assert f"## {t['title']}" in md


def _seed_grid(root, seed: int):
    """One seed's grid on disk: a main run decoded freely and by labels, and its report."""
    users = {f"u{i}": (3 + i, ["3", "4"]) for i in range(4)}
    wrong = {u: ["5", "5"] for u in users}
    right = {u: list(g) for u, (_, g) in users.items()}
    methods = {"stage1": wrong, "proper": right, "stage1@labels": wrong, "proper@labels": right}
    grid = root / f"seed-{seed}"
    run = write_eval_run(grid, "main", users, methods)
    report([run], grid / "report", figures=False)
    return grid


def test_seeds_report_combines_each_decoding_and_bootstraps_each(tmp_path):
    from properlm.evaluate.seeds import seeds_report

    res = seeds_report({s: _seed_grid(tmp_path, s) for s in (0, 1)}, tmp_path / "report")
    assert set(res["tables"]) == {"table1", "table1@labels"}
    rows = {r["method"]: r for r in res["tables"]["table1@labels"]["rows"]}
    assert set(rows) == {"stage1@labels", "proper@labels"} and rows["proper@labels"]["LaMP-3 mae"]["n"] == 2
    assert res["tables"]["table1@labels"]["title"].endswith("@labels)]")
    assert {(b["method"], b["other"]) for b in res["bootstrap"]} == {("proper", "stage1"),
                                                                     ("proper@labels", "stage1@labels")}
    assert all(b["n_users"] == 8 and b["n_queries"] == 16 for b in res["bootstrap"])
    md = (tmp_path / "report" / "report.md").read_text()
    assert "paired bootstrap over (seed, user) pairs" in md and "10,000 resamples of (seed, user) pairs" in md
    assert "held-out queries" not in md  # the intervals resample users, not queries
