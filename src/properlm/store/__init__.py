"""properlm's persistence layer: the user store, the on-demand user cache, and the run directory.

- :class:`UserStore` (``user_store``): one bank of per-user tensors on disk,
  sharded for millions of users, atomic per user, checksummed.
- :class:`UserCache` (``cache``): users read on demand into an LRU with a byte
  budget, on the model's device; the bank a served model binds from.
- ``run``: a run directory's layout, config, split and banks, and
  :func:`load_model`, the model a run holds, for inference or the next stage.
"""

from properlm.store.cache import UserCache
from properlm.store.user_store import UserStore, user_hash

__all__ = ["UserCache", "UserStore", "user_hash"]
