"""Which users train the shared stages (1-2) and which are the targets of stage 3.

PROPER follows OPPU: the targets are held out of stages 1 and 2 entirely, so the
group experts are learned without them and stage 3 sees them as new users.

* ``oppu``: the ``n`` most active users (longest history, ties by id) are targets,
  as in OPPU's ``user_top_100_history.json``. A dataset loaded from OPPU's layout
  already marks its test users (``User.meta["oppu_split"]``): then that exact split
  is used and ``n`` is ignored.
* ``low-resource``: the ``n`` least active users that have at least one history item
  (paper table 2).
* ``count``: ``n`` users drawn at random with ``seed``.

Decision on small datasets: when ``n`` leaves no training users (``n >= number of
users``) the target count is capped at half the users, with a warning, so that the
default ``n=100`` still works on the 60-user synthetic demo. Both lists keep the
dataset's user order.
"""

from __future__ import annotations

import random
import warnings

from properlm.data.schema import Dataset, User
from properlm.errors import ConfigError

MODES = ("oppu", "low-resource", "count")


def split_users(dataset: Dataset, mode: str = "oppu", n: int = 100, seed: int = 0) -> tuple[list[User], list[User]]:
    """Split users into (train users, target users).

    Args:
        dataset: the dataset.
        mode: ``"oppu"``, ``"low-resource"`` or ``"count"`` (see the module docstring).
        n: number of target users.
        seed: random seed for ``mode="count"``.

    Returns:
        ``(train_users, target_users)``, disjoint, together all users, in dataset order.

    Raises:
        ConfigError: unknown mode, ``n < 1``, or fewer than two users.
    """
    users = dataset.users
    if mode not in MODES:
        raise ConfigError(f"unknown split mode {mode!r}; expected one of {', '.join(MODES)}")
    if n < 1:
        raise ConfigError(f"split needs n >= 1 target users, got {n}")
    if len(users) < 2:
        raise ConfigError(f"cannot split {len(users)} user(s) into training and target users")
    if mode == "oppu" and any("oppu_split" in u.meta for u in users):
        targets = {u.id for u in users if u.meta.get("oppu_split") == "test"}
        if targets and len(targets) < len(users):
            return _partition(users, targets)
    if n >= len(users):
        capped = len(users) // 2
        warnings.warn(f"{n} target users asked of a dataset of {len(users)} users; using {capped} targets "
                      f"so that {len(users) - capped} remain to train the shared stages", stacklevel=2)
        n = capped
    if mode == "oppu":
        ranked = sorted(users, key=lambda u: (-len(u.history), u.id))
        chosen = ranked[:n]
    elif mode == "low-resource":
        ranked = sorted((u for u in users if u.history), key=lambda u: (len(u.history), u.id))
        chosen = ranked[:n]
    else:
        chosen = random.Random(seed).sample(users, n)
    return _partition(users, {u.id for u in chosen})


def _partition(users: list[User], target_ids: set[str]) -> tuple[list[User], list[User]]:
    return [u for u in users if u.id not in target_ids], [u for u in users if u.id in target_ids]
