"""MovieLens 1M's ``.dat`` layout, from a tiny invented fixture (tests/fixtures/ml1m, not MovieLens data)."""

import shutil
from pathlib import Path

import pytest

from properlm.cli import main
from properlm.data import export_lamp, inspect_dataset, load_dataset
from properlm.data.load import detect_format
from properlm.data.movielens import load_movielens, movielens_layout
from properlm.data.tasks import MOVIELENS_PROMPT
from properlm.errors import DataError

FIX = Path(__file__).parent / "fixtures" / "ml1m"


@pytest.fixture
def ml1m(tmp_path: Path) -> Path:
    d = tmp_path / "ml-1m"
    shutil.copytree(FIX, d)
    return d


def test_detected_as_movielens_1m():
    assert movielens_layout(FIX) == "1m" and detect_format(FIX) == "movielens"


def test_items_order_and_demographics():
    ds = load_dataset(FIX, n_queries=1)
    assert ds.task == "movielens" and ds.meta == {"layout": "movielens-1m"}
    assert [u.id for u in ds.users] == ["10", "20"]
    u10 = ds.user("10")
    # time order; ratings 2 and 3 share a second: ties by movie id; the latest rating is the query
    assert [it.id for it in u10.history] == ["1", "2"]
    assert u10.history[1].fields == {"text": "Café Robots (1999) | Comedy, Sci-Fi", "score": "4"}  # latin-1 title
    assert u10.history[0].date == "2000-12-31T22:01:40"
    assert u10.queries[0].id == "10-3" and u10.queries[0].gold == "2"
    assert u10.queries[0].input == MOVIELENS_PROMPT.format(text="Quiet Orchard, The (2001) | Documentary")
    assert u10.meta == {"age": "25", "gender": "F", "occupation": "programmer", "zip": "02139"}
    u20 = ds.user("20")
    assert u20.meta["occupation"] == "99"  # an unknown occupation code is kept as written
    assert u20.queries[0].input == MOVIELENS_PROMPT.format(text="Lost Reel (1990)")  # no genre listed


def test_same_item_form_as_the_other_layouts(tmp_path):
    d = tmp_path / "ml-100k"
    d.mkdir()
    flags = ["0"] * 19
    flags[5] = flags[15] = "1"  # Comedy, Sci-Fi
    (d / "u.item").write_bytes(f"2|Caf\xe9 Robots (1999)|01-Jan-1999||http://x|{'|'.join(flags)}\n".encode("latin-1"))
    (d / "u.data").write_text("10\t2\t4\t978300760\n10\t2\t4\t978300761\n")
    assert load_dataset(d).users[0].history[0].fields == load_dataset(FIX, n_queries=1).user("10").history[1].fields


def test_users_file_is_optional_and_half_stars_round_up(ml1m):
    (ml1m / "users.dat").unlink()
    (ml1m / "ratings.dat").write_text("7::1::3.5::100\n7::2::0.5::200\n")  # ml-10m writes half stars
    u = load_movielens(ml1m, n_queries=1).users[0]
    assert u.meta == {} and u.history[0].fields["score"] == "4" and u.queries[0].gold == "1"


def test_round_trip_and_inspect(tmp_path, capsys):
    ds = load_dataset(FIX, n_queries=1)
    export_lamp(ds, tmp_path / "out")
    assert load_dataset(tmp_path / "out").users == ds.users
    assert inspect_dataset(ds)["users"] == 2
    assert main(["data", "inspect", str(FIX)]) == 0
    assert "movielens (rating)" in capsys.readouterr().out


@pytest.mark.parametrize("name,content,parts", [
    ("ratings.dat", "10::1::5::978300100\n10::2::4\n", ["ratings.dat", "record line 2", "expected 4 '::'-separated"]),
    ("ratings.dat", "10::1::5::978300100\n10::2::9::978300101\n", ["ratings.dat", "record line 2", "field 'rating'"]),
    ("ratings.dat", "10::1::five::978300100\n", ["record line 1", "field 'rating'", "expected a number"]),
    ("ratings.dat", "10::1::5::soon\n", ["ratings.dat", "record line 1", "field 'timestamp'"]),
    ("ratings.dat", "10::1::5::1\n10::9::4::2\n", ["ratings.dat", "movie 9", "field 'item'"]),
    ("ratings.dat", b"10::1::5::1\n10::2::4::2\xff\n", ["ratings.dat", "not valid UTF-8", "line 2"]),
    ("movies.dat", "1::Moonlit Harbor (1994)::Drama\n2::Broken\n", ["movies.dat", "record line 2", "field 'genres'"]),
    ("users.dat", "10::F::25::12::02139\n20::M::56\n", ["users.dat", "record line 2", "expected 5 '::'-separated"]),
])
def test_bad_lines_name_file_line_and_field(ml1m, capsys, name, content, parts):
    target = ml1m / name
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as e:
        load_dataset(ml1m)
    for part in parts:
        assert part in str(e.value), (part, str(e.value))
    out = ml1m.parent / "out"
    assert main(["data", "convert", str(ml1m), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("properlm: error: ") and not out.exists()


def test_missing_movies_file(ml1m):
    (ml1m / "movies.dat").unlink()
    with pytest.raises(DataError, match="movies.dat.*file not found"):
        load_dataset(ml1m)
