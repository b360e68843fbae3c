"""ASGI middleware of the server: the body limit, the access log, and errors no route handled.

Each wraps the application and sees only what a request carries (scope, body
chunks, the response's status); none of them logs anything the client sent.
"""

from __future__ import annotations

import logging
import time

from fastapi.responses import JSONResponse

from properlm.serve.protocol import error_body
from properlm.serve.settings import ACCESS_LOGGER, log_failure

log = logging.getLogger("properlm.serve")
access_log = logging.getLogger(ACCESS_LOGGER)
#: Methods named in the access log as they are (any other: OTHER; a method is client input too).
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


def error_response(status: int, message: str, kind: str, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """OpenAI's error object as a response."""
    return JSONResponse(error_body(message, kind, status, param), status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 before the route sees it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_big = error_response(413, f"request body over the limit of {self.limit} bytes", "request_too_large")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_big(scope, receive, send)
        seen = 0
        chunks = []
        while True:  # read the whole body (bounded) so that a chunked upload is counted too
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                return await too_big(scope, receive, send)
            chunks.append(msg)
            if not msg.get("more_body"):
                break
        replay = iter(chunks)

        async def again():
            try:
                return next(replay)
            except StopIteration:
                return await receive()

        return await self.app(scope, again, send)


class AccessLog:
    """ASGI middleware: one line per request in the access log: method, route template, status, latency.

    The route is its template (``/v1/users/{user_id}/history``), or ``-`` when none matched (e.g. a 404
    or a 413 answered before routing); never the path, the query, a key or the body.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = []

        async def send_status(msg):
            if msg["type"] == "http.response.start":
                status.append(msg["status"])
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            access_log.info("%s %s %.1fms", _route(scope), status[0] if status else 500,
                            1000 * (time.perf_counter() - t0))


class Unhandled:
    """ASGI middleware: an exception no handler took is answered 500 here and logged without its message.

    Left to Starlette and uvicorn, it would be re-raised and logged with its message, which may quote
    what the client sent (an id, a key).
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = []

        async def send_started(msg):
            if msg["type"] == "http.response.start":
                started.append(True)
            await send(msg)

        try:
            await self.app(scope, receive, send_started)
        except Exception as e:
            log_failure(log, f"unhandled error in {_route(scope)}", e)
            if not started:  # else the response (a stream) is cut short
                await error_response(500, f"internal error: {type(e).__name__}", "server_error")(scope, receive, send)


def _route(scope) -> str:
    """``METHOD /route/{template}`` of a request, with nothing the client chose (``-``: no route matched)."""
    method = scope.get("method", "")
    return f"{method if method in METHODS else 'OTHER'} {getattr(scope.get('route'), 'path', None) or '-'}"
