"""Users read on demand: an LRU with a byte budget, nothing read up front, unknown ids refused."""

from __future__ import annotations

import pytest
import torch

from properlm.errors import UnknownUser
from properlm.store.cache import UserCache
from properlm.store.user_store import UserStore

SHAPES = {"w": (4, 8)}  # 128 bytes per user


@pytest.fixture
def store(tmp_path):
    s = UserStore(tmp_path / "bank", schema={"params": SHAPES})
    s.put_many({f"u{i}": {"params": {"w": torch.full((4, 8), float(i))}} for i in range(10)})
    return s


def test_users_are_read_when_first_asked_for(store, monkeypatch):
    reads = []
    real = UserStore.get
    monkeypatch.setattr(UserStore, "get", lambda self, u, *a, **kw: reads.append(u) or real(self, u, *a, **kw))
    cache = UserCache(store, budget_bytes=10 * 128)
    assert reads == [] and cache.cached == []
    out = cache.gather_users(["u3", "u1"])
    assert out["w"].shape == (2, 4, 8) and out["w"][0, 0, 0] == 3.0 and out["w"][1, 0, 0] == 1.0
    cache.gather_users(["u1", "u3"])
    assert reads == ["u3", "u1"] and cache.hits == 2 and cache.misses == 2


def test_least_recently_used_users_leave_when_over_budget(store):
    cache = UserCache(store, budget_bytes=3 * 128)
    for u in ("u0", "u1", "u2"):
        cache.gather_users([u])
    cache.gather_users(["u0"])          # u0 is now the most recent
    cache.gather_users(["u3"])          # over budget: u1 (least recent) goes
    assert cache.cached == ["u2", "u0", "u3"] and cache.nbytes == 3 * 128
    # A batch larger than the budget is served whole; its users are not evicted by their own gather.
    out = cache.gather_users(["u4", "u5", "u6", "u7"])
    assert out["w"][:, 0, 0].tolist() == [4.0, 5.0, 6.0, 7.0]
    assert set(cache.cached) == {"u4", "u5", "u6", "u7"}
    assert cache.evict("u4") and not cache.evict("u4") and "u4" not in cache.cached


def test_unknown_users_are_refused_never_replaced(store):
    cache = UserCache(store)
    assert "u2" in cache and "nobody" not in cache
    with pytest.raises(UnknownUser, match="'nobody'"):
        cache.gather_users(["u2", "nobody"])


def test_a_deleted_user_is_gone_once_evicted(store):
    cache = UserCache(store)
    cache.gather_users(["u5"])
    store.delete("u5")
    cache.evict("u5")
    assert "u5" not in cache
    with pytest.raises(UnknownUser):
        cache.gather_users(["u5"])
