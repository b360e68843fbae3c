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


def test_resume_on_a_finished_run_is_a_no_op(trained, h):
    before = h.bank_files(trained, "lora")
    assert main(["train", "--all", "--out", str(trained), "--resume"]) == 0
    assert h.bank_files(trained, "lora") == before


def test_bad_override_is_one_line_exit_2(tmp_path, capsys):
    assert main(["train", "--all", "--out", str(tmp_path / "r"), "group.num_experts=many"]) == 2
    err = capsys.readouterr().err.strip()
    assert "group.num_experts" in err and "\n" not in err
    assert main(["train", "--all", "--out", str(tmp_path / "r"), "group.no_such_key=1"]) == 2
    assert not (tmp_path / "r").exists()


def test_later_stage_needs_the_earlier_one(tmp_path, capsys):
    assert main(["train", "--stage", "group", "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "needs stage population" in capsys.readouterr().err


def test_generate_says_which_model_answered_and_refuses_unknown_users(trained, capsys):
    split = json.loads((trained / "split.json").read_text())
    target = split["target"][0]
    assert main(["generate", "--run", str(trained), "--user", target, "--max-new-tokens", "2", "hello"]) == 0
    assert f"personalized for {target}" in capsys.readouterr().err
    assert main(["generate", "--run", str(trained), "--user", "base", "--max-new-tokens", "2", "hello"]) == 0
    assert "non-personalized" in capsys.readouterr().err
    # A stage-2 user without a LoRA is answered by their group (their stage-2 embedding)...
    trainer = split["train"][0]
    assert main(["generate", "--run", str(trained), "--user", trainer, "--max-new-tokens", "2", "hello"]) == 0
    assert f"personalized for {trainer} (their stage-2 group)" in capsys.readouterr().err
    # ... a mistyped id is an error naming it, not a silent fallback...
    assert main(["generate", "--run", str(trained), "--user", "nobody", "--max-new-tokens", "2", "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown user 'nobody'" in err and "\n" not in err
    # ... unless the caller asks for the fallback, and then the answer says so.
    assert main(["generate", "--run", str(trained), "--user", "nobody", "--fallback", "--max-new-tokens", "2", "x"]) == 0
    assert "non-personalized model (nobody has no personalized model)" in capsys.readouterr().err
    assert main(["generate", "--run", str(trained / "missing"), "--user", "u", "q"]) == 2


def test_every_command_has_help(capsys):
    for cmd in ("train", "generate", "evaluate", "report", "demo", "data"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage:" in capsys.readouterr().out


def test_users_add_trains_only_the_new_user_and_delete_removes_them(tmp_path, h):
    import shutil

    from properlm.store.run import open_bank

    run = tmp_path / "run"
    assert main(["train", "--all", "--out", str(run), *TINY]) == 0
    split = json.loads((run / "split.json").read_text())
    newcomer = split["train"][0]  # has history in the run's data but no LoRA yet
    before = h.bank_files(run, "lora")
    earlier = {u: h.bank_user(run, "lora", u) for u in split["target"]}
    split_before = (run / "split.json").read_bytes()
    assert main(["users", "add", "--run", str(run), "--users", newcomer]) == 0
    bank = open_bank(run, "lora")
    assert sorted(bank.users()) == sorted(split["target"] + [newcomer])
    after = h.bank_files(run, "lora")
    for f, data in before.items():  # existing users' files: byte for byte
        if not f.endswith("index.json"):
            assert after.get(f) == data, f
    for u, t in earlier.items():
        got = h.bank_user(run, "lora", u)
        assert all(torch.equal(got[k], v) for k, v in t.items()), u
    new = h.bank_user(run, "lora", newcomer)
    assert any(v.abs().max() > 0 for k, v in new.items() if k.endswith("lora_B"))
    assert (run / "split.json").read_bytes() == split_before, "adding a user rewrites no run-wide file"
    assert not (run / "checkpoints" / "add-users").exists() or not any((run / "checkpoints" / "add-users").iterdir())

    assert main(["users", "delete", "--run", str(run), "--users", newcomer, split["target"][0]]) == 0
    left = sorted(bank.users())
    assert newcomer not in left and split["target"][0] not in left
    assert newcomer not in open_bank(run, "emb")
    from properlm import load_run
    assert split["target"][0] not in load_run(run).users
    shutil.rmtree(run)


@pytest.mark.parametrize("bad", ["base", "properlm", "..", "a\nb", "x" * 129])
def test_users_add_refuses_ids_the_server_could_not_tell_apart(trained, capsys, bad):
    """The id rule of the server's onboarding (properlm.user_ids), from the command line too."""
    assert main(["users", "add", "--run", str(trained), "--users", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("properlm: error:") and "\n" not in err and "user id" in err
