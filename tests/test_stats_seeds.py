"""The seeds report: (seed, user) pairs are the bootstrap's clusters, and every interval says how many."""

from __future__ import annotations

from test_report import write_eval_run

from properlm.evaluate.report import report
from properlm.evaluate.seeds import pooled_bootstrap, seeds_report


def _grid(root, seed: int, wins: int):
    """A seed's grid: a main run of 6 users x 3 queries (the same user ids in every seed), and its report."""
    users = {f"u{i}": (5 + i, ["3"] * 3) for i in range(6)}
    proper = {u: ["3"] * 3 if i < wins else ["1"] * 3 for i, u in enumerate(users)}
    write_eval_run(root / f"seed-{seed}", "main", users, {"stage1": {u: ["4"] * 3 for u in users}, "proper": proper})
    report([root / f"seed-{seed}" / "main"], root / f"seed-{seed}" / "report", figures=False)
    return root / f"seed-{seed}"


def test_seeds_bootstrap_resamples_seed_user_pairs_and_prints_the_counts(tmp_path):
    dirs = {0: _grid(tmp_path, 0, wins=5), 1: _grid(tmp_path, 1, wins=4)}
    res = seeds_report(dirs, tmp_path / "report")
    (b,) = res["bootstrap"]
    assert (b["other"], b["runs"], b["n_users"], b["n_queries"], b["n"]) == ("stage1", 2, 12, 36, 36)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| vs | metric | difference | 95% interval | users | queries | beyond noise |" in md
    assert f"[{b['ci95'][0]:+.4f}, {b['ci95'][1]:+.4f}] | 12 | 36 |" in md
    # pooled over (seed, user): a user of seed 0 is not the same cluster as that id in seed 1
    only = pooled_bootstrap([dirs[0] / "main", dirs[1] / "main"], "proper", "stage1", n=500)
    assert only["n_users"] == 12
    assert pooled_bootstrap([dirs[0] / "main"], "oppu-mlp", "stage1") is None  # not evaluated
