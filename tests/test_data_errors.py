"""Every kind of bad input gives one DataError line naming file, record and field;
the CLI prints it as ``properlm: error: ...``, exits 2, and writes nothing."""

import json
import shutil
from pathlib import Path

import pytest

from properlm.cli import main
from properlm.data import load_dataset
from properlm.errors import DataError

FIX = Path(__file__).parent / "fixtures"
Q3 = (FIX / "lamp3" / "dev_questions.json").read_text()
GOLDS3 = json.loads((FIX / "lamp3" / "dev_outputs.json").read_text())


def lamp3(tmp, questions=None, outputs=None, raw: bytes | None = None):
    """A LaMP-3 directory from edited copies of the fixture."""
    d = tmp / "lamp"
    d.mkdir()
    if raw is not None:
        (d / "dev_questions.json").write_bytes(raw)
    else:
        (d / "dev_questions.json").write_text(json.dumps(questions if questions is not None else json.loads(Q3)))
    (d / "dev_outputs.json").write_text(json.dumps(outputs if outputs is not None else GOLDS3))
    return d


def edited(fn):
    qs = json.loads(Q3)
    fn(qs)
    return qs


def oppu(tmp, edit):
    d = tmp / "oppu"
    shutil.copytree(FIX / "oppu_movie_tagging", d)
    files = {p.name: json.loads(p.read_text()) for p in d.glob("*.json")}
    edit(files)
    for name, data in files.items():
        (d / name).write_text(json.dumps(data))
    return d


def jsonl(tmp, text: str | bytes):
    p = tmp / "log.jsonl"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def ml100k(tmp, data: str):
    d = tmp / "ml"
    d.mkdir()
    (d / "u.item").write_bytes("1|Caf\xe9 (1995)|01-Jan-1995||http://x|0|1|0|0|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
                               .encode("latin-1"))
    (d / "u.data").write_text(data)
    return d


OK_JSONL = '{"user_id": "a", "prompt": "p", "response": "r"}\n'

