"""``properlm serve`` over real HTTP on localhost, with the ``openai`` client against a live server process.

A tiny run is trained once; servers are started as subprocesses on free ports
(as vLLM's ``RemoteOpenAIServer`` does), listen on 127.0.0.1 only, and are
stopped by the fixtures. Every load here is bounded: a fixed number of
requests, each with a small ``max_tokens``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from properlm import load_run
from properlm.model.prompts import SYSTEM_PROMPT

pytestmark = pytest.mark.slow

ADMIN = "test-admin-key"
PROMPT = "Does the user love, like, dislike or hate this post? post: Yesterday the group chat was all about {}."
TOPICS = ("jazz", "soccer", "coffee", "taxes", "robots", "hiking")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RemoteServer:
    """A ``properlm serve`` subprocess on a free loopback port."""

    def __init__(self, run: Path, *args: str, admin: str | None = ADMIN):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("PROPERLM_ADMIN_KEY", None)
        if admin:
            env["PROPERLM_ADMIN_KEY"] = admin
        self.log = open(run.parent / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "properlm.cli", "serve", "--run", str(run), "--host",
                                      "127.0.0.1", "--port", str(self.port), *args], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not start")

    def client(self, key: str = ADMIN, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kw)

    def http(self, method: str, path: str, key: str | None = ADMIN, **kw) -> httpx.Response:
        headers = kw.pop("headers", {})
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=60, **kw)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory, h):
    from properlm.train.run import train

    root = tmp_path_factory.mktemp("serve")
    cfg = h.small_cfg(data=dict(split="oppu", synth_users=14, n_targets=4), population=dict(max_steps=3),
                      group=dict(max_steps=3), user=dict(max_steps=6, lr=5e-2))
    return train(cfg, root / "run")


@pytest.fixture(scope="module")
def server(run):
    srv = RemoteServer(run)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def targets(run):
    return json.loads((run / "split.json").read_text())["target"]


def _greedy(client, user, prompt, n=6, **kw):
    r = client.completions.create(model=user, prompt=prompt, max_tokens=n, temperature=0, **kw)
    return r.choices[0].text


def test_concurrent_users_each_get_their_own_answer_equal_to_generate(server, run, targets):
    """Eight clients of four users at once: each answer is what ``properlm generate`` gives that user and prompt."""
    lm = load_run(run)
    jobs = [(targets[i % 4], PROMPT.format(TOPICS[i % 6])) for i in range(8)]
    want = lm.generate([p for _, p in jobs], [u for u, _ in jobs], max_new_tokens=6)
    assert len({w for w in want}) > 1, "the users' answers should differ for the test to mean anything"
    got = [None] * len(jobs)

    def ask(i):
        got[i] = _greedy(server.client(), jobs[i][0], jobs[i][1])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [g.strip() for g in got] == want
    # The same through chat, with the user in the OpenAI `user` field.
    r = server.client().chat.completions.create(model="properlm", user=targets[1], temperature=0, max_tokens=6,
                                               messages=[{"role": "user", "content": jobs[1][1]}])
    assert r.choices[0].message.content.strip() == want[1] and r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    # The usage counts this prompt's tokens (the run's system prompt added) and the answer's.
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": jobs[1][1]}]
    prompt_ids = lm.tok(lm.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False).input_ids
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert (r.usage.completion_tokens == 6) if r.choices[0].finish_reason == "length" else \
        (r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 6)


def test_which_model_answered_is_said(server, targets):
    raw = server.client().completions.with_raw_response.create(model=targets[0], prompt="hi", max_tokens=2)
    assert raw.headers["x-properlm-model"] == "user-lora"
    body = json.loads(raw.text)
    assert body["properlm"] == {"model": "user-lora", "personalized": True, "user": targets[0]}
    raw = server.client().completions.with_raw_response.create(model="base", prompt="hi", max_tokens=2)
    assert raw.headers["x-properlm-model"] == "base" and json.loads(raw.text)["properlm"]["personalized"] is False
    ids = [m.id for m in server.client().models.list().data]
    assert {"base", "properlm", *targets} <= set(ids)


def test_streaming_sends_the_same_text_in_pieces(server, targets):
    prompt = PROMPT.format("coffee")
    whole = _greedy(server.client(), targets[2], prompt, n=8)
    parts = list(server.client().completions.create(model=targets[2], prompt=prompt, max_tokens=8, temperature=0,
                                                    stream=True))
    assert "".join(p.choices[0].text for p in parts) == whole
    once = server.client().completions.create(model=targets[2], prompt=prompt, max_tokens=8, temperature=0)
    assert parts[-1].choices[0].finish_reason == once.choices[0].finish_reason
    assert all(p.choices[0].finish_reason is None for p in parts[:-1])
    chat = list(server.client().chat.completions.create(model=targets[2], temperature=0, max_tokens=8, stream=True,
                                                        messages=[{"role": "user", "content": prompt}]))
    assert "".join(c.choices[0].delta.content or "" for c in chat) == whole
    # The raw stream ends with the [DONE] sentinel.
    with httpx.stream("POST", f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {ADMIN}"},
                      json={"model": targets[2], "prompt": prompt, "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_sampling_settings_are_honoured(server, targets):
    c = server.client()
    a = c.completions.create(model=targets[0], prompt="hello", max_tokens=8, temperature=1.0, seed=7).choices[0].text
    b = c.completions.create(model=targets[0], prompt="hello", max_tokens=8, temperature=1.0, seed=7).choices[0].text
    assert a == b  # a seeded sample is reproducible, whatever else runs
    r = c.completions.create(model=targets[0], prompt="hello", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    text = _greedy(c, targets[0], "hello", n=8)
    assert len(text.strip()) > 2, "the answer should be long enough to hold a stop string"
    stop = text.strip()[1:3]
    cut = c.completions.create(model=targets[0], prompt="hello", max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    assert text.startswith(cut.choices[0].text)


def test_bad_requests_get_one_json_error_and_the_server_serves_on(server, targets):
    c = server.client()
    with pytest.raises(openai.AuthenticationError):
        server.client(key="plm-0000000000000000.wrong").completions.create(model=targets[0], prompt="x")
    assert server.http("POST", "/v1/completions", key=None, json={"model": targets[0], "prompt": "x"}).status_code == 401
    with pytest.raises(openai.NotFoundError, match="unknown user 'nobody'"):
        c.completions.create(model="nobody", prompt="x")
    r = server.http("POST", "/v1/completions", content=b'{"model": "u", "prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = server.http("POST", "/v1/completions", json={"model": targets[0]})
    assert r.status_code == 422 and r.json()["error"]["param"] == "prompt"
    r = server.http("POST", "/v1/completions", json={"model": targets[0], "prompt": "x", "max_tokens": "many"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="context"):
        c.completions.create(model=targets[0], prompt="word " * 600, max_tokens=4)
    r = server.http("POST", "/v1/completions", json={"model": targets[0], "prompt": "x" * (5 * 2**20)})
    assert r.status_code == 413 and set(r.json()) == {"error"}
    with pytest.raises(openai.BadRequestError, match="'user'"):
        c.completions.create(model="properlm", prompt="x")
    assert _greedy(c, targets[0], "still here?", n=2)  # served on after all of that


def test_sampling_and_stop_fields_are_checked_and_one_request_never_fails_the_batch(server, targets):
    c = server.client()
    for body, param in (({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": "x" * 600}, "stop"),
                        ({"stop": ["x" * 600]}, "stop"), ({"seed": 2 ** 64}, "seed")):
        r = server.http("POST", "/v1/completions", json={"model": targets[0], "prompt": "x", **body})
        assert r.status_code == 422 and r.json()["error"]["param"] == param, (body, r.text)
    # An empty stop string stops nothing (it would match before the first token).
    assert _greedy(c, targets[0], "hi", n=4, stop="") == _greedy(c, targets[0], "hi", n=4)
    # A temperature so small that logits / temperature overflow float32 is greedy in effect, and the
    # requests decoded beside it are answered as usual.
    results = {}

    def ask(name, **kw):
        results[name] = c.completions.create(model=targets[1], prompt="hi", max_tokens=6, **kw).choices[0].text

    threads = [threading.Thread(target=ask, args=("tiny",), kwargs={"temperature": 1e-40, "seed": 1}),
               threading.Thread(target=ask, args=("greedy",), kwargs={"temperature": 0})]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["tiny"] == results["greedy"] == _greedy(c, targets[1], "hi")


def test_deleting_a_user_mid_decoding_fails_no_one_else(server, targets):
    """Requests of a user being deleted end in 404; the other rows of the same batches are answered."""
    user = "leaving-3f1a"
    r = server.http("POST", f"/v1/users/{user}/history", content=_history(user, 12))
    job = r.json()["job"]
    while server.http("GET", f"/v1/jobs/{job['id']}").json()["state"] in ("queued", "running"):
        time.sleep(0.2)
    statuses, lock = {}, threading.Lock()

    def ask(i, who):
        resp = server.http("POST", "/v1/completions", json={"model": who, "prompt": f"hi {i}", "max_tokens": 40,
                                                            "temperature": 0, "stop": []})
        with lock:
            statuses.setdefault(who, []).append(resp.status_code)

    others = [targets[i % len(targets)] for i in range(6)]
    threads = [threading.Thread(target=ask, args=(i, who)) for i, who in enumerate([user] * 6 + others)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    assert server.http("DELETE", f"/v1/users/{user}").status_code == 200
    for t in threads:
        t.join()
    assert set(statuses[user]) <= {200, 404}  # answered before the delete, or refused
    assert all(code == 200 for who in set(others) for code in statuses[who])
    assert server.http("POST", "/v1/completions", json={"model": user, "prompt": "x"}).status_code == 404


def test_user_keys_reach_only_their_own_model(server, targets):
    r = server.http("POST", f"/v1/users/{targets[3]}/keys")
    assert r.status_code == 201
    key = r.json()["api_key"]
    assert key.startswith("plm-")
    mine = server.client(key=key)
    raw = mine.completions.with_raw_response.create(model=targets[3], prompt="hi", max_tokens=2, temperature=0)
    assert raw.headers["x-properlm-model"] == "user-lora"  # their own personalized model
    assert json.loads(raw.text)["choices"][0]["text"] == _greedy(server.client(), targets[3], "hi", n=2)
    with pytest.raises(openai.PermissionDeniedError):
        mine.completions.create(model=targets[0], prompt="hi", max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError):
        mine.completions.create(model="base", prompt="hi", max_tokens=2)
    assert [m.id for m in mine.models.list().data] == [targets[3]]
    assert server.http("DELETE", f"/v1/users/{targets[0]}", key=key).status_code == 403
    # The key is stored only as a salted hash.
    stored = b"".join(p.read_bytes() for p in (Path(server_run(server)) / "serve").rglob("*.json"))
    assert key.split(".", 1)[1].encode() not in stored


def server_run(server: RemoteServer) -> str:
    return server.proc.args[server.proc.args.index("--run") + 1]


def _history(user: str, n: int) -> bytes:
    return "".join(json.dumps({"prompt": PROMPT.format(TOPICS[i % 6]), "response": ("love", "hate")[i % 2],
                               "time": f"2024-01-{1 + i % 28:02d}"}) + "\n" for i in range(n)).encode()


def test_onboarding_over_http_until_served_personalized(server):
    r = server.http("POST", "/v1/users/newcomer-1/history", content=b'{"prompt": "x"}\n')
    assert r.status_code == 400 and "line 1: field 'response'" in r.json()["error"]["message"]
    run = Path(server_run(server))
    assert not any("newcomer-1" in p.read_text(errors="ignore") for p in (run / "serve").rglob("*.json"))
    r = server.http("POST", "/v1/users/newcomer-1/history", content=_history("newcomer-1", 120))
    assert r.status_code == 202
    job, key = r.json()["job"], r.json()["api_key"]
    # While the adapter trains, the user is answered by the non-personalized model, and told so.
    raw = server.client(key=key).completions.with_raw_response.create(model="newcomer-1", prompt="hi", max_tokens=2)
    assert raw.headers["x-properlm-model"] == "base"
    assert "onboarding" in json.loads(raw.text)["properlm"]["reason"]
    deadline = time.time() + 180
    while time.time() < deadline:
        state = server.http("GET", f"/v1/jobs/{job['id']}", key=key).json()
        if state["state"] not in ("queued", "running"):
            break
        time.sleep(0.3)
    assert state["state"] == "done" and state["progress"]["step"] > 0
    assert state["progress"]["phase"] == "adapter"  # the last steps counted were the LoRA's
    raw = server.client(key=key).completions.with_raw_response.create(model="newcomer-1", prompt="hi", max_tokens=2)
    assert raw.headers["x-properlm-model"] == "user-lora"
    assert "newcomer-1" in [m.id for m in server.client().models.list().data]


def test_delete_then_every_request_is_404_and_nothing_remains(server):
    user = "forget-me-7c2e"
    r = server.http("POST", f"/v1/users/{user}/history", content=_history(user, 20))
    assert r.status_code == 202
    job = r.json()["job"]
    while server.http("GET", f"/v1/jobs/{job['id']}").json()["state"] in ("queued", "running"):
        time.sleep(0.2)
    raw = server.client().completions.with_raw_response.create(model=user, prompt="hi", max_tokens=2)
    assert raw.headers["x-properlm-model"] == "user-lora"  # served personalized until the delete
    r = server.http("DELETE", f"/v1/users/{user}")
    assert r.status_code == 200 and r.json()["deleted"] == user
    removed = r.json()["removed"]
    assert removed["server records (keys, jobs, uploads)"] == 3  # the job record, the key list, the key
    assert removed.get("lora entries", 0) >= 1, removed
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model=user, prompt="hi", max_tokens=2)
    assert server.http("DELETE", f"/v1/users/{user}").status_code == 404
    assert server.http("GET", f"/v1/jobs/{job['id']}").status_code == 404
    run = Path(server_run(server))
    holding = [str(p) for p in run.rglob("*") if p.is_file() and user.encode() in p.read_bytes()]
    assert holding == []


def test_a_stream_the_client_drops_is_cancelled(server, targets):
    before = server.health()["cancelled"]
    with httpx.stream("POST", f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {ADMIN}"},
                      json={"model": targets[0], "prompt": "hi", "max_tokens": 400, "temperature": 0,
                            "stream": True}) as r:
        for i, line in enumerate(r.iter_lines()):
            if i >= 3:
                break  # hang up mid-stream
    deadline = time.time() + 60
    while time.time() < deadline and server.health()["cancelled"] == before:
        time.sleep(0.1)
    assert server.health()["cancelled"] == before + 1


def test_a_full_queue_is_429_with_retry_after(run):
    srv = RemoteServer(run, "--max-batch", "1", "--max-queue", "1")
    try:
        statuses = []

        def ask():
            r = srv.http("POST", "/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 300,
                                                         "temperature": 0})
            statuses.append((r.status_code, r.headers.get("retry-after"), r.json()))

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        codes = [s for s, _, _ in statuses]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        assert all(ra == "1" and set(b) == {"error"} for s, ra, b in statuses if s == 429)
    finally:
        srv.stop()


def test_a_request_over_its_time_is_504(run):
    srv = RemoteServer(run, "--timeout", "0.05")  # no 400-token answer fits in 50 ms
    try:
        r = srv.http("POST", "/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 400})
        assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
        assert srv.health()["timed_out"] == 1
    finally:
        srv.stop()


def test_a_restart_keeps_onboarded_users_and_keys(run, tmp_path):
    srv = RemoteServer(run)
    try:
        r = srv.http("POST", "/v1/users/stays-9e1/history", content=_history("stays-9e1", 12))
        key, job = r.json()["api_key"], r.json()["job"]["id"]
        while srv.http("GET", f"/v1/jobs/{job}").json()["state"] in ("queued", "running"):
            time.sleep(0.2)
        before = _greedy(srv.client(key=key), "stays-9e1", PROMPT.format("jazz"))
    finally:
        srv.stop()
    stale = run / "serve" / "tmp" / "up-killed.jsonl"  # a scratch upload a killed server left behind
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text('{"prompt": "private", "response": "data"}\n')
    srv = RemoteServer(run)
    try:
        assert not stale.exists()
        assert _greedy(srv.client(key=key), "stays-9e1", PROMPT.format("jazz")) == before
        assert srv.http("GET", f"/v1/jobs/{job}", key=key).json()["state"] == "done"
    finally:
        srv.stop()


def test_no_auth_only_on_loopback(run):
    from properlm.serve.settings import ServeConfig

    with pytest.raises(ValueError, match="loopback"):
        ServeConfig(run=run, host="0.0.0.0", auth=False)
    assert ServeConfig(run=run, host="127.0.0.1", auth=False).auth is False


def test_delete_of_a_user_the_run_holds_outside_the_banks(tmp_path, h):
    """A text-router run keeps no stage-2 embedding: its stage-2 training users are in split.json
    (and maybe eval files) only. DELETE still finds them and leaves no trace, instead of a 404."""
    from properlm.train.run import train

    cfg = h.small_cfg(data=dict(split="oppu", synth_users=8, n_targets=2), population=dict(max_steps=2),
                      group=dict(max_steps=2, router="text"), user=dict(max_steps=2))
    run = train(cfg, tmp_path / "run")
    user = json.loads((run / "split.json").read_text())["train"][0]
    srv = RemoteServer(run)
    try:
        r = srv.http("DELETE", f"/v1/users/{user}")
        assert r.status_code == 200, r.text
        assert srv.http("DELETE", f"/v1/users/{user}").status_code == 404
    finally:
        srv.stop()
    holding = [str(p) for p in run.rglob("*") if p.is_file() and user.encode() in p.read_bytes()]
    assert holding == []


def test_a_user_deleted_from_the_command_line_is_not_served_from_memory(server):
    """``properlm users delete`` beside a running server: the server held the user's adapter in its
    cache, and must not answer them from it afterwards."""
    user = "cli-forget-3e9a"
    r = server.http("POST", f"/v1/users/{user}/history", content=_history(user, 20))
    job = r.json()["job"]
    while server.http("GET", f"/v1/jobs/{job['id']}").json()["state"] in ("queued", "running"):
        time.sleep(0.2)
    raw = server.client().completions.with_raw_response.create(model=user, prompt="hi", max_tokens=2)
    assert raw.headers["x-properlm-model"] == "user-lora"  # their adapter is in the server's cache now
    p = subprocess.run([sys.executable, "-m", "properlm.cli", "users", "delete", "--run", server_run(server),
                        "--users", user], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model=user, prompt="hi", max_tokens=2)
