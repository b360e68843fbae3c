"""Streaming reads: JSONL line by line, LaMP element by element, one-pass inspect, bucketed convert.

Every streaming path is checked against the in-memory one it replaces: the same
summary, the same files byte for byte, and the same error for the same bad record.
"""

import importlib.util
import json
import random
from pathlib import Path

import pytest

from properlm import io
from properlm.cli import main
from properlm.data import export_lamp, generate, inspect_dataset, load_dataset
from properlm.data import jsonl as jsonl_mod
from properlm.data.inspect import inspect_path
from properlm.data.jsonl import convert_jsonl, load_jsonl
from properlm.data.lamp import iter_json_list, read_golds
from properlm.data.stream import JsonReader, iter_lines
from properlm.errors import DataError

FIX = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).parent.parent


def _make_big_log():
    spec = importlib.util.spec_from_file_location("make_big_log", ROOT / "scripts" / "make_big_log.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def big_log(path: Path, users=200, records=3000, *extra: str) -> Path:
    assert _make_big_log()(["--users", str(users), "--records", str(records), "--out", str(path), *extra]) == 0
    return path


def outcome(fn):
    try:
        return "ok", fn()
    except DataError as e:
        return "error", str(e)


# --- inspect: one pass, same summary -------------------------------------------------


def _synth_dir(tmp_path, drop_queries=False):
    ds = generate("synth-cls", n_users=9, n_groups=3, seed=2, max_history=12)
    if drop_queries:
        ds.users[4].queries = []
    export_lamp(ds, tmp_path / "synth")
    return tmp_path / "synth"


@pytest.mark.parametrize("src", ["lamp3", "lamp2m", "oppu_movie_tagging", "tiny.jsonl", "synth", "synth-side-file",
                                 "converted-oppu", "generated.jsonl"])
@pytest.mark.parametrize("n_queries", [1, 5])
def test_streaming_inspect_equals_in_memory(tmp_path, src, n_queries):
    if src.startswith("synth"):
        path = _synth_dir(tmp_path, drop_queries=src == "synth-side-file")
    elif src == "converted-oppu":  # user_id, groups-free, oppu_split in user_meta: merged users
        export_lamp(load_dataset(FIX / "oppu_movie_tagging"), tmp_path / "c")
        path = tmp_path / "c"
    elif src == "generated.jsonl":
        path = big_log(tmp_path / "g.jsonl", 40, 600)
    else:
        path = FIX / src
    expected = inspect_dataset(load_dataset(path, n_queries=n_queries))
    assert inspect_path(path, n_queries=n_queries) == expected


def _random_log(rng: random.Random) -> str:
    """A small log full of the cases the loader's checks care about (ids that collide, splits, times)."""
    lines = []
    for _ in range(rng.randint(1, 20)):
        rec = {"user_id": rng.choice(["a", "b", "a-1", 7]), "prompt": rng.choice(["p", "q", "p", ""])}
        if rng.random() < 0.98:
            rec["response"] = "r"
        if rng.random() < 0.7:
            rec["time"] = rng.choice([1, 3, "10", "9", "2024-01-01", "2023-05-05", 2.5])
        if rng.random() < 0.3:
            rec["split"] = rng.choice(["history", "query", "query"])
        if rng.random() < 0.25:
            rec["id"] = rng.choice(["x", "y", "a-3", "a-5", "7-2", "a-1-2"])
        lines.append(json.dumps(rec))
    return "\n".join(lines) + "\n"


def test_scan_and_convert_agree_with_loader_on_random_logs(tmp_path):
    """Same summary or same error (first bad record, duplicate ids, all-query users, empty inputs,
    partial golds), and byte-identical files, for many small logs with multi-bucket converts."""
    outcomes = set()
    for seed in range(150):
        rng = random.Random(seed)
        d = tmp_path / str(seed)
        d.mkdir()
        log = d / "log.jsonl"
        log.write_text(_random_log(rng))
        nq = rng.choice([0, 1, 2, 5])
        memory = outcome(lambda: inspect_dataset(load_dataset(log, n_queries=nq)))
        assert outcome(lambda: inspect_path(log, n_queries=nq)) == memory, seed

        def old():
            return [p.name for p in export_lamp(load_dataset(log, n_queries=nq), d / "old")]

        def new():
            return [p.name for p in convert_jsonl(log, d / "new", nq, bucket_records=rng.choice([1, 3]))[1]]

        a, b = outcome(old), outcome(new)
        outcomes.add(a[0])
        if a[0] == "error":
            assert b == ("error", a[1].replace("old", "new")), seed
            assert not (d / "new").exists()
        else:
            assert a == b, seed
            for name in a[1]:
                assert (d / "old" / name).read_bytes() == (d / "new" / name).read_bytes(), (seed, name)
        assert [p.name for p in d.iterdir() if p.name.startswith(".")] == []  # no temporary left behind
    assert outcomes == {"ok", "error"}


# --- convert: bounded memory, same files ---------------------------------------------


def test_convert_generated_log_round_trips_across_buckets(tmp_path, monkeypatch, capsys):
    log = big_log(tmp_path / "log.jsonl", 150, 4000)
    monkeypatch.setattr(jsonl_mod, "BUCKET_RECORDS", 500)  # several buckets
    assert main(["data", "convert", str(log), "--out", str(tmp_path / "out")]) == 0
    assert "wrote jsonl: 150 users" in capsys.readouterr().out
    ds = load_jsonl(log)
    back = load_dataset(tmp_path / "out")
    assert back.users == ds.users and back.task == "jsonl"
    export_lamp(ds, tmp_path / "memory")
    for name in ("questions.json", "outputs.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "memory" / name).read_bytes()


def test_convert_keeps_users_without_queries(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"user_id": "a", "prompt": "1", "response": "r"}\n'
                   '{"user_id": "b", "prompt": "2", "response": "r"}\n'
                   '{"user_id": "b", "prompt": "3", "response": "s"}\n')
    n, written = convert_jsonl(log, tmp_path / "out", bucket_records=1)
    assert n == 2 and "users_without_queries.json" in {p.name for p in written}
    assert load_dataset(tmp_path / "out").users == load_dataset(log).users


@pytest.mark.parametrize("kind,message", [("field", "field 'prompt'"), ("json", "malformed JSON"),
                                          ("utf8", "not valid UTF-8")])
def test_bad_last_record_of_generated_log_is_reported_and_nothing_written(tmp_path, capsys, kind, message):
    log = big_log(tmp_path / "log.jsonl", 100, 3000, "--bad-line", "3000", "--bad-kind", kind)
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["data", "convert", str(log), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "log.jsonl" in err and "line 3000" in err and message in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]
    out.mkdir()
    (out / "questions.json").write_text("old")
    assert main(["data", "convert", str(log), "--out", str(out)]) == 2
    assert [p.name for p in out.iterdir()] == ["questions.json"] and (out / "questions.json").read_text() == "old"
    assert main(["data", "inspect", str(log)]) == 2
    assert "line 3000" in capsys.readouterr().err


@pytest.mark.parametrize("line", [1, 2, 7])
def test_bad_utf8_names_its_line(tmp_path, line):
    rows = [f'{{"user_id": "u", "prompt": "p{i}", "response": "r"}}\n'.encode() for i in range(8)]
    rows[line - 1] = rows[line - 1].replace(b'"p', b'"\xc3(p')
    log = tmp_path / "log.jsonl"
    log.write_bytes(b"".join(rows))
    offset = sum(len(r) for r in rows[: line - 1]) + rows[line - 1].index(b"\xc3")
    for fn in (load_dataset, inspect_path):
        with pytest.raises(DataError) as e:
            fn(log)
        assert str(e.value) == f"{log}: not valid UTF-8 (byte {offset}, line {line})"


def test_lines_split_on_newline_only(tmp_path):
    """A raw U+2028 or a lone \\r is legal inside a JSON string; it does not end a line."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"user_id": "a", "prompt": "one\u2028two\\r", "response": "r\x85"}\r\n'
                   '{"user_id": "a", "prompt": "x", "response": "y"}\n', encoding="utf-8")
    assert [n for n, _ in iter_lines(log)] == [1, 2]
    u = load_dataset(log).users[0]
    assert u.history[0].fields == {"prompt": "one\u2028two\r", "response": "r\x85"}
    assert inspect_path(log)["users"] == 1


# --- the incremental JSON reader ------------------------------------------------------


DOC = [{"id": "1", "text": "caf\u00e9 \U0001F600 \u20ac", "n": 12345.678e-3, "deep": [[1, 2], {"a": None}]},
       123456789, -0.5e10, "\\\"", True, None, [], {}, "x" * 50]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64])
@pytest.mark.parametrize("indent", [None, 2])
def test_reader_matches_json_loads_at_any_chunk_size(tmp_path, chunk, indent, monkeypatch):
    monkeypatch.setattr("properlm.data.stream.CHUNK", chunk)
    p = tmp_path / "d.json"
    p.write_text(json.dumps(DOC, indent=indent, ensure_ascii=False), encoding="utf-8")
    assert list(iter_json_list(p, "a list")) == json.loads(p.read_text(encoding="utf-8"))
    p.write_text(json.dumps({"task": "LaMP_3", "golds": [{"id": "1", "output": "5"}, {"id": 2, "output": 4}],
                             "meta": {"k": [1]}}, indent=indent))
    assert read_golds(p) == ("LaMP_3", {"1": "5", "2": "4"}, {"k": [1]})


@pytest.mark.parametrize("chunk", [1, 4, 1 << 20])
def test_reader_errors_read_like_json_loads(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr("properlm.data.stream.CHUNK", chunk)
    text = json.dumps(DOC, indent=1, ensure_ascii=False)
    p = tmp_path / "d.json"
    rng = random.Random(0)
    for _ in range(60):
        i = rng.randrange(len(text))
        broken = rng.choice([text[:i], text[:i] + text[i + 1:], text[:i] + rng.choice(',]}"x') + text[i:]])
        p.write_text(broken, encoding="utf-8")
        assert outcome(lambda: list(iter_json_list(p, "a JSON list"))) == outcome(lambda: _old_read_list(p))
    data = json.dumps(DOC, ensure_ascii=False).encode()
    p.write_bytes(data[:40] + b"\xff" + data[40:])
    with pytest.raises(DataError) as e:
        list(iter_json_list(p, "a JSON list"))
    with pytest.raises(DataError) as old:
        io.read_json(p)
    assert str(e.value) == str(old.value)


def _old_read_list(p):
    data = io.read_json(p)
    if not isinstance(data, list):
        raise DataError(str(p), "expected a JSON list")
    return data


def test_reader_walks_objects_and_rejects_trailing_data(tmp_path):
    p = tmp_path / "o.json"
    p.write_text('{"a": 1, "golds": [1, 2] ,"b": {"c": [3]}}  ')
    with JsonReader(p) as r:
        seen = {}
        for key in r.keys():
            seen[key] = list(r.array()) if key == "golds" else r.value()
        r.end()
    assert seen == {"a": 1, "golds": [1, 2], "b": {"c": [3]}}
    p.write_text("[1, 2]\n x")
    with pytest.raises(DataError, match="line 2 column 2: Extra data"):
        list(iter_json_list(p, "a list"))
    p.write_text('{"x": 1}')
    with pytest.raises(DataError, match="expected a JSON list of questions"):
        load_dataset(p, task="LaMP-3")
