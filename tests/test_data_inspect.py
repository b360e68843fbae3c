"""Dataset summaries: counts, history-length distribution and histogram, groups."""

import json
from pathlib import Path

from properlm.data import format_inspect, generate, inspect_dataset, load_dataset

FIX = Path(__file__).parent / "fixtures"


def test_counts_and_distribution():
    info = inspect_dataset(load_dataset(FIX / "oppu_movie_tagging"))
    assert info["task"] == "LaMP-2M" and info["kind"] == "classification"
    assert (info["users"], info["items"], info["queries"], info["queries_with_gold"]) == (4, 10, 5, 5)
    assert info["history"] == {"min": 1, "median": 2.5, "mean": 2.5, "p90": 3.7, "max": 4}
    assert info["histogram"] == [{"bin": "1", "users": 1}, {"bin": "2-4", "users": 3}]
    assert info["oppu_split"] == {"test": 2, "train": 2}
    assert "groups" not in info
    json.dumps(info)


def test_groups_reported_and_formatted():
    ds = generate(seed=1, n_users=20, n_groups=4)
    info = inspect_dataset(ds)
    assert info["groups"] == {"0": 5, "1": 5, "2": 5, "3": 5}
    text = format_inspect(info)
    assert "users     20" in text and "4 planted" in text and "#" in text
    assert "median" in text and "p90" in text
