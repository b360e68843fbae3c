"""MovieLens as a rating task, from tiny hand-written files in both layouts (never the real data)."""

from pathlib import Path

import pytest

from properlm.data import export_lamp, load_dataset
from properlm.data.movielens import load_movielens, movie_text, round_rating
from properlm.data.tasks import MOVIELENS_PROMPT
from properlm.errors import ConfigError, DataError

def flags(*on: int) -> str:
    f = ["0"] * 19
    for i in on:
        f[i] = "1"
    return "|".join(f)


@pytest.fixture
def ml100k(tmp_path: Path) -> Path:
    d = tmp_path / "ml-100k"
    d.mkdir()
    items = [f"10|Caf\xe9 Society (1995)|01-Jan-1995||http://x|{flags(5, 14)}",
             f"11|Heat (1995)|01-Jan-1995||http://x|{flags(1, 6, 16)}",
             f"12|unknown||||{flags(0)}"]
    (d / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    # user 2 rated out of time order in the file; user 1 has two ratings at the same second.
    (d / "u.data").write_text("2\t11\t4\t300\n1\t10\t5\t100\n2\t10\t2\t100\n1\t12\t1\t200\n"
                              "1\t11\t3\t200\n2\t12\t3\t200\n")
    (d / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    return d


@pytest.fixture
def mlcsv(tmp_path: Path) -> Path:
    d = tmp_path / "ml-latest-small"
    d.mkdir()
    (d / "movies.csv").write_text('movieId,title,genres\n1,Toy Story (1995),Adventure|Animation|Children\n'
                                  '2,"American President, The (1995)",Comedy|Drama|Romance\n'
                                  '3,Strange Film (2001),(no genres listed)\n')
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n7,1,3.5,964982703\n7,2,0.5,964981247\n"
                                   "7,3,2.5,964982224\n9,2,4.0,1000000000\n9,1,4.5,1000000001\n")
    return d


def test_100k_layout(ml100k):
    ds = load_dataset(ml100k, n_queries=1)
    assert ds.task == "movielens" and [u.id for u in ds.users] == ["1", "2"]
    u1 = ds.user("1")
    assert u1.meta == {"age": "24", "gender": "M", "occupation": "technician", "zip": "85711"}
    # time order, ties by movie id; the latest rating is the query
    assert [it.id for it in u1.history] == ["10", "11"]
    assert u1.history[0].fields == {"text": "Café Society (1995) | Comedy, Romance", "score": "5"}
    assert u1.history[0].date == "1970-01-01T00:01:40"
    assert u1.queries[0].id == "1-12" and u1.queries[0].gold == "1"
    assert u1.queries[0].input == MOVIELENS_PROMPT.format(text="unknown")
    assert [it.id for it in ds.user("2").history] == ["10", "12"]
    assert ds.user("2").history[1].fields["text"] == "unknown"


def test_default_keeps_one_history_item(ml100k):
    ds = load_dataset(ml100k)  # n_queries=5 > 3 ratings per user
    assert all(len(u.history) == 1 and len(u.queries) == 2 for u in ds.users)


def test_csv_layout_rounds_half_stars_up(mlcsv):
    ds = load_movielens(mlcsv, n_queries=1)
    u7 = ds.user("7")
    assert [(it.id, it.fields["score"]) for it in u7.history] == [("2", "1"), ("3", "3")]
    assert u7.history[0].fields["text"] == "American President, The (1995) | Comedy, Drama, Romance"
    assert u7.history[1].fields["text"] == "Strange Film (2001)"
    assert u7.queries[0].gold == "4" and ds.user("9").queries[0].gold == "5"
    assert u7.meta == {}


def test_helpers():
    assert [round_rating(x) for x in (0.5, 1.0, 1.5, 2.5, 3.5, 4.5, 5.0)] == [1, 1, 2, 3, 4, 5, 5]
    assert movie_text("X (1990)", ["unknown"]) == "X (1990)"


def test_round_trip_through_lamp(ml100k, tmp_path):
    ds = load_dataset(ml100k, n_queries=1)
    export_lamp(ds, tmp_path / "out")
    back = load_dataset(tmp_path / "out")
    assert back.users == ds.users and back.task == "movielens"


def test_csv_missing_column(mlcsv):
    (mlcsv / "ratings.csv").write_text("userId,movieId,stars,timestamp\n7,1,3.5,1\n")
    with pytest.raises(DataError) as e:
        load_dataset(mlcsv)
    assert e.value.field == "rating" and "ratings.csv" in str(e.value)


def test_csv_bad_number(mlcsv):
    (mlcsv / "ratings.csv").write_text("userId,movieId,rating,timestamp\n7,1,3.5,1\n7,2,lots,2\n")
    with pytest.raises(DataError) as e:
        load_dataset(mlcsv)
    assert e.value.record == "line 3" and e.value.field == "rating"


def test_task_option_must_be_movielens(ml100k):
    with pytest.raises(ConfigError):
        load_dataset(ml100k, task="LaMP-3")
