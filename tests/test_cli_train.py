"""`properlm train`, `generate` and `demo --help` through the CLI: exit codes, outputs, errors."""

from __future__ import annotations

import json

import pytest
import torch

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


def test_users_add_trains_only_the_new_user_and_delete_removes_them(tmp_path):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file

    run = tmp_path / "run"
    assert main(["train", "--all", "--out", str(run), *TINY]) == 0
    split = json.loads((run / "split.json").read_text())
    newcomer = split["train"][0]  # has history in the run's data but no LoRA yet
    path = run / "user" / "user_loras.safetensors"
    before = load_file(str(path))
    assert main(["users", "add", "--run", str(run), "--users", newcomer]) == 0
    after = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        ids = json.loads(f.metadata()["user_ids"])
    assert ids[-1] == newcomer and len(ids) == len(split["target"]) + 1
    for k, v in before.items():  # existing users: bit for bit
        assert torch.equal(after[k][: len(ids) - 1], v), k
    assert any(not torch.equal(after[k][-1], torch.zeros_like(after[k][-1])) for k in after if k.endswith("lora_B"))
    assert newcomer in json.loads((run / "split.json").read_text())["target"]

    assert main(["users", "delete", "--run", str(run), "--users", newcomer, split["target"][0]]) == 0
    with safe_open(str(path), "pt") as f:
        left = json.loads(f.metadata()["user_ids"])
    assert newcomer not in left and split["target"][0] not in left
    with safe_open(str(run / "group" / "user_embeddings.safetensors"), "pt") as f:
        assert newcomer not in json.loads(f.metadata()["user_ids"])
    from properlm import load_run
    assert split["target"][0] not in load_run(run).users
    shutil.rmtree(run)
