"""The wire format: OpenAI's completion and chat objects, properlm's user and job objects, errors.

Requests are pydantic models that never ignore a field silently: a field this
server does not know, or an OpenAI field it does not implement given a value
other than its "not used" default (:data:`UNSUPPORTED`), is refused (400, naming
the field); numbers and booleans are strict (``"max_tokens": "5"`` is a 422, not
5). Responses are built as plain dicts by the helpers below, in OpenAI's shapes,
with one extra field ``properlm`` saying which model answered.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_STOPS = 4
MAX_STOP_CHARS = 512
#: Alternatives per token: chat's ``top_logprobs`` (as OpenAI: 0-20) and completions' ``logprobs`` (0-5).
MAX_TOP_LOGPROBS, MAX_COMPLETION_LOGPROBS = 20, 5
#: Validation error types answered 400 (the request asks for what is not there) instead of 422.
NOT_SUPPORTED, CONFLICT = "not_supported", "conflicting_fields"
BAD_REQUEST_TYPES = ("extra_forbidden", NOT_SUPPORTED, CONFLICT)

#: A strict, finite float (``NaN``, ``Infinity``, strings and booleans are refused).
Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]

#: OpenAI request fields this server does not implement, with the values that mean "not used"
#: (what clients send by default); any other value is a 400 naming the field.
UNSUPPORTED: dict[str, tuple] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True, False),  # meaningless without tools
    "functions": (None, []),
    "function_call": (None, "none"),
    "store": (None, False),
    "metadata": (None, {}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
    "service_tier": (None, "auto", "default"),
    "prompt_cache_key": (None,),
    "safety_identifier": (None,),
}
#: Fields of a chat message this server does not implement (only ``None`` is accepted).
UNSUPPORTED_MESSAGE_FIELDS = ("name", "tool_calls", "tool_call_id", "function_call", "refusal", "audio",
                              "annotations")


def _same(a, b) -> bool:
    """Equal and of the same kind (``False`` is not ``0``, ``1.0`` is ``1``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def not_supported(detail: str = "") -> PydanticCustomError:
    """The error of a field (or value) this server does not implement: answered 400 naming the field."""
    return PydanticCustomError(NOT_SUPPORTED, f"not supported by this server{detail}")


def _check_unsupported(value: Any, info) -> Any:
    if not any(_same(value, ok) for ok in UNSUPPORTED[info.field_name]):
        raise not_supported(" (only its default, meaning not used, is accepted)")
    return value


def _texts(value: Any) -> Any:
    """``value`` when it is a string or a list of strings (one error naming the field otherwise)."""
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(x, str) for x in value)):
        return value
    raise PydanticCustomError("string_type", "must be a string or a list of strings")


class _Strict(BaseModel):
    """Unknown fields are refused (400 naming them), never ignored."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    """``stream_options``: ``include_usage`` adds a last chunk with empty ``choices`` and the usage."""

    include_usage: StrictBool = False


class _Sampling(_Strict):
    model: str
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Finite = Field(default=1.0, ge=0.0, le=2.0)
    top_p: Finite = Field(default=1.0, gt=0.0, le=1.0)
    #: up to 4 strings, as OpenAI allows; each is checked against the answer's tail at every token
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=-(2 ** 63), lt=2 ** 64)  # what torch.Generator takes
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: StrictInt = 1
    # Accepted only with their "not used" values (UNSUPPORTED); checked by _unsupported below.
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return ([self.stop] if self.stop else []) if isinstance(self.stop, str) else [s for s in self.stop if s]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @field_validator("frequency_penalty", "presence_penalty", "logit_bias", "response_format", "tools",
                     "tool_choice", "parallel_tool_calls", "functions", "function_call", "store", "metadata",
                     "service_tier")
    @classmethod
    def _unsupported(cls, v, info):
        return _check_unsupported(v, info)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v != 1:
            raise not_supported(": one choice per request (n=1)")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_texts(cls, v):
        return v if v is None else _texts(v)

    @field_validator("stop")
    @classmethod
    def _bounded(cls, v):
        if isinstance(v, list) and len(v) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        if any(len(x) > MAX_STOP_CHARS for x in ([v] if isinstance(v, str) else v or [])):
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError(CONFLICT, "'stream_options' is allowed only with 'stream': true",
                                      {"param": "stream_options"})
        return self


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: a prompt, formatted with the run's chat template as ``properlm generate`` does."""

    prompt: str | list[str]
    #: the log probabilities of each token and of this many most likely alternatives (0-5)
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: Any = None
    echo: Any = None
    suffix: Any = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_texts(cls, v):
        return _texts(v)

    @field_validator("best_of", "echo", "suffix")
    @classmethod
    def _unsupported_completion(cls, v, info):
        return _check_unsupported(v, info)

    @property
    def top_count(self) -> int | None:
        """Alternatives per token (None: no log probabilities)."""
        return self.logprobs


