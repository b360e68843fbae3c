"""The FastAPI application: OpenAI's completion and chat endpoints for every user of a run, onboarding, forgetting.

    properlm serve --run runs/demo --port 8000

Routes (OpenAI's where there is one):

=====================================  ==========================================================
``POST /v1/completions``               a prompt; ``model`` is the user id (or ``"base"``, or the run's
                                       name ``"properlm"`` with the ``user`` field)
``POST /v1/chat/completions``          messages, with the base tokenizer's chat template
``GET /v1/models``                     the models a key may use (the admin's: every user)
``GET /v1/models/{id}``                one of them (404 for a model the key may not use)
``GET /health``                        liveness and load (no key needed)
``POST /v1/users/{id}/history``        admin: upload a user's JSONL history, start their onboarding job
``GET /v1/jobs/{id}``                  a job's state and progress (admin, or the job's user)
``DELETE /v1/users/{id}``              admin: forget the user (every trace, on disk and in memory)
``GET /v1/users``                      admin: list the users with a personalized model
``POST /v1/users/{id}/keys``           admin: issue another API key for a user
=====================================  ==========================================================

Every error is one JSON object ``{"error": {"message", "type", "param", "code"}}``:
malformed JSON 400, a field this server does not know or implement 400 (naming
it), a missing or mistyped field 422 (naming it), a prompt longer than the
context 400, a body over the limit 413, no or a wrong key 401, another user's
model 403, an unknown user 404, a full queue 429 with ``Retry-After``, a timeout
504. Each response says which model answered: the ``X-Properlm-Model`` header
and the body's ``properlm`` field. Nothing a client sent is logged (see
:mod:`properlm.serve.settings`).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from properlm.errors import ProperError, UnknownUser
from properlm.model.proper import MODEL_BASE, MODEL_GROUP
from properlm.model.prompts import SYSTEM_PROMPT, encode_prompt
from properlm.serve.engine import Engine, GenRequest, QueueFull
from properlm.serve.jobs import Jobs, parse_history
from properlm.serve.keys import Identity, Keys
from properlm.serve.middleware import AccessLog, BodyLimit, Unhandled, error_response as _error
from properlm.serve.protocol import (BAD_REQUEST_TYPES, ChatCompletionRequest, CompletionRequest, chat_logprobs,
                                     chunk, completion_logprobs, completion_response, error_body, new_id,
                                     properlm_field, usage_chunk)
from properlm.serve.settings import ServeConfig, configure_logging
from properlm.store.run import read_split
from properlm.user_ids import user_id_problem

#: The run's own model name: with it, the OpenAI ``user`` field chooses the user.
SERVED_NAME = "properlm"
ADMIN = Identity(admin=True)


class ApiError(Exception):
    """An error answered as ``{"error": ...}`` with its status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


