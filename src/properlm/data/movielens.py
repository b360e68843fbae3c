"""MovieLens ratings as a LaMP-3-style rating task (``movielens``).

Two layouts are read:

* the 100K layout: ``u.data`` (``user<TAB>item<TAB>rating<TAB>timestamp``), ``u.item``
  (``id|title|release date|video release date|IMDb URL|19 genre flags``, latin-1),
  optional ``u.genre`` (``name|index``) and ``u.user`` (``id|age|gender|occupation|zip``);
* the 1M layout (ml-1m; ml-10m has the same files but no ``users.dat``): ``ratings.dat``
  (``UserID::MovieID::Rating::Timestamp``), ``movies.dat`` (``MovieID::Title::Genres``
  with ``|``-separated genres, latin-1 in ml-1m; UTF-8 is read as such), optional
  ``users.dat`` (``UserID::Gender::Age::Occupation::Zip-code``; the age is the file's
  bracket code, e.g. ``25`` for 25-34, and the occupation code becomes its name);
* the newer CSV layout (ml-latest, ml-25m): ``ratings.csv`` (``userId,movieId,rating,
  timestamp``) and ``movies.csv`` (``movieId,title,genres`` with ``|``-separated genres).
  Half-star ratings (CSV, ml-10m) are rounded half up to an integer 1..5 (0.5 -> 1,
  3.5 -> 4) so that golds are LaMP-3's labels.

A rating becomes an item ``{"text": "Title (Year) | Genre1, Genre2", "score": "4"}``
dated by its timestamp (ISO, UTC). A user's history is their ratings in time order;
their latest ``n_queries`` ratings become queries (always leaving one history item).
"""

from __future__ import annotations

import csv
import io as _io
import math
from datetime import datetime, timezone
from pathlib import Path

from properlm import io
from properlm.data.schema import Dataset, Item, Query, User
from properlm.data.stream import iter_lines
from properlm.data.tasks import MOVIELENS_PROMPT
from properlm.errors import DataError

# The 100K genre order, used when u.genre is absent.
GENRES_100K = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
               "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
               "War", "Western")
_NO_GENRE = {"unknown", "(no genres listed)"}

# (user id, movie id, integer score, unix time) per rating.
Rating = tuple[str, str, int, int]


# ml-1m's README: the occupation codes of users.dat.
OCCUPATIONS_1M = ("other", "academic/educator", "artist", "clerical/admin", "college/grad student",
                  "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
                  "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
                  "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer")

#: The ratings file of each layout (the file errors about ratings name).
RATINGS_FILE = {"100k": "u.data", "1m": "ratings.dat", "csv": "ratings.csv"}


def movielens_layout(path: str | Path) -> str | None:
    """``"100k"``, ``"1m"``, ``"csv"`` or ``None`` for a directory."""
    path = Path(path)
    if (path / "u.data").exists():
        return "100k"
    if (path / "ratings.dat").exists():
        return "1m"
    if (path / "ratings.csv").exists() and (path / "movies.csv").exists():
        return "csv"
    return None


def movie_text(title: str, genres: list[str]) -> str:
    """``"Toy Story (1995) | Animation, Comedy"``; the title alone when no genre is known."""
    genres = [g for g in genres if g and g not in _NO_GENRE]
    return f"{title} | {', '.join(genres)}" if genres else title


def round_rating(value: float) -> int:
    """Half-star ratings to 1..5, rounding half up (Python's ``round`` would send 2.5 to 2)."""
    return min(5, max(1, math.floor(value + 0.5)))


