"""OpenAI compatibility of ``properlm serve`` with real clients: the ``openai`` package and LangChain's ChatOpenAI.

Against a live server on 127.0.0.1 (the harness of test_serve.py). What OpenAI
defines is either honoured (max_completion_tokens, text content parts, the
developer role, models.retrieve, stream_options.include_usage, logprobs) or
refused with a 400 naming the field; nothing is ignored silently.
"""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest

from test_serve import ADMIN, PROMPT, run, server, targets  # noqa: F401 (run, server, targets: fixtures)

pytestmark = pytest.mark.slow


def _chat(server, **body) -> httpx.Response:
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return server.http("POST", "/v1/chat/completions", json=body)


def test_models_retrieve_with_the_same_rules_as_the_list(server, targets):
    admin = server.client()
    assert admin.models.retrieve(targets[0]).id == targets[0]
    assert admin.models.retrieve("base").id == "base" and admin.models.retrieve("properlm").id == "properlm"
    with pytest.raises(openai.NotFoundError):
        admin.models.retrieve("nobody-here")
    key = server.http("POST", f"/v1/users/{targets[1]}/keys").json()["api_key"]
    mine = server.client(key=key)
    assert mine.models.retrieve(targets[1]).id == targets[1]
    for other in (targets[0], "base", "properlm"):  # models this key may not use are not there for it
        with pytest.raises(openai.NotFoundError):
            mine.models.retrieve(other)
    ids = [m.id for m in admin.models.list().data]
    assert len(ids) == len(set(ids))


def test_max_completion_tokens_is_honoured(server, targets):
    c = server.client()
    r = c.chat.completions.create(model=targets[0], messages=[{"role": "user", "content": PROMPT.format("jazz")}],
                                  max_completion_tokens=2, temperature=0)
    assert r.usage.completion_tokens <= 2
    # Beside max_tokens: the same value is fine, two different ones are a 400 naming the field.
    r = _chat(server, model=targets[0], max_tokens=3, max_completion_tokens=3, temperature=0)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    r = _chat(server, model=targets[0], max_tokens=3, max_completion_tokens=5)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"


