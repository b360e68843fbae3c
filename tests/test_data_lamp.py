"""LaMP loader and exporter: users, merging by user_id, date order, golds, round trip."""

import json
from pathlib import Path

import pytest

from properlm.data import export_lamp, generate, load_dataset
from properlm.data.lamp import find_lamp_files, load_lamp, task_from_path
from properlm.errors import DataError

FIX = Path(__file__).parent / "fixtures"


def same(a, b):
    return a.task == b.task and a.users == b.users and a.meta == b.meta


def test_raw_lamp3_each_question_is_a_user():
    ds = load_dataset(FIX / "lamp3")
    assert ds.task == "LaMP-3" and [u.id for u in ds.users] == ["3100", "3101", "3102"]
    u = ds.users[0]
    assert [it.id for it in u.history] == ["31000", "31001", "31002"]  # sorted by date
    assert u.history[2].fields["score"] == "3.0"  # a numeric score is kept as text
    assert u.queries[0].id == "3100" and u.queries[0].gold == "5"
    assert ds.users[2].history[0].date is None


def test_questions_file_path_finds_its_outputs():
    q, o = find_lamp_files(FIX / "lamp3" / "dev_questions.json")
    assert o == FIX / "lamp3" / "dev_outputs.json"
    assert load_dataset(q).users[1].queries[0].gold == "1"


def test_user_id_merges_questions_and_dedups_profiles():
    ds = load_dataset(FIX / "lamp2m")
    assert ds.task == "LaMP-2M" and [u.id for u in ds.users] == ["21", "22"]
    u = ds.user("21")
    assert [it.id for it in u.history] == ["2100", "2101", "2102"]
    assert [(q.id, q.gold) for q in u.queries] == [("210", "action"), ("211", "fantasy")]


def test_task_without_outputs(tmp_path):
    (tmp_path / "q.json").write_text((FIX / "lamp3" / "dev_questions.json").read_text())
    with pytest.raises(DataError, match="cannot tell the task") as e:
        load_dataset(tmp_path / "q.json")
    assert e.value.field == "task"
    ds = load_dataset(tmp_path / "q.json", task="LaMP_3")
    assert ds.task == "LaMP-3" and all(q.gold is None for u in ds.users for q in u.queries)


def test_task_from_path_and_lamp2_sniffing(tmp_path):
    assert task_from_path("/data/LaMP_2M/dev_questions.json") == "LaMP_2M"
    assert task_from_path("/data/lamp-4/x.json") == "LaMP_4"
    d = tmp_path / "LaMP_2"
    d.mkdir()
    (d / "dev_questions.json").write_text((FIX / "lamp2m" / "train_questions.json").read_text())
    assert load_dataset(d).task == "LaMP-2M"  # plain LaMP_2 resolved by the profile's tag field


def test_task_argument_must_agree_with_outputs():
    with pytest.raises(DataError, match="outputs file says"):
        load_dataset(FIX / "lamp3", task="LaMP-4")


def test_directory_with_two_splits_is_ambiguous(tmp_path):
    for split in ("dev", "train"):
        (tmp_path / f"{split}_questions.json").write_text("[]")
    with pytest.raises(DataError, match="several"):
        load_lamp(tmp_path)


@pytest.mark.parametrize("fixture", ["lamp3", "lamp2m"])
def test_round_trip_fixture(tmp_path, fixture):
    ds = load_dataset(FIX / fixture)
    written = export_lamp(ds, tmp_path / "out")
    assert {p.name for p in written} == {"questions.json", "outputs.json"}
    assert same(load_dataset(tmp_path / "out"), ds)
    gold = json.loads((tmp_path / "out" / "outputs.json").read_text())
    assert gold["task"] == ds.task.replace("-", "_")


def test_round_trip_synthetic_keeps_groups_quirks_and_meta(tmp_path):
    ds = generate("synth-gen", n_users=12, n_groups=3, seed=4, max_history=15)
    export_lamp(ds, tmp_path)
    back = load_dataset(tmp_path)
    assert same(back, ds) and back.users[0].group == ds.users[0].group


def test_users_without_queries_survive_in_side_file(tmp_path):
    ds = generate("synth-cls", n_users=4, n_groups=2, seed=0, max_history=6)
    ds.users[1].queries = []
    written = export_lamp(ds, tmp_path)
    assert "users_without_queries.json" in {p.name for p in written}
    assert same(load_dataset(tmp_path), ds)
    ds.users[1].queries = generate("synth-cls", n_users=4, n_groups=2, seed=0, max_history=6).users[1].queries
    export_lamp(ds, tmp_path)  # a stale side file from the last export must not resurrect users
    assert not (tmp_path / "users_without_queries.json").exists()
    assert same(load_dataset(tmp_path), ds)


def test_export_refuses_partial_golds_and_writes_nothing(tmp_path):
    ds = generate("synth-cls", n_users=3, n_groups=2, seed=0, max_history=6)
    ds.users[2].queries[0].gold = None
    with pytest.raises(DataError) as e:
        export_lamp(ds, tmp_path / "out")
    assert e.value.field == "gold" and not (tmp_path / "out").exists()
