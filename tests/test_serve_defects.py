"""Server defects found by trying ``properlm serve``: simultaneous uploads, what reaches the log, user ids,
the admin key, and smaller ones (DELETE's count, the 413 message, history records' types).

Against live servers on 127.0.0.1 (the harness of test_serve.py); each test
reads the log of its own server process.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest

from test_serve import ADMIN, PROMPT, TOPICS, RemoteServer, run, server, server_run, targets  # noqa: F401
from properlm.user_ids import MAX_USER_ID_CHARS, BadUserId, check_user_id

pytestmark = pytest.mark.slow


def _history(user: str | None, n: int, topic: int = 0) -> bytes:
    recs = [{"prompt": PROMPT.format(TOPICS[(topic + i) % 6]), "response": ("love", "hate")[i % 2],
             "time": f"2024-01-{1 + i % 28:02d}"} for i in range(n)]
    if user is not None:
        for r in recs:
            r["user_id"] = user
    return "".join(json.dumps(r) + "\n" for r in recs).encode()


def _wait(server, job_id: str, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = server.http("GET", f"/v1/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.2)
    raise AssertionError("the job did not end")


def _log(server) -> str:
    server.log.flush()
    return Path(server.log.name).read_text(errors="replace")


def _copy(run: Path, to: Path, progress: bool | None = None) -> Path:
    """A copy of the run without its server state (a server that has never run on it)."""
    dst = to / "run"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("serve"))
    if progress is not None:
        cfg = (dst / "config.yaml").read_text()
        cfg = cfg.replace("progress: false", f"progress: {str(progress).lower()}")
        assert f"progress: {str(progress).lower()}" in cfg
        (dst / "config.yaml").write_text(cfg)
    return dst


def test_simultaneous_uploads_one_job_and_it_trains_on_its_own_upload(server):
    """Four uploads for one new user at once: one 202, three 409; the job trains on the 202's body."""
    user = "racer-5d1c"
    sizes = (10, 11, 12, 13)
    results = [None] * len(sizes)
    go = threading.Barrier(len(sizes))

    def upload(i):
        go.wait()
        results[i] = server.http("POST", f"/v1/users/{user}/history", content=_history(user, sizes[i], topic=i))

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(len(sizes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    codes = [r.status_code for r in results]
    assert sorted(codes) == [202, 409, 409, 409], [r.text for r in results]
    won = codes.index(202)
    assert all(r.json()["error"]["param"] == "user_id" for r in results if r.status_code == 409)
    job = _wait(server, results[won].json()["job"]["id"])
    assert job["state"] == "done", job
    assert job["records"] == job["trained_records"] == sizes[won]
    # Its upload was its own file, and is gone now that the job has ended.
    assert list((Path(server_run(server)) / "serve" / "uploads").glob("*")) == []
    # Once the job has ended, the next upload (a refresh) is accepted.
    again = server.http("POST", f"/v1/users/{user}/history", content=_history(user, 10))
    assert again.status_code == 202 and again.json()["refresh"] is True
    assert _wait(server, again.json()["job"]["id"])["state"] == "done"


def test_a_long_job_id_is_404_and_never_logged(server):
    job_id = "j0bXq" * 60  # 300 characters
    r = server.http("GET", f"/v1/jobs/{job_id}")
    assert r.status_code == 404 and r.json()["error"]["param"] == "job_id"
    for bad in ("..", "a" * 31, "A" * 32, "0123456789abcdef0123456789abcdeg"):
        assert server.http("GET", f"/v1/jobs/{bad}").status_code == 404
    assert "j0bXq" not in _log(server)
    assert "Traceback" not in _log(server)


@pytest.mark.parametrize("user_id,rule", [
    ("base", "reserved"), ("properlm", "reserved"), ("%2E", "'.'"), ("%2E%2E", "'..'"), ("a%0Ab", "control"),
    ("tab%09in", "control"), ("x" * (MAX_USER_ID_CHARS + 1), f"at most {MAX_USER_ID_CHARS}")])
def test_bad_user_ids_are_refused_at_onboarding(server, user_id, rule):
    r = server.http("POST", f"/v1/users/{user_id}/history", content=_history(None, 4))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "user_id" and rule in r.json()["error"]["message"]


def test_the_user_id_rule():
    assert check_user_id("u007") == "u007" and check_user_id("é-ü_1.2@x") == "é-ü_1.2@x"
    assert check_user_id("x" * MAX_USER_ID_CHARS)
    for bad in ("", "base", "properlm", ".", "..", "a\nb", "a\rb", "a\x00b", "a\u2028b", "a\x1bb", "a/b",
                "x" * (MAX_USER_ID_CHARS + 1), 7, None):
        with pytest.raises(BadUserId):
            check_user_id(bad)


def test_the_access_log_names_routes_and_nothing_a_client_sent(server, targets):
    user = "logged-7f2b"
    r = server.http("POST", f"/v1/users/{user}/history", content=_history(user, 10))
    assert r.status_code == 202
    key, job = r.json()["api_key"], r.json()["job"]["id"]
    _wait(server, job)
    server.client(key=key).completions.create(model=user, prompt="secret prompt text", max_tokens=2)
    server.http("GET", "/v1/no/such/route/for-9q")
    time.sleep(0.3)
    log = _log(server)
    for line in ("POST /v1/users/{user_id}/history 202", "GET /v1/jobs/{job_id} 200", "POST /v1/completions 200",
                 "GET /health 200", "GET - 404"):
        assert line in log, line
    assert re.search(r"properlm.serve.access: GET /health 200 [0-9.]+ms", log)
    for secret in (user, key, key.split(".")[1], job, ADMIN, "secret prompt text", "for-9q"):
        assert secret not in log, secret
    h = hashlib.sha256(user.encode()).hexdigest()
    assert all(h[i:i + 12] not in log for i in range(0, 52, 4))


def test_an_onboarding_job_logs_nothing_derived_from_the_user(run, tmp_path):
    """A run whose config shows progress bars: the server's job must not print one named after the user."""
    copy = _copy(run, tmp_path, progress=True)
    srv = RemoteServer(copy)
    try:
        user = "qz7"
        r = srv.http("POST", f"/v1/users/{user}/history", content=_history(user, 10))
        assert _wait(srv, r.json()["job"]["id"])["state"] == "done"
        log = _log(srv)
    finally:
        srv.stop()
    h = hashlib.sha256(user.encode()).hexdigest()
    assert user not in log and h[:8] not in log


def test_a_new_admin_key_goes_to_a_0600_file_not_to_stderr(run, tmp_path):
    copy = _copy(run, tmp_path)
    srv = RemoteServer(copy, admin=None)
    try:
        path = copy / "serve" / "admin-key"
        key = path.read_text().strip()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert srv.http("GET", "/v1/users", key=key).status_code == 200
        log = _log(srv)
        assert key not in log and key.split(".")[1] not in log and str(path) in log
    finally:
        srv.stop()
    # The key is kept (as a hash): a restart neither writes a new one nor says where one is.
    path.unlink()
    srv = RemoteServer(copy, admin=None)
    try:
        assert not path.exists() and srv.http("GET", "/v1/users", key=key).status_code == 200
    finally:
        srv.stop()
    # --admin-key-out: another place, for a run that has no admin key yet.
    shutil.rmtree(copy / "serve")
    out = tmp_path / "secrets" / "key"
    srv = RemoteServer(copy, "--admin-key-out", str(out), admin=None)
    try:
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        assert srv.http("GET", "/v1/users", key=out.read_text().strip()).status_code == 200
    finally:
        srv.stop()


def test_delete_counts_every_server_file_it_removes(server):
    user = "counted-2a9e"
    r = server.http("POST", f"/v1/users/{user}/history", content=_history(user, 10))
    _wait(server, r.json()["job"]["id"])
    server.http("POST", f"/v1/users/{user}/keys")  # a second key: two key files
    serve = Path(server_run(server)) / "serve"
    mine = [p for p in serve.rglob("*") if p.is_file() and user.encode() in p.read_bytes()]
    assert len(mine) == 4  # the job record, the user's key list, two key files
    r = server.http("DELETE", f"/v1/users/{user}")
    assert r.status_code == 200
    assert r.json()["removed"]["server records (keys, jobs, uploads)"] == len(mine)


def test_the_413_message_gives_whole_bytes(server, targets):
    r = server.http("POST", "/v1/completions", json={"model": targets[0], "prompt": "x" * (5 * 2**20)})
    assert r.status_code == 413
    assert "4194304 bytes" in r.json()["error"]["message"]


@pytest.mark.parametrize("record,field", [
    ({"prompt": "p", "response": 4}, "response"), ({"prompt": "p", "response": True}, "response"),
    ({"prompt": 3, "response": "r"}, "prompt"), ({"prompt": "p", "response": "r", "time": "yesterday"}, "time"),
    ({"prompt": "p", "response": "r", "time": [2024]}, "time"),
    ({"prompt": "p", "response": "r", "time": "2024-13-45"}, "time")])
def test_history_records_with_wrong_types_are_a_400_naming_line_and_field(server, record, field):
    good = json.dumps({"prompt": "p", "response": "r", "time": "2024-05-01T10:00:00"})
    r = server.http("POST", "/v1/users/typed-4e1/history", content=f"{good}\n{json.dumps(record)}\n".encode())
    assert r.status_code == 400, r.text
    assert f"line 2: field '{field}'" in r.json()["error"]["message"]


def test_history_times_that_sort_are_accepted(server):
    body = "".join(json.dumps({"prompt": PROMPT.format(t), "response": "love", "time": when}) + "\n"
                   for t, when in zip(TOPICS, ("2024-05-01", "2024-05-02T10:00:00", "2024-05-03T10:00:00Z",
                                               "1714600000", 1714700000, 1714800000.5)))
    r = server.http("POST", "/v1/users/timely-8c3/history", content=body.encode())
    assert r.status_code == 202, r.text
    assert _wait(server, r.json()["job"]["id"])["state"] == "done"


def test_an_unhandled_error_is_a_500_logged_without_its_message(tmp_path, caplog):
    """An exception no handler takes is answered here, logged with its type and where it was raised but not its
    message (which may quote the request); left to uvicorn, it would be logged whole."""
    import asyncio
    import logging
    from types import SimpleNamespace

    import httpx

    from properlm.serve.app import create_app
    from properlm.serve.settings import ServeConfig

    def identity(request):
        raise RuntimeError(f"no such key {request.headers['authorization']}")

    stub = SimpleNamespace(start=lambda: None, close=lambda: None, identity=identity, model_ids=lambda ident: [])
    app = create_app(ServeConfig(run=tmp_path), stub)

    async def ask():
        # raise_app_exceptions: an error escaping the application fails the test (uvicorn would log it whole)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.get("/v1/models", headers={"Authorization": "Bearer sEcReT-123"})

    with caplog.at_level(logging.INFO, logger="properlm.serve"):
        r = asyncio.run(ask())
    assert r.status_code == 500 and r.json()["error"]["message"] == "internal error: RuntimeError"
    text = caplog.text
    assert "unhandled error in GET /v1/models" in text and "RuntimeError" in text
    assert "sEcReT-123" not in text  # the code lines of the traceback are there, the values are not
    assert "GET /v1/models 500" in text  # the access log