def test_text_parts_and_the_developer_role(server, targets):
    c = server.client()
    text = PROMPT.format("soccer")
    plain = c.chat.completions.create(model=targets[0], temperature=0, max_tokens=6,
                                      messages=[{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": text}])
    parts = c.chat.completions.create(model=targets[0], temperature=0, max_tokens=6,
                                      messages=[{"role": "developer", "content": "Be brief."},
                                                {"role": "user", "content": [{"type": "text", "text": text[:20]},
                                                                             {"type": "text", "text": text[20:]}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content
    r = _chat(server, model=targets[0], messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content.1.type"
    assert "not supported" in r.json()["error"]["message"]
    r = _chat(server, model=targets[0], messages=[{"role": "tool", "content": "42", "tool_call_id": "c1"}])
    assert r.status_code == 400 and r.json()["error"]["param"] in ("messages.0.role", "messages.0.tool_call_id")


def test_stream_with_usage_ends_in_a_usage_chunk(server, targets):
    c = server.client()
    chunks = list(c.chat.completions.create(model=targets[2], temperature=0, max_tokens=5, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": PROMPT.format("taxes")}]))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens >= 1
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])  # only the last one (it would be counted twice)
    whole = c.chat.completions.create(model=targets[2], temperature=0, max_tokens=5,
                                      messages=[{"role": "user", "content": PROMPT.format("taxes")}])
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1]) == whole.choices[0].message.content
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    streamed = list(c.completions.create(model=targets[2], prompt="hi", max_tokens=3, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert streamed[-1].choices == [] and streamed[-1].usage.completion_tokens >= 1
    r = _chat(server, model=targets[2], stream_options={"include_usage": True})  # without stream: refused
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


def _check_greedy_entries(content, k):
    assert content, "no log probabilities came back"
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == k
        assert all(t.logprob <= 0 for t in e.top_logprobs)
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert e.logprob == max(t.logprob for t in e.top_logprobs)
        assert bytes(e.bytes).decode("utf-8", errors="replace") == e.token


def test_chat_logprobs_with_top_logprobs(server, targets):
    c = server.client()
    msgs = [{"role": "user", "content": PROMPT.format("robots")}]
    r = c.chat.completions.create(model=targets[1], messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                  top_logprobs=3)
    content = r.choices[0].logprobs.content
    _check_greedy_entries(content, 3)
    assert len(content) == r.usage.completion_tokens
    text = r.choices[0].message.content
    assert bytes(b for e in content for b in e.bytes).decode("utf-8", errors="replace").startswith(text)
    # The same numbers in the stream, piece by piece.
    chunks = list(c.chat.completions.create(model=targets[1], messages=msgs, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    # Without logprobs there are none; top_logprobs alone is a 400.
    assert c.chat.completions.create(model=targets[1], messages=msgs, max_tokens=2).choices[0].logprobs is None
    r = _chat(server, model=targets[1], top_logprobs=2)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_completion_logprobs(server, targets):
    c = server.client()
    r = c.completions.create(model=targets[0], prompt=PROMPT.format("hiking"), max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    for tok, p, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert p <= 0 and tok in top and len(top) <= 3
        assert p == max(top.values())  # greedy
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    parts = list(c.completions.create(model=targets[0], prompt=PROMPT.format("hiking"), max_tokens=5, temperature=0,
                                      logprobs=2, stream=True))
    streamed = [t for p in parts if p.choices and p.choices[0].logprobs for t in p.choices[0].logprobs.tokens]
    assert streamed == lp.tokens
    r = server.http("POST", "/v1/completions", json={"model": targets[0], "prompt": "x", "logprobs": 6})
    assert r.status_code == 422 and r.json()["error"]["param"] == "logprobs"


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "auto"), ("functions", [{"name": "f"}]), ("response_format", {"type": "json_object"}),
    ("logit_bias", {"50": 10}), ("presence_penalty", 0.5), ("frequency_penalty", 1.0), ("n", 2),
    ("store", True), ("reasoning_effort", "high"), ("whatever_new_field", 1)])
def test_unimplemented_fields_are_a_400_naming_them(server, targets, field, value):
    r = _chat(server, model=targets[0], max_tokens=2, **{field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and "not supported" in err["message"]


@pytest.mark.parametrize("field,value", [("echo", True), ("best_of", 2), ("suffix", "end"), ("logit_bias", {"5": 1}),
                                         ("max_completion_tokens", 4)])
def test_unimplemented_completion_fields_are_a_400(server, targets, field, value):
    r = server.http("POST", "/v1/completions", json={"model": targets[0], "prompt": "x", "max_tokens": 2,
                                                     field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_harmless_defaults_are_accepted(server, targets):
    r = _chat(server, model=targets[0], max_tokens=2, temperature=0, n=1, presence_penalty=0, frequency_penalty=0.0,
              logit_bias={}, response_format={"type": "text"}, tools=[], tool_choice=None, store=False,
              user="anyone", seed=3, stop=None, stream=False, logprobs=False)
    assert r.status_code == 200, r.text
    r = server.http("POST", "/v1/completions", json={"model": targets[0], "prompt": "x", "max_tokens": 2,
                                                     "echo": False, "best_of": 1, "suffix": None, "n": 1})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field,value", [("stream", "yes"), ("max_tokens", "5"), ("max_tokens", 5.0),
                                         ("temperature", "0.5"), ("seed", "1"), ("logprobs", 1),
                                         ("max_completion_tokens", "2"), ("top_p", True)])
def test_types_are_strict(server, targets, field, value):
    r = _chat(server, model=targets[0], **{field: value})
    assert r.status_code == 422 and r.json()["error"]["param"] == field, r.text


def test_langchain_chat_openai(server, targets):
    """LangChain's ChatOpenAI sends its max_tokens as max_completion_tokens: the limit holds."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=targets[0], base_url=f"{server.url}/v1", api_key=ADMIN, max_tokens=3, temperature=0,
                     max_retries=0)
    msg = llm.invoke(PROMPT.format("coffee"))
    assert isinstance(msg.content, str) and msg.content
    assert 1 <= msg.usage_metadata["output_tokens"] <= 3
    want = server.client().chat.completions.create(model=targets[0], temperature=0, max_tokens=3,
                                                   messages=[{"role": "user", "content": PROMPT.format("coffee")}])
    assert msg.content == want.choices[0].message.content
    # Streaming, with the usage LangChain asks for.
    stream = ChatOpenAI(model=targets[0], base_url=f"{server.url}/v1", api_key=ADMIN, max_tokens=3, temperature=0,
                        max_retries=0, stream_usage=True)
    total = None
    for part in stream.stream(PROMPT.format("coffee")):
        total = part if total is None else total + part
    assert total.content == msg.content and total.usage_metadata["output_tokens"] == msg.usage_metadata["output_tokens"]


def test_nan_and_wrong_prompt_types_are_named_plainly(server, targets):
    r = server.http("POST", "/v1/completions", content=b'{"model": "%s", "prompt": "x", "temperature": NaN}'
                    % targets[0].encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422 and "finite number" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "temperature"
    for prompt in (5, ["a", 3], {"text": "x"}):
        r = server.http("POST", "/v1/completions", json={"model": targets[0], "prompt": prompt})
        assert r.status_code == 422 and r.json()["error"]["param"] == "prompt", r.text


def test_the_openai_client_default_requests_still_work(server, targets):
    """What the openai client sends when asked plainly is accepted (a regression guard for the strict fields)."""
    c = server.client()
    assert c.chat.completions.create(model=targets[0], messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=2).choices[0].finish_reason in ("stop", "length")
    assert c.completions.create(model=targets[0], prompt="hi", max_tokens=2).usage.completion_tokens <= 2
    assert math.isfinite(json.loads(c.completions.with_raw_response.create(
        model=targets[0], prompt="hi", max_tokens=1).text)["created"])
