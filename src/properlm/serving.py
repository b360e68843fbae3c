"""``properlm serve``: a thin wrapper over :func:`properlm.serve.app.serve`, and where the server is wired.

The serve layer sits on the layers below it and is handed the two run operations
that sit above it: :func:`properlm.load_run` (the run loaded for inference, an
interrupted delete finished first) and :func:`properlm.forget.forget_users` (every
trace of a user removed from every file of the run, for ``DELETE /v1/users/{id}``).
"""

from __future__ import annotations

import argparse
import os


def cmd_serve(args: argparse.Namespace) -> int:
    from properlm.api import load_run
    from properlm.errors import ProperError
    from properlm.forget import forget_users
    from properlm.serve.app import serve
    from properlm.serve.settings import ServeConfig

    key = None
    if args.admin_key_file:
        with open(args.admin_key_file, encoding="utf-8") as f:
            key = f.read().strip()
    key = key or os.environ.get("PROPERLM_ADMIN_KEY") or None
    try:
        cfg = ServeConfig(run=args.run, host=args.host, port=args.port, cache_mb=args.cache_mb,
                          max_batch=args.max_batch, max_queue=args.max_queue, request_timeout=args.timeout,
                          max_body_bytes=int(args.max_body_mb * 2**20), auth=not args.no_auth, admin_key=key,
                          admin_key_out=args.admin_key_out, access_log=not args.no_access_log,
                          device=args.device, train_threads=args.train_threads)
    except ValueError as e:
        raise ProperError(str(e)) from None
    serve(cfg, load_run, forget_users)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``properlm serve``."""
    p = subparsers.add_parser(
        "serve", help="serve every user of a run over an OpenAI-compatible HTTP API",
        description="OpenAI-compatible server (POST /v1/completions, /v1/chat/completions; GET /v1/models, /health) "
                    "for every user of a trained run: the user is the request's 'model' (or 'user' with "
                    "model 'properlm'); 'base' is the non-personalized model. Requests of many users decode "
                    "together. Onboarding (POST /v1/users/ID/history), forgetting (DELETE /v1/users/ID) and job "
                    "status (GET /v1/jobs/ID) need the admin key: from --admin-key-file or $PROPERLM_ADMIN_KEY, else "
                    "the one stored in the run (at the first start a new one is written to --admin-key-out, "
                    "mode 0600, and only that path is printed).")
    p.add_argument("--run", required=True, help="a trained run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--cache-mb", type=float, default=1024, help="MiB of users' adapters kept in memory (LRU)")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="requests that may wait; beyond: 429")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (then 504)")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body (then 413)")
    p.add_argument("--admin-key-file", default=None, help="file holding the admin key")
    p.add_argument("--admin-key-out", default=None,
                   help="where a new admin key is written, mode 0600 (default RUN/serve/admin-key)")
    p.add_argument("--no-access-log", action="store_true",
                   help="no access log (by default one line per request on stderr: method, route, status, ms)")
    p.add_argument("--no-auth", action="store_true", help="no API keys (only on a loopback address)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the run config's)")
    p.add_argument("--train-threads", type=int, default=None, help="torch threads of onboarding jobs")
    p.set_defaults(func=cmd_serve)
