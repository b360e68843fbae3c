"""OPPU's processed layout: training and test users, golds from the label file, the split marks."""

import json
import shutil
from pathlib import Path

import pytest

from properlm.data import export_lamp, load_dataset, split_users
from properlm.data.oppu import load_oppu
from properlm.errors import DataError

FIX = Path(__file__).parent / "fixtures" / "oppu_movie_tagging"


def test_loads_both_files_and_marks_the_split():
    ds = load_dataset(FIX)
    assert ds.task == "LaMP-2M"
    assert [(u.id, u.meta["oppu_split"]) for u in ds.users] == [
        ("501", "train"), ("502", "train"), ("601", "test"), ("602", "test")]
    assert ds.user("501").queries[0].gold == "sci-fi"  # inline gold
    assert [(q.id, q.gold) for q in ds.user("601").queries] == [("6010", "action"), ("6011", "fantasy")]
    assert len(ds.user("602").history) == 4


def test_a_file_path_loads_its_directory():
    assert len(load_dataset(FIX / "user_others.json").users) == 4


def test_split_follows_the_marks():
    train, targets = split_users(load_dataset(FIX), mode="oppu", n=100)
    assert [u.id for u in train] == ["501", "502"] and [u.id for u in targets] == ["601", "602"]


def test_task_from_directory_name_without_label_file(tmp_path):
    d = tmp_path / "movie_tagging"
    shutil.copytree(FIX, d)
    (d / "user_top_100_history_label.json").unlink()
    ds = load_oppu(d)
    assert ds.task == "LaMP-2M" and ds.user("601").queries[0].gold is None


def test_no_task_anywhere(tmp_path):
    d = tmp_path / "data"
    shutil.copytree(FIX, d)
    (d / "user_top_100_history_label.json").unlink()
    with pytest.raises(DataError, match="cannot tell the task"):
        load_oppu(d)
    assert load_oppu(d, task="LaMP-2M").task == "LaMP-2M"


def test_label_file_as_bare_list_and_missing_user_id(tmp_path):
    d = tmp_path / "movie_tagging"
    shutil.copytree(FIX, d)
    label = d / "user_top_100_history_label.json"
    label.write_text(json.dumps(json.loads(label.read_text())["golds"]))
    users = json.loads((d / "user_others.json").read_text())
    del users[0]["user_id"]
    (d / "user_others.json").write_text(json.dumps(users))
    ds = load_oppu(d)
    assert ds.users[0].id == "oppu-train-0" and ds.user("602").queries[0].gold == "dystopia"


def test_test_query_without_gold_in_label_file(tmp_path):
    d = tmp_path / "o"
    shutil.copytree(FIX, d)
    label = d / "user_top_100_history_label.json"
    data = json.loads(label.read_text())
    data["golds"] = data["golds"][:2]
    label.write_text(json.dumps(data))
    with pytest.raises(DataError) as e:
        load_oppu(d)
    assert e.value.field == "id" and "6020" in e.value.record and "user_top_100_history.json" in str(e.value)


def test_converts_to_lamp_with_split_marks(tmp_path):
    ds = load_dataset(FIX)
    export_lamp(ds, tmp_path)
    back = load_dataset(tmp_path)
    assert back.users == ds.users
