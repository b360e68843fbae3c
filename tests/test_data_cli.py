"""The CLI's data commands, called through ``main``."""

import json
import sys
import types
from pathlib import Path

import pytest

from properlm import cli
from properlm.cli import main
from properlm.data import generate, load_dataset

FIX = Path(__file__).parent / "fixtures"


def test_inspect_text_and_json(capsys):
    assert main(["data", "inspect", str(FIX / "lamp3")]) == 0
    out = capsys.readouterr().out
    assert "LaMP-3 (rating)" in out and "users     3" in out
    assert main(["data", "inspect", str(FIX / "tiny.jsonl"), "--json", "--n-queries", "1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["task"] == "jsonl" and info["users"] == 3 and info["queries"] == 3


def test_inspect_with_task_option(tmp_path, capsys):
    (tmp_path / "q.json").write_text((FIX / "lamp3" / "dev_questions.json").read_text())
    assert main(["data", "inspect", str(tmp_path / "q.json"), "--task", "lamp3"]) == 0
    assert "0 with gold" in capsys.readouterr().out


def test_synth_writes_lamp_layout_that_inspect_reads(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["data", "synth", "--out", str(out), "--seed", "1", "--users", "12", "--groups", "3"]) == 0
    assert "12 users in 3 groups" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["outputs.json", "questions.json"]
    assert load_dataset(out).users == generate(seed=1, n_users=12, n_groups=3).users
    assert main(["data", "inspect", str(out)]) == 0
    assert "3 planted" in capsys.readouterr().out


def test_synth_gen_and_bad_setting(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "g"), "--task", "synth-gen", "--users", "5"]) == 0
    assert load_dataset(tmp_path / "g").task == "synth-gen"
    assert main(["data", "synth", "--out", str(tmp_path / "bad"), "--users", "0"]) == 2
    assert capsys.readouterr().err.startswith("properlm: error: ")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("src", ["lamp3", "lamp2m", "oppu_movie_tagging", "tiny.jsonl"])
def test_convert_round_trips(tmp_path, src, capsys):
    assert main(["data", "convert", str(FIX / src), "--out", str(tmp_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_dataset(tmp_path).users == load_dataset(FIX / src).users


def test_help_and_no_command(capsys):
    assert main([]) == 0
    assert "data" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert main(["data"]) == 0
    assert "inspect" in capsys.readouterr().out


def test_commands_table_accepts_module_strings(monkeypatch):
    module = types.ModuleType("properlm_fake_commands")
    module.register = lambda sub: sub.add_parser("extra").set_defaults(func=lambda args: 7)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "extra", f"{module.__name__}:register")
    assert main(["extra"]) == 7


def test_unwritable_out_is_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["data", "synth", "--out", str(blocker / "sub"), "--users", "3"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