class Server:
    """What the routes share: the loaded run, the engine, keys and jobs.

    The run operations come from the caller (:mod:`properlm.serving` wires them), since
    they sit above the serve layer: ``load_run`` (:func:`properlm.load_run`: the run
    for inference, an interrupted delete finished first) and ``forget_users``
    (:func:`properlm.forget.forget_users`: every trace of users, from every file of the run).
    """

    def __init__(self, cfg: ServeConfig, load_run: Callable, forget_users: Callable[[Path, list[str]], dict]):
        self.cfg = cfg
        self.forget_users = forget_users
        self.lm = load_run(cfg.run, cache_mb=cfg.cache_mb, device=cfg.device)
        self.tok = self.lm.tok
        self.context = int(getattr(self.lm.model.lm.config, "max_position_embeddings", 2048))
        self.engine = Engine(self.lm.model, self.tok, bf16=self.lm.cfg.bf16, max_batch=cfg.max_batch,
                             max_queue=cfg.max_queue)
        self.keys = Keys(cfg.run / "serve")
        self.jobs = Jobs(cfg.run, on_done=self.lm.forget, train_threads=cfg.train_threads)
        self.admin_key = cfg.admin_key
        self.admin_key_file: Path | None = None  # where a new admin key was written
        self.deleting: set[str] = set()  # users whose DELETE is under way: their requests are 404
        if cfg.auth and not self.admin_key and not self.keys.has_admin():
            # Written once to a file only its owner can read (never to the log); only its hash is kept.
            self.admin_key_file = write_secret(cfg.admin_key_out, self.keys.issue(None))

    def start(self) -> None:
        self.engine.start()
        self.jobs.start()

    def close(self) -> None:
        self.engine.close()
        self.jobs.close()

    # -- auth ------------------------------------------------------------------------------------
    def identity(self, request: Request) -> Identity:
        if not self.cfg.auth:
            return ADMIN
        head = request.headers.get("authorization", "")
        key = head[7:].strip() if head.lower().startswith("bearer ") else None
        if not key:
            raise ApiError(401, "no API key: send 'Authorization: Bearer <key>'", "authentication_error")
        if self.admin_key is not None and _same(key, self.admin_key):
            return ADMIN
        ident = self.keys.check(key)
        if ident is None:
            raise ApiError(401, "invalid API key", "authentication_error")
        return ident

    @staticmethod
    def need_admin(ident: Identity) -> None:
        if not ident.admin:
            raise ApiError(403, "this needs the admin key", "permission_error")

    def model_ids(self, ident: Identity) -> list[str]:
        """The models a key may use: the admin's ``base``, ``properlm`` and every user; a user's their own."""
        if not ident.admin:
            return [ident.user]
        return list(dict.fromkeys(["base", SERVED_NAME, *self.lm.users]))

    def may_use(self, ident: Identity, model: str) -> bool:
        """Whether ``model`` is one of :meth:`model_ids` (without listing every user)."""
        if not ident.admin:
            return model == ident.user
        if model in ("base", SERVED_NAME):
            return True
        self.lm.sync_deletes()
        try:
            self.lm.model_for(model)
        except UnknownUser:
            return False
        return model not in self.deleting

    # -- which model answers ----------------------------------------------------------------------
    def resolve(self, model: str, user_field: str | None, ident: Identity) -> tuple[str | None, str, str | None]:
        """``(user, model kind, reason)`` for a request, or an ApiError (403/404/400)."""
        if model == "base":
            user = None
        elif model == SERVED_NAME:
            if not user_field:
                raise ApiError(400, f"model {SERVED_NAME!r} needs the 'user' field (or give the user id as 'model')",
                               param="user")
            user = user_field
        else:
            user = model
        if not ident.admin and user != ident.user:
            raise ApiError(403, f"this key may use only the model of user {ident.user!r}", "permission_error",
                           param="model")
        if user is None:
            return None, MODEL_BASE, None
        self.lm.sync_deletes()  # users deleted from the command line are not served from memory
        if user in self.deleting:
            raise ApiError(404, f"unknown user {user!r}: being deleted", "not_found_error", param="model")
        job = self.jobs.active_for(user)
        try:
            kind = self.lm.model_for(user)
        except UnknownUser:
            if job is not None:
                return user, MODEL_BASE, "onboarding: their adapter is being trained"
            raise ApiError(404, f"unknown user {user!r}: no personalized model in this run", "not_found_error",
                           param="model") from None
        if job is None:
            return user, kind, None
        if kind == MODEL_GROUP:
            return user, kind, "onboarding: answered by their group until their adapter is trained"
        return user, kind, "refresh in progress: answered by their previous adapter"

    def rows_users(self, user: str | None, kind: str) -> tuple[str | None, str | None]:
        if kind == MODEL_BASE or user is None:
            return None, None
        lora, emb = self.lm.rows_for([user])
        return lora[0], emb[0]


