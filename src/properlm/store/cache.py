"""Users read on demand from the store into an LRU working set with a byte budget.

:class:`UserCache` is the bank a served or evaluated model binds its rows'
users from (the :class:`~properlm.model.user_params.UserBank` protocol): a
user's parameters are read from the store the first time they are asked for,
kept on the model's device, and the least recently used users are dropped when
the budget is exceeded. Nothing is read up front, so a run with a million
users loads as fast as one with ten.

The users of the batch being gathered are never evicted by that same gather,
so the working set can exceed the budget by at most one batch of users.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from properlm.errors import UnknownUser
from properlm.store.user_store import UserStore


class UserCache:
    """An LRU of users' parameters from one bank of the store.

    Args:
        store: the bank.
        device: where the cached tensors live (the model's device).
        budget_bytes: the most bytes of users' tensors kept (at least one user is kept).
    """

    def __init__(self, store: UserStore, device: torch.device | str = "cpu", budget_bytes: int = 1 << 30):
        self.store = store
        self.device = torch.device(device)
        self.budget_bytes = int(budget_bytes)
        self.shapes = dict(store.schema["params"])
        self._users: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        self.hits = self.misses = 0

    # -- the UserBank protocol ----------------------------------------------------------
    def __contains__(self, user_id: object) -> bool:
        with self._lock:
            if user_id in self._users:
                return True
        return user_id in self.store

    def gather_users(self, user_ids: list[str], requires_grad: bool = False) -> dict[str, torch.Tensor]:
        """``name -> (P, *shape)`` for the given users, reading any not cached from the store."""
        with self._lock:
            rows = [self._get(u, pinned=user_ids) for u in user_ids]
            out = {k: torch.stack([r[k] for r in rows]) for k in self.shapes}
        if requires_grad:
            for v in out.values():
                v.requires_grad_(True)
        return out

    # -- the cache ------------------------------------------------------------------------
    def _get(self, user_id: str, pinned: list[str]) -> dict[str, torch.Tensor]:
        if user_id in self._users:
            self._users.move_to_end(user_id)
            self.hits += 1
            return self._users[user_id]
        self.misses += 1
        part = self.store.get(user_id, ("params",), device=self.device).get("params")
        if part is None:
            raise UnknownUser(user_id, f"in {self.store.root}")
        tensors = {k: v.to(torch.float32) for k, v in part.items()}
        self._users[user_id] = tensors
        self._bytes += _nbytes(tensors)
        self._evict(keep=set(pinned))
        return tensors

    def load(self, user_id: str) -> None:
        """Read a user into the cache now (e.g. to warm it before the first request)."""
        with self._lock:
            self._get(user_id, pinned=[user_id])

    def _evict(self, keep: set[str]) -> None:
        for u in list(self._users):
            if self._bytes <= self.budget_bytes or len(self._users) <= 1:
                break
            if u in keep:
                continue
            self._bytes -= _nbytes(self._users.pop(u))

    def evict(self, user_id: str) -> bool:
        """Drop a user from memory (e.g. after deleting or refreshing them); whether they were cached."""
        with self._lock:
            t = self._users.pop(user_id, None)
            if t is not None:
                self._bytes -= _nbytes(t)
            return t is not None

    def drop_missing(self) -> list[str]:
        """Evict the cached users the store no longer holds (deleted by another process); who they were."""
        gone = [u for u in self.cached if u not in self.store]
        for u in gone:
            self.evict(u)
        return gone

    def clear(self) -> None:
        with self._lock:
            self._users.clear()
            self._bytes = 0

    @property
    def cached(self) -> list[str]:
        """Users in memory, least recently used first."""
        with self._lock:
            return list(self._users)

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def user_ids(self) -> list[str]:
        """Every user of the bank (a listing of the store)."""
        return list(self.store.users())


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
