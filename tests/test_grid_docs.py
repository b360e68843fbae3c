"""docs/evaluation.md describes the report's and the seeds report's intervals as they are computed: a
paired bootstrap that resamples users ((seed, user) pairs over seeds), not held-out queries."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "evaluation.md"


def _paragraph(text: str, start: str) -> str:
    """The paragraph of ``text`` that begins with ``start``."""
    i = text.index(start)
    end = text.find("\n\n", i)
    return " ".join(text[i:end if end >= 0 else None].split())


def test_report_and_seeds_paragraphs_say_the_bootstrap_resamples_users():
    text = DOC.read_text(encoding="utf-8")
    report = _paragraph(text, "`properlm report RUN... --out DIR`")
    seeds = _paragraph(text, "`properlm experiments --out OUT --seeds 0,1,2")
    assert "bootstrap on the per-query scores" not in report
    assert "resamples users, not queries" in report and "cluster_bootstrap" in report
    assert "over the held-out queries of all seeds" not in seeds
    assert "resamples users, not queries" in seeds and "(seed, user) pairs, pooled over the seeds" in seeds
