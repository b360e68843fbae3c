"""The server's settings, one documented dataclass (``properlm serve --help`` shows the same)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServeConfig:
    """How ``properlm serve`` runs.

    Attributes:
        run: the trained run directory to serve.
        host, port: where to listen (127.0.0.1 by default: only this machine).
        cache_mb: byte budget (MiB) of each user bank's in-memory LRU cache.
        max_batch: rows decoded together in one forward pass (continuous batching).
        max_queue: requests waiting for a row; beyond it requests get 429 with Retry-After.
        request_timeout: seconds a request may take, queueing included (then 504).
        max_body_bytes: a request body above this gets 413.
        auth: require API keys (the default); False only on a loopback host.
        admin_key: the admin key; None: the one stored in the run (or a new one, printed once).
        device: where the model runs (None: the run config's ``device``).
        train_threads: torch threads of the onboarding worker (None: torch's default).
    """

    run: Path
    host: str = "127.0.0.1"
    port: int = 8000
    cache_mb: float = 1024
    max_batch: int = 32
    max_queue: int = 256
    request_timeout: float = 120.0
    max_body_bytes: int = 4 * 2**20
    auth: bool = True
    admin_key: str | None = None
    device: str | None = None
    train_threads: int | None = None

    def __post_init__(self):
        self.run = Path(self.run)
        if self.max_batch < 1 or self.max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        if self.request_timeout <= 0 or self.max_body_bytes < 1024:
            raise ValueError("request_timeout must be > 0 and max_body_bytes >= 1024")
        if not self.auth and not is_loopback(self.host):
            raise ValueError(f"--no-auth is allowed only on a loopback address, not {self.host!r}")
