"""The server's settings, one documented dataclass (``properlm serve --help`` shows the same), and how it logs.

The server logs nothing a client sent or a user is known by: no ids, keys,
prompts or paths derived from them. The access log (logger
``properlm.serve.access``) has one line per request: method, route template
(``/v1/users/{user_id}/history``, never the path itself), status and latency.
Failures are logged by :func:`log_failure`: the exception's type and the code
lines of its traceback, without its message (which may quote a request).
"""

from __future__ import annotations

import ipaddress
import logging
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

#: The logger of the access log: one line per request.
ACCESS_LOGGER = "properlm.serve.access"


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
        admin_key: the admin key; None: the one stored in the run (or a new one, written once to
            ``admin_key_out``).
        admin_key_out: where a new admin key is written (mode 0600); None: ``RUN/serve/admin-key``.
        access_log: log one line per request (method, route template, status, latency) to stderr.
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
    admin_key_out: Path | None = None
    access_log: bool = True
    device: str | None = None
    train_threads: int | None = None

    def __post_init__(self):
        self.run = Path(self.run)
        self.max_body_bytes = int(self.max_body_bytes)
        self.admin_key_out = Path(self.admin_key_out) if self.admin_key_out else self.run / "serve" / "admin-key"
        if self.max_batch < 1 or self.max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        if self.request_timeout <= 0 or self.max_body_bytes < 1024:
            raise ValueError("request_timeout must be > 0 and max_body_bytes >= 1024")
        if not self.auth and not is_loopback(self.host):
            raise ValueError(f"--no-auth is allowed only on a loopback address, not {self.host!r}")


def log_failure(logger: logging.Logger, what: str, e: BaseException) -> None:
    """Log an error without its message: ``what``, the exception's type and its traceback's code lines.

    ``what`` must hold nothing a client sent; an exception's message may (an id, a path made from
    one), so only its type is written, with where it was raised.
    """
    frames = "".join(traceback.format_list(traceback.extract_tb(e.__traceback__)))
    logger.error("%s: %s (message withheld: it may hold request data)\nTraceback (most recent call last):\n%s",
                 what, type(e).__name__, frames.rstrip())


def configure_logging(access_log: bool = True) -> None:
    """Send the server's log (``properlm.serve``: warnings and errors; its access log: every request) to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("properlm.serve")
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    root.propagate = False
    access = logging.getLogger(ACCESS_LOGGER)
    access.setLevel(logging.INFO if access_log else logging.WARNING)
