"""Target-user selection: most active (OPPU), least active (low-resource), random count."""

import warnings

import pytest

from properlm.data import generate, split_users
from properlm.data.schema import Dataset, Item, User
from properlm.errors import ConfigError


def toy(lengths: dict[str, int]) -> Dataset:
    return Dataset("jsonl", [User(uid, [Item(str(i), {"prompt": "p", "response": "r"}) for i in range(n)])
                             for uid, n in lengths.items()])


DS = toy({"a": 5, "b": 9, "c": 1, "d": 9, "e": 3, "f": 0})


def ids(users):
    return [u.id for u in users]


def test_oppu_most_active_ties_by_id():
    train, targets = split_users(DS, "oppu", n=2)
    assert ids(targets) == ["b", "d"] and ids(train) == ["a", "c", "e", "f"]
    assert ids(split_users(DS, "oppu", n=3)[1]) == ["a", "b", "d"]


def test_low_resource_least_active_with_history():
    train, targets = split_users(DS, "low-resource", n=2)
    assert ids(targets) == ["c", "e"] and "f" in ids(train)


def test_count_is_seeded():
    a = split_users(DS, "count", n=2, seed=1)
    assert a == split_users(DS, "count", n=2, seed=1)
    assert len(a[1]) == 2 and set(ids(a[0])) | set(ids(a[1])) == set(ids(DS.users))


def test_too_many_targets_capped_with_warning():
    ds = generate(seed=0)  # 60 users, default n=100
    with pytest.warns(UserWarning, match="using 30 targets"):
        train, targets = split_users(ds)
    assert len(targets) == 30 and len(train) == 30


def test_no_warning_when_it_fits():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split_users(DS, n=5)


@pytest.mark.parametrize("kwargs", [{"mode": "best"}, {"n": 0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        split_users(DS, **kwargs)


def test_single_user_cannot_split():
    with pytest.raises(ConfigError):
        split_users(toy({"a": 3}), n=1)