def _int(value: str, path: Path, record: str, field: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(str(path), f"expected an integer, got {value!r}", record=record, field=field) from None


def _read_100k(root: Path) -> tuple[dict[str, str], list[Rating], dict[str, dict[str, str]]]:
    """Movies, ratings and demographics of the 100K layout."""
    genre_names = list(GENRES_100K)
    if (root / "u.genre").exists():
        rows = [ln.split("|") for ln in io.read_text(root / "u.genre").splitlines() if ln.strip()]
        genre_names = [name for name, _ in sorted(((r[0], int(r[1])) for r in rows), key=lambda r: r[1])]
    item_path = root / "u.item"
    if not item_path.exists():
        raise DataError(str(item_path), "file not found (the 100K layout needs u.item beside u.data)")
    movies = {}
    # u.item is latin-1 (accented titles); decoding it as UTF-8 would fail.
    for n, line in enumerate(item_path.read_bytes().decode("latin-1").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) < 5 + len(genre_names):
            raise DataError(str(item_path), f"expected {5 + len(genre_names)} '|'-separated fields, got {len(parts)}",
                            record=f"line {n}", field="genres")
        flags = parts[5:5 + len(genre_names)]
        movies[parts[0]] = movie_text(parts[1], [g for g, f in zip(genre_names, flags) if f.strip() == "1"])
    data_path = root / "u.data"
    ratings = []
    for n, line in enumerate(io.read_text(data_path).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 4:
            raise DataError(str(data_path), f"expected 4 tab-separated fields, got {len(parts)}", record=f"line {n}")
        rec = f"line {n}"
        score = _int(parts[2], data_path, rec, "rating")
        if not 1 <= score <= 5:
            raise DataError(str(data_path), f"rating {score} outside 1..5", record=rec, field="rating")
        ratings.append((parts[0], parts[1], score, _int(parts[3], data_path, rec, "timestamp")))
    demographics = {}
    if (root / "u.user").exists():
        for n, line in enumerate(io.read_text(root / "u.user").splitlines(), 1):
            parts = line.split("|")
            if len(parts) == 5:
                demographics[parts[0]] = dict(zip(("age", "gender", "occupation", "zip"), parts[1:]))
            elif line.strip():
                raise DataError(str(root / "u.user"), f"expected 5 '|'-separated fields, got {len(parts)}",
                                record=f"line {n}")
    return movies, ratings, demographics


def _dat_fields(line: str, n_fields: int, path: Path, n: int) -> list[str]:
    parts = line.split("::")
    if len(parts) != n_fields:
        raise DataError(str(path), f"expected {n_fields} '::'-separated fields, got {len(parts)}", record=f"line {n}")
    return parts


def _read_1m(root: Path) -> tuple[dict[str, str], list[Rating], dict[str, dict[str, str]]]:
    """Movies, ratings and demographics of the 1M (``.dat``) layout."""
    movie_path = root / "movies.dat"
    if not movie_path.exists():
        raise DataError(str(movie_path), "file not found (the 1M layout needs movies.dat beside ratings.dat)")
    raw = movie_path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # ml-1m's titles are latin-1 (accents); latin-1 decodes any byte
    movies = {}
    for n, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        # The id is the first field and the genres the last, so a title holding "::" survives.
        parts = line.split("::")
        if len(parts) < 3:
            raise DataError(str(movie_path), f"expected 3 '::'-separated fields, got {len(parts)}",
                            record=f"line {n}", field="genres" if len(parts) == 2 else "title")
        mid, title, genres = parts[0], "::".join(parts[1:-1]), parts[-1]
        movies[mid] = movie_text(title.strip(), genres.split("|"))
    data_path, ratings = root / "ratings.dat", []
    for n, line in iter_lines(data_path):
        if not line.strip():
            continue
        rec = f"line {n}"
        uid, mid, rating, ts = _dat_fields(line, 4, data_path, n)
        try:
            value = float(rating)
        except ValueError:
            raise DataError(str(data_path), f"expected a number, got {rating!r}", record=rec, field="rating") from None
        if not 0 < value <= 5:
            raise DataError(str(data_path), f"rating {rating} outside 0.5..5", record=rec, field="rating")
        ratings.append((uid, mid, round_rating(value), _int(ts, data_path, rec, "timestamp")))
    demographics = {}
    user_path = root / "users.dat"
    if user_path.exists():
        for n, line in iter_lines(user_path):
            if not line.strip():
                continue
            uid, gender, age, occupation, zip_code = _dat_fields(line, 5, user_path, n)
            code = int(occupation) if occupation.isdigit() else -1
            demographics[uid] = {"age": age, "gender": gender,
                                 "occupation": OCCUPATIONS_1M[code] if 0 <= code < len(OCCUPATIONS_1M) else occupation,
                                 "zip": zip_code}
    return movies, ratings, demographics


def _csv_rows(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) pairs of a CSV file with a header naming ``columns``."""
    reader = csv.DictReader(_io.StringIO(io.read_text(path)))
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(str(path), "header lacks a column", record="line 1", field=missing[0])
    return [(reader.line_num, row) for row in reader]


def _read_csv(root: Path) -> tuple[dict[str, str], list[Rating], dict[str, dict[str, str]]]:
    """Movies and ratings of the CSV layout (it has no demographics)."""
    movies = {}
    for n, row in _csv_rows(root / "movies.csv", ("movieId", "title", "genres")):
        movies[row["movieId"]] = movie_text(row["title"].strip(), (row["genres"] or "").split("|"))
    path, ratings = root / "ratings.csv", []
    for n, row in _csv_rows(path, ("userId", "movieId", "rating", "timestamp")):
        rec = f"line {n}"
        try:
            value = float(row["rating"])
        except (TypeError, ValueError):
            raise DataError(str(path), f"expected a number, got {row['rating']!r}", record=rec, field="rating") from None
        if not 0 < value <= 5:
            raise DataError(str(path), f"rating {value} outside 0.5..5", record=rec, field="rating")
        ratings.append((row["userId"], row["movieId"], round_rating(value),
                        _int(row["timestamp"] or "", path, rec, "timestamp")))
    return movies, ratings, {}


def load_movielens(path: str | Path, n_queries: int = 5) -> Dataset:
    """Load MovieLens (100K, 1M or CSV layout) as the ``movielens`` rating task.

    Args:
        path: the MovieLens directory.
        n_queries: how many of each user's latest ratings become queries.

    Returns:
        One user per MovieLens user, ordered by id; demographics (100K, 1M) in ``User.meta``.

    Raises:
        DataError: a missing file, a malformed line, a rating of an unknown movie.
    """
    root = Path(path)
    layout = movielens_layout(root)
    if layout is None:
        raise DataError(str(root), "not a MovieLens directory: expected u.data, ratings.dat, "
                                   "or ratings.csv + movies.csv")
    read = {"100k": _read_100k, "1m": _read_1m, "csv": _read_csv}[layout]
    movies, ratings, demographics = read(root)
    data_file = str(root / RATINGS_FILE[layout])
    by_user: dict[str, list[Rating]] = {}
    for r in ratings:
        if r[1] not in movies:
            raise DataError(data_file, "movie id not in the movie list", record=f"user {r[0]} movie {r[1]}",
                            field="item")
        by_user.setdefault(r[0], []).append(r)
    users = []
    for uid in sorted(by_user, key=_id_order):
        rows = sorted(by_user[uid], key=lambda r: (r[3], _id_order(r[1])))  # time order, ties by movie
        n_q = max(0, min(n_queries, len(rows) - 1))
        user = User(id=uid, meta=dict(demographics.get(uid, {})))
        for _, mid, score, ts in rows[: len(rows) - n_q]:
            user.history.append(Item(id=mid, fields={"text": movies[mid], "score": str(score)}, date=_iso(ts)))
        for _, mid, score, _ in rows[len(rows) - n_q:]:
            user.queries.append(Query(id=f"{uid}-{mid}", input=MOVIELENS_PROMPT.format(text=movies[mid]),
                                      gold=str(score)))
        users.append(user)
    return Dataset(task="movielens", users=users, source=str(root), meta={"layout": f"movielens-{layout}"})


def _id_order(value: str) -> tuple[int, str]:
    """Numeric ids in numeric order ("9" before "10") without assuming they are numbers."""
    return (len(value), value)


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