def _same(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


def _param(err: dict) -> str:
    """The field an error names: its location (``messages.0.content``) and the ``param`` its context adds."""
    parts = [str(x) for x in err.get("loc", ()) if x != "body"]
    extra = (err.get("ctx") or {}).get("param")
    if extra:
        parts.append(str(extra))
    return ".".join(parts) or "body"


def write_secret(path: Path, secret: str) -> Path:
    """Write ``secret`` to a new file only its owner can read or write (mode 0600); the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a stale file: the new one is created afresh with the mode below
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (secret + "\n").encode())
    finally:
        os.close(fd)
    return path


def create_app(cfg: ServeConfig, srv: Server) -> FastAPI:
    """The application for ``cfg`` over a :class:`Server` (its engine and jobs start with the app)."""

    @asynccontextmanager
    async def lifespan(app):
        srv.start()
        try:
            yield
        finally:
            srv.close()

    app = FastAPI(title="properlm", lifespan=lifespan)
    app.state.server = srv
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    app.add_middleware(Unhandled)  # any error no handler took: a 500, logged without its message
    app.add_middleware(AccessLog)  # outermost: it times and logs the 413s and 500s too

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return _error(e.status, e.message, e.kind, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        errs = e.errors()
        bad_json = next((x for x in errs if x.get("type") == "json_invalid"), None)
        if bad_json is not None:
            return _error(400, f"malformed JSON: {bad_json.get('ctx', {}).get('error', bad_json.get('msg'))}",
                          "invalid_request_error")
        # A field this server does not know or implement is a 400 (what is asked for is not there);
        # a missing or mistyped one a 422. The message never quotes the value sent.
        bad = next((x for x in errs if x.get("type") in BAD_REQUEST_TYPES), None)
        if bad is not None:
            param = _param(bad)
            msg = "field is not supported by this server" if bad["type"] == "extra_forbidden" else bad.get("msg")
            return _error(400, f"field '{param}': {msg}", "invalid_request_error", param)
        first = errs[0]
        param = _param(first)
        return _error(422, f"field '{param}': {first.get('msg')}", "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), "invalid_request_error")

    # -- generation -----------------------------------------------------------------------------
    async def generate(request: Request, body, chat: bool):
        ident = srv.identity(request)
        user, kind, reason = srv.resolve(body.model, body.user, ident)
        if chat:
            msgs = [m.as_template() for m in body.messages]
            if msgs[0]["role"] != "system":
                msgs = [{"role": "system", "content": SYSTEM_PROMPT}, *msgs]
            text = srv.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ids = srv.tok(text, add_special_tokens=False).input_ids
            max_tokens = body.token_limit or max(1, min(512, srv.context - len(ids)))
        else:
            if isinstance(body.prompt, list):
                if len(body.prompt) != 1:
                    raise ApiError(400, "one prompt per request", param="prompt")
                prompt = body.prompt[0]
            else:
                prompt = body.prompt
            ids = encode_prompt(srv.tok, prompt, max_prompt_tokens=10 ** 9)
            max_tokens = body.max_tokens or 16
        if len(ids) + max_tokens > srv.context:
            raise ApiError(400, f"the prompt is {len(ids)} tokens and the token limit {max_tokens}; the model's "
                                f"context is {srv.context} tokens", param="messages" if chat else "prompt")
        lora_user, emb_user = srv.rows_users(user, kind)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        top = body.top_count
        req = GenRequest(ids, lora_user, emb_user, user, max_tokens, body.temperature, body.top_p, body.seed,
                         body.stops(), time.monotonic() + cfg.request_timeout,
                         lambda k, v: loop.call_soon_threadsafe(events.put_nowait, (k, v)), logprobs=top)
        try:
            srv.engine.submit(req)
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}; retry shortly", "rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        rid = new_id("chatcmpl" if chat else "cmpl")
        who = properlm_field(kind, user, reason)
        headers = {"X-Properlm-Model": kind}
        usage = lambda n: {"prompt_tokens": len(ids), "completion_tokens": n,  # noqa: E731
                           "total_tokens": len(ids) + n}
        pieces = {"offset": 0}  # completions' text_offset of the next token

        def logprobs(entries):
            if top is None:
                return None
            if chat:
                return chat_logprobs(entries)
            out = completion_logprobs(entries, pieces["offset"], top)
            pieces["offset"] += sum(len(e["token"]) for e in entries)
            return out

        if body.stream:
            async def sse():
                finished = False
                pending = []  # log probabilities of the tokens of the next delta
                try:
                    yield _sse(chunk(rid, body.model, None, None, chat, who, first=True))
                    while True:
                        k, v = await events.get()
                        if k == "tokens":
                            pending += v
                        elif k == "delta":
                            yield _sse(chunk(rid, body.model, v, None, chat, logprobs=logprobs(pending)))
                            pending = []
                        elif k == "done":
                            finished = True
                            if pending:  # tokens with no text of their own left (e.g. cut by a stop string)
                                yield _sse(chunk(rid, body.model, None, None, chat, logprobs=logprobs(pending)))
                            last = chunk(rid, body.model, None, v["finish_reason"], chat)
                            if body.include_usage:  # as OpenAI: a last chunk with no choices and the usage
                                yield _sse(last)
                                yield _sse(usage_chunk(rid, body.model, chat, usage(v["completion_tokens"])))
                            else:
                                last["usage"] = usage(v["completion_tokens"])
                                yield _sse(last)
                            break
                        else:
                            finished = True
                            status, message = v
                            yield _sse(error_body(message, "server_error" if status >= 500 else
                                                  "invalid_request_error", status))
                            break
                    yield "data: [DONE]\n\n"
                finally:
                    if not finished:  # the client went away mid-stream
                        srv.engine.cancel(req, "client disconnected")

            return StreamingResponse(sse(), media_type="text/event-stream", headers=headers)
        text = []
        while True:
            try:
                k, v = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    srv.engine.cancel(req, "client disconnected")
                    return JSONResponse({}, status_code=499)
                continue
            if k == "delta":
                text.append(v)
            elif k == "tokens":
                continue  # the whole list comes with "done"
            elif k == "done":
                lp = logprobs(v["logprobs"]) if v.get("logprobs") is not None else None
                return JSONResponse(completion_response(rid, body.model, v["text"], v["finish_reason"],
                                                        usage(v["completion_tokens"]), who, chat, lp),
                                    headers=headers)
            else:
                status, message = v
                kind_ = {404: "not_found_error", 504: "timeout", 499: "cancelled"}.get(status, "server_error")
                raise ApiError(status, message, kind_)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await generate(request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await generate(request, body, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        return {"object": "list", "data": [_model(i) for i in srv.model_ids(srv.identity(request))]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request):
        if not srv.may_use(srv.identity(request), model_id):
            raise ApiError(404, "unknown model: no such model, or not one this key may use", "not_found_error",
                           param="model")
        return _model(model_id)

    @app.get("/health")
    async def health():
        caches = {name: {"users": len(b.cached), "bytes": b.nbytes}
                  for name, b in (("lora", srv.lm.model.user_loras), ("emb", srv.lm.model.user_embs))
                  if hasattr(b, "cached")}
        return {"status": "ok", "run": str(cfg.run), "level": srv.lm.level, **srv.engine.load, "cache": caches}

    # -- users ----------------------------------------------------------------------------------
    @app.post("/v1/users/{user_id}/history", status_code=202)
    async def upload_history(user_id: str, request: Request):
        srv.need_admin(srv.identity(request))
        problem = user_id_problem(user_id)  # the rule of properlm.user_ids, as for `properlm users add`
        if problem is not None:
            raise ApiError(400, f"user id {problem}", param="user_id")
        if srv.lm.level != "user":
            raise ApiError(400, "onboarding needs a run with all three stages trained")
        # One onboarding per user at a time: the slot is claimed before the first await, so of
        # simultaneous uploads exactly one goes on and the others are refused.
        if not srv.jobs.reserve(user_id):
            raise ApiError(409, f"user {user_id!r} already has an onboarding job queued or running; send the "
                                f"history again once it has ended", param="user_id")
        try:
            body = await request.body()
            try:
                examples = await asyncio.to_thread(parse_history, body, user_id,
                                                   cfg.run / "serve" / "tmp" / f"{new_id('up')}.jsonl")
            except (ProperError, UnicodeDecodeError) as e:
                raise ApiError(400, f"history: {' '.join(str(e).split())}", param="body") from None
            if user_id in srv.deleting:  # checked after the last await: a delete under way is not undone
                raise ApiError(409, f"user {user_id!r} is being deleted; send their history again once it is "
                                    f"done", param="user_id")
            refresh = user_id in srv.lm.model.user_loras if srv.lm.model.user_loras is not None else False
            job = srv.jobs.submit(user_id, body, examples, refresh)
        finally:
            srv.jobs.release(user_id)
        out = {"user": user_id, "job": job, "refresh": refresh}
        if not srv.keys.user_record(user_id).get("keys"):
            out["api_key"] = srv.keys.issue(user_id)  # shown once; only its hash is kept
        return out

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, request: Request):
        ident = srv.identity(request)
        job = srv.jobs.get(job_id)  # None also for what is not a job id (no file is looked up)
        if job is None:
            raise ApiError(404, "unknown job", "not_found_error", param="job_id")
        if not ident.admin and ident.user != job["user"]:
            raise ApiError(403, "this job belongs to another user", "permission_error")
        return job

    @app.delete("/v1/users/{user_id}")
    async def delete_user(user_id: str, request: Request):
        srv.need_admin(srv.identity(request))
        known = (any(user_id in b for b in (srv.lm.model.user_loras, srv.lm.model.user_embs) if b is not None)
                 or srv.jobs.active_for(user_id) is not None or srv.keys.user_record(user_id).get("keys")
                 or await asyncio.to_thread(in_split, cfg.run, user_id))  # e.g. a text-router run's stage-2 users
        if not known:
            raise ApiError(404, f"unknown user {user_id!r}", "not_found_error", param="user_id")
        # From here on no new request of theirs is admitted (resolve() and submit() run with no await
        # between them, so every earlier one is already queued or running and is cancelled here).
        srv.deleting.add(user_id)
        try:
            srv.engine.cancel_user(user_id)
            # A running onboarding job stops at its next step; until it has, it could still write the
            # user back, so the delete waits for it (however long its step takes).
            await asyncio.to_thread(srv.jobs.cancel_user, user_id, None)
            jobs_removed = srv.jobs.forget(user_id)
            removed = await asyncio.to_thread(srv.forget_users, cfg.run, [user_id])
            if jobs_removed:  # the job records and uploads removed above count with the rest of serve/
                what = "server records (keys, jobs, uploads)"
                removed[what] = removed.get(what, 0) + jobs_removed
            srv.lm.forget(user_id)
            srv.engine.cancel_user(user_id)
        finally:
            srv.deleting.discard(user_id)
        return {"deleted": user_id, "removed": removed}

    @app.get("/v1/users")
    async def list_users(request: Request):
        srv.need_admin(srv.identity(request))
        return {"object": "list", "data": srv.lm.users}

    @app.post("/v1/users/{user_id}/keys", status_code=201)
    async def new_key(user_id: str, request: Request):
        srv.need_admin(srv.identity(request))
        try:
            srv.lm.model_for(user_id)
        except UnknownUser:
            raise ApiError(404, f"unknown user {user_id!r}", "not_found_error", param="user_id") from None
        return {"user": user_id, "api_key": srv.keys.issue(user_id)}

    return app


def in_split(run_dir: str | Path, user_id: str) -> bool:
    """Whether the run's ``split.json`` names the user (trained in some stage, with or without a bank entry)."""
    p = Path(run_dir) / "split.json"
    if not p.exists():
        return False
    split = read_split(run_dir)
    return user_id in split.get("train", []) or user_id in split.get("target", [])


def _model(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "properlm"}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def serve(cfg: ServeConfig, load_run: Callable, forget_users: Callable[[Path, list[str]], dict]) -> None:
    """Run the server until interrupted (uvicorn), with the run operations of :class:`Server`."""
    import uvicorn

    configure_logging(cfg.access_log)
    srv = Server(cfg, load_run, forget_users)
    if srv.admin_key_file:
        print(f"properlm serve: a new admin key was written to {srv.admin_key_file} (mode 0600; only its hash "
              f"is kept in the run): keep it somewhere safe and delete the file", file=sys.stderr, flush=True)
    app = create_app(cfg, srv)
    print(f"properlm serve: {cfg.run} on http://{cfg.host}:{cfg.port} ({srv.lm.level} level, "
          f"{'auth on' if cfg.auth else 'NO AUTH, loopback only'})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