class ChatMessage(_Strict):
    """One message; ``developer`` is a system message; ``content`` a string or a list of text parts."""

    role: str
    content: str | list[dict]
    name: Any = None
    tool_calls: Any = None
    tool_call_id: Any = None
    function_call: Any = None
    refusal: Any = None
    audio: Any = None
    annotations: Any = None

    @field_validator("role")
    @classmethod
    def _role(cls, v):
        if v in ("tool", "function"):
            raise not_supported(f": messages of role {v!r}")
        if v not in ("system", "developer", "user", "assistant"):
            raise PydanticCustomError("literal_error", "must be one of 'system', 'developer', 'user', 'assistant'")
        return v

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v):
        if isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise PydanticCustomError("string_type", "must be a string or a list of text parts")
        for i, part in enumerate(v):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise PydanticCustomError("model_type", "must be an object with a 'type'", {"param": str(i)})
            if part["type"] != "text":
                raise PydanticCustomError(NOT_SUPPORTED, "not supported by this server (only 'text' parts)",
                                          {"param": f"{i}.type"})
            extra = next((k for k in part if k not in ("type", "text")), None)
            if extra is not None:
                raise PydanticCustomError(NOT_SUPPORTED, "not supported by this server", {"param": f"{i}.{extra}"})
            if not isinstance(part.get("text"), str):
                raise PydanticCustomError("string_type", "must be a string", {"param": f"{i}.text"})
        return v

    @field_validator(*UNSUPPORTED_MESSAGE_FIELDS)
    @classmethod
    def _unsupported(cls, v, info):
        if v is not None:
            raise not_supported(" in messages")
        return v

    def as_template(self) -> dict:
        """``{"role", "content"}`` for the chat template: text parts joined, ``developer`` as ``system``."""
        text = self.content if isinstance(self.content, str) else "".join(p["text"] for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: messages, formatted with the base tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    #: OpenAI's current name of ``max_tokens`` (LangChain sends its ``max_tokens`` as this)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None

    @field_validator("modalities", "audio", "prediction", "reasoning_effort", "verbosity", "web_search_options",
                     "prompt_cache_key", "safety_identifier")
    @classmethod
    def _unsupported_chat(cls, v, info):
        return _check_unsupported(v, info)

    @model_validator(mode="after")
    def _one_limit(self):
        a, b = self.max_tokens, self.max_completion_tokens
        if a is not None and b is not None and a != b:
            raise PydanticCustomError(CONFLICT, "'max_tokens' and 'max_completion_tokens' differ; give one of "
                                                "them (or the same value)", {"param": "max_completion_tokens"})
        if self.top_logprobs is not None and not self.logprobs:
            raise PydanticCustomError(CONFLICT, "'top_logprobs' needs 'logprobs': true", {"param": "top_logprobs"})
        return self

    @property
    def token_limit(self) -> int | None:
        """The new-token limit asked for: ``max_completion_tokens`` or ``max_tokens`` (None: the default)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def top_count(self) -> int | None:
        """Alternatives per token (None: no log probabilities)."""
        return (self.top_logprobs or 0) if self.logprobs else None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def properlm_field(kind: str, user: str | None, reason: str | None = None) -> dict:
    """Which model answered: ``user-lora``, ``group`` or ``base``; ``personalized`` false for ``base``."""
    out = {"model": kind, "personalized": kind != "base", "user": user}
    if reason:
        out["reason"] = reason
    return out


def chat_logprobs(entries: list[dict]) -> dict:
    """Chat's ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal": None}``."""
    def one(e):
        return {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"]}

    return {"content": [{**one(e), "top_logprobs": [one(t) for t in e["top"]]} for e in entries], "refusal": None}


def completion_logprobs(entries: list[dict], offset: int = 0, k: int = 0) -> dict:
    """Completions' ``logprobs``: ``{tokens, token_logprobs, top_logprobs, text_offset}``.

    ``top_logprobs`` maps the ``k`` most likely tokens and the chosen one to their log probabilities
    (up to ``k + 1`` entries, as OpenAI); ``text_offset`` is each token's offset in the completion text,
    counted from ``offset``.
    """
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    tops = [{**{t["token"]: t["logprob"] for t in e["top"][:k]}, e["token"]: e["logprob"]} for e in entries]
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": tops, "text_offset": offsets}


def completion_response(rid: str, model: str, text: str, finish: str, usage: dict, who: dict, chat: bool,
                        logprobs: dict | None = None) -> dict:
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
               "finish_reason": finish}
              if chat else {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage, "properlm": who}


def chunk(rid: str, model: str, delta: str | None, finish: str | None, chat: bool, who: dict | None = None,
          first: bool = False, logprobs: dict | None = None) -> dict:
    if chat:
        d = {"role": "assistant", "content": delta or ""} if first else ({"content": delta} if delta else {})
        choice = {"index": 0, "delta": d, "logprobs": logprobs, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": delta or "", "logprobs": logprobs, "finish_reason": finish}
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
           "model": model, "choices": [choice]}
    if who is not None:
        out["properlm"] = who
    return out


def usage_chunk(rid: str, model: str, chat: bool, usage: dict) -> dict:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [], "usage": usage}


def error_body(message: str, kind: str, status: int, param: str | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}
