"""The embedded model's one-time conversion when several processes do it at once."""

from __future__ import annotations

import properlm.model.base as base


def test_a_second_conversion_into_a_finished_directory_keeps_the_first(tiny_base, tmp_path, monkeypatch):
    """Two processes converting at once (a training run and a test run, say): the one that
    renames second finds the directory complete and uses it instead of failing."""
    lm, tok = tiny_base
    monkeypatch.setattr(base.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    monkeypatch.setattr(base.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: lm)
    out = tmp_path / "cache" / "model"
    base._convert_gguf(tmp_path / "x.gguf", out)
    first = sorted(p.name for p in out.iterdir())
    assert "config.json" in first
    base._convert_gguf(tmp_path / "x.gguf", out)  # the slower process: its rename onto `out` fails
    assert sorted(p.name for p in out.iterdir()) == first
    assert [p.name for p in out.parent.iterdir()] == ["model"]  # its temp directory is gone