# name -> (builder(tmp) -> path, file that must be named, substrings the message must contain)
CASES = {
    "malformed json": (lambda t: lamp3(t, raw=b'[{"id": "1", "input": "x", "profile": [}]'),
                       "dev_questions.json", ["malformed JSON at line 1"]),
    "truncated json": (lambda t: lamp3(t, raw=Q3[:300].encode()), "dev_questions.json", ["malformed JSON"]),
    "non-utf8 bytes": (lambda t: lamp3(t, raw=Q3.replace("kettle", "kett\udcffle").encode("utf-8", "surrogateescape")),
                       "dev_questions.json", ["not valid UTF-8", "line 4"]),
    "missing input": (lambda t: lamp3(t, edited(lambda q: q[1].pop("input"))),
                      "dev_questions.json", ["record #1", "field 'input'"]),
    "missing item field": (lambda t: lamp3(t, edited(lambda q: q[0]["profile"][1].pop("score"))),
                           "dev_questions.json", ["record #0 (id=3100) profile[1] (id=31000)", "field 'score'",
                                                  "LaMP-3"]),
    "item not text": (lambda t: lamp3(t, edited(lambda q: q[0]["profile"][0].update(text=["a"]))),
                      "dev_questions.json", ["profile[0]", "field 'text'", "expected text"]),
    "unknown task": (lambda t: lamp3(t, outputs={**GOLDS3, "task": "LaMP_9"}),
                     "dev_outputs.json", ["field 'task'", "unknown task 'LaMP_9'", "LaMP-2M"]),
    "no history": (lambda t: lamp3(t, edited(lambda q: q[2].update(profile=[]))),
                   "dev_questions.json", ["record #2 (id=3102)", "field 'profile'", "history"]),
    "duplicate question id": (lambda t: lamp3(t, edited(lambda q: q[2].update(id="3100"))),
                              "dev_questions.json", ["record #2 (id=3100)", "field 'id'", "duplicate"]),
    "gold id matches no question": (
        lambda t: lamp3(t, outputs={"task": "LaMP_3", "golds": GOLDS3["golds"] + [{"id": "9999", "output": "2"}]}),
        "dev_outputs.json", ["record id=9999", "field 'id'", "matches no question"]),
    "question without gold": (lambda t: lamp3(t, outputs={"task": "LaMP_3", "golds": GOLDS3["golds"][:2]}),
                              "dev_questions.json", ["record id=3102", "field 'id'", "no gold"]),
    "gold missing output": (lambda t: lamp3(t, outputs={"task": "LaMP_3", "golds": [{"id": "3100"}]}),
                            "dev_outputs.json", ["record golds[0]", "field 'output'"]),
    "oppu duplicate user": (lambda t: oppu(t, lambda f: f["user_top_100_history.json"][0].update(user_id="501")),
                            "oppu", ["user_id=501", "field 'user_id'", "duplicate user id"]),
    "oppu gold matches no query": (
        lambda t: oppu(t, lambda f: f["user_top_100_history_label.json"]["golds"].append({"id": "7", "output": "x"})),
        "user_top_100_history_label.json", ["record id=7", "field 'id'"]),
    "oppu missing profile": (lambda t: oppu(t, lambda f: f["user_others.json"][1].pop("profile")),
                             "user_others.json", ["record #1 (user_id=502)", "field 'profile'"]),
    "oppu duplicate query id": (lambda t: oppu(t, lambda f: f["user_others.json"][1]["query"][0].update(id="5010")),
                                "oppu", ["query 5010", "field 'id'", "duplicate query id"]),
    "jsonl malformed line": (lambda t: jsonl(t, OK_JSONL + '{"user_id": "a", "prompt": \n'),
                             "log.jsonl", ["record line 2", "malformed JSON"]),
    "jsonl missing response": (lambda t: jsonl(t, OK_JSONL + OK_JSONL + '{"user_id": "b", "prompt": "p"}\n'),
                               "log.jsonl", ["record line 3", "field 'response'"]),
    "jsonl bad split": (lambda t: jsonl(t, '{"user_id": "a", "prompt": "p", "response": "r", "split": "test"}\n'),
                        "log.jsonl", ["record line 1", "field 'split'"]),
    "jsonl only queries": (lambda t: jsonl(t, '{"user_id": "a", "prompt": "p", "response": "r", "split": "query"}\n'),
                           "log.jsonl", ["record line 1", "field 'split'", "no history"]),
    "jsonl duplicate id": (lambda t: jsonl(t, '{"user_id": "a", "id": "x", "prompt": "p", "response": "r"}\n' * 2),
                           "log.jsonl", ["record line 2", "field 'id'", "duplicate"]),
    "jsonl non-utf8": (lambda t: jsonl(t, OK_JSONL.encode() + b'{"user_id": "\xff"}\n'),
                       "log.jsonl", ["not valid UTF-8", "line 2"]),
    "movielens bad rating": (lambda t: ml100k(t, "1\t1\t5\t100\n1\t1\t9\t200\n"),
                             "u.data", ["record line 2", "field 'rating'"]),
    "movielens unknown movie": (lambda t: ml100k(t, "1\t1\t5\t100\n1\t2\t3\t200\n"),
                                "u.data", ["movie 2", "field 'item'"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loader_error_names_file_record_field(tmp_path, case):
    build, filename, parts = CASES[case]
    with pytest.raises(DataError) as e:
        load_dataset(build(tmp_path))
    message = str(e.value)
    assert "\n" not in message and filename in message
    for part in parts:
        assert part in message, (part, message)


@pytest.mark.parametrize("case", list(CASES))
def test_cli_prints_one_line_exits_2_and_writes_nothing(tmp_path, capsys, case):
    path = CASES[case][0](tmp_path)
    out = tmp_path / "converted"
    assert main(["data", "convert", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("properlm: error: ") and err.count("\n") == 1 and CASES[case][1] in err
    assert not out.exists()
    assert main(["data", "inspect", str(path)]) == 2


def test_cli_unknown_task_option(tmp_path, capsys):
    assert main(["data", "inspect", str(FIX / "lamp3"), "--task", "LaMP-42"]) == 2
    assert "unknown task 'LaMP-42'" in capsys.readouterr().err


def test_cli_missing_path(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_unrecognized_layout(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hi")
    assert main(["data", "inspect", str(tmp_path)]) == 2
    assert "cannot tell the layout" in capsys.readouterr().err
