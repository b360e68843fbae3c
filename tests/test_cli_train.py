"""`properlm train`, `generate` and `demo --help` through the CLI: exit codes, outputs, errors."""

from __future__ import annotations

import json

import pytest

from properlm.cli import main

TINY = ["base_model=tiny-random", "progress=false", "data.synth_users=16", "data.n_targets=4",
        "population.max_steps=3", "group.max_steps=3", "user.max_steps=3", "checkpoint_every=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--all", "--out", str(out), *TINY]) == 0
    return out


def test_train_all_writes_run_directory(trained):
    manifest = json.loads((trained / "manifest.json").read_text())
    assert manifest["stages_done"] == ["population", "group", "user"]
    for f in manifest["files"]:
        assert (trained / f).exists(), f
    assert (trained / "population" / "adapter_config.json").exists()  # PEFT's layout
    split = json.loads((trained / "split.json").read_text())
    assert len(split["target"]) == 4 and not set(split["target"]) & set(split["train"])
    # finished stages leave no in-stage checkpoints behind
    assert not any((trained / "checkpoints").glob("*/step-*"))


def test_train_refuses_to_overwrite_a_finished_stage(trained, capsys):
    assert main(["train", "--stage", "population", "--out", str(trained), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("properlm: error:") and "--resume" in err and "\n" not in err


def test_resume_on_a_finished_run_is_a_no_op(trained):
    before = (trained / "user" / "user_loras.safetensors").read_bytes()
    assert main(["train", "--all", "--out", str(trained), "--resume"]) == 0
    assert (trained / "user" / "user_loras.safetensors").read_bytes() == before


def test_bad_override_is_one_line_exit_2(tmp_path, capsys):
    assert main(["train", "--all", "--out", str(tmp_path / "r"), "group.num_experts=many"]) == 2
    err = capsys.readouterr().err.strip()
    assert "group.num_experts" in err and "\n" not in err
    assert main(["train", "--all", "--out", str(tmp_path / "r"), "group.no_such_key=1"]) == 2
    assert not (tmp_path / "r").exists()


def test_later_stage_needs_the_earlier_one(tmp_path, capsys):
    assert main(["train", "--stage", "group", "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "needs stage population" in capsys.readouterr().err


def test_generate_for_known_and_unknown_users(trained, capsys):
    split = json.loads((trained / "split.json").read_text())
    for user in (split["target"][0], split["train"][0], "nobody"):
        assert main(["generate", "--run", str(trained), "--user", user, "--max-new-tokens", "2", "hello"]) == 0
    capsys.readouterr()
    assert main(["generate", "--run", str(trained / "missing"), "--user", "u", "q"]) == 2


def test_every_command_has_help(capsys):
    for cmd in ("train", "generate", "evaluate", "report", "demo", "data"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage:" in capsys.readouterr().out
