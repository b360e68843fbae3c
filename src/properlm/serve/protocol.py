"""The wire format: OpenAI's completion and chat objects, properlm's user and job objects, errors.

Requests are pydantic models (unknown fields are ignored, as OpenAI does);
responses are built as plain dicts by the helpers below, in OpenAI's shapes,
with one extra field ``properlm`` saying which model answered.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field, field_validator

MAX_STOPS = 4
MAX_STOP_CHARS = 512


class _Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    #: up to 4 strings, as OpenAI allows; each is checked against the answer's tail at every token
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2 ** 63), lt=2 ** 64)  # what torch.Generator takes
    stream: bool = False
    user: str | None = None
    n: int = Field(default=1, ge=1, le=1)

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return ([self.stop] if self.stop else []) if isinstance(self.stop, str) else [s for s in self.stop if s]

    @field_validator("stop")
    @classmethod
    def _bounded(cls, v):
        if isinstance(v, list) and len(v) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        if any(len(x) > MAX_STOP_CHARS for x in ([v] if isinstance(v, str) else v or [])):
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters")
        return v


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: a prompt, formatted with the run's chat template as ``properlm generate`` does."""

    prompt: str | list[str]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: messages, formatted with the base tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def properlm_field(kind: str, user: str | None, reason: str | None = None) -> dict:
    """Which model answered: ``user-lora``, ``group`` or ``base``; ``personalized`` false for ``base``."""
    out = {"model": kind, "personalized": kind != "base", "user": user}
    if reason:
        out["reason"] = reason
    return out


def completion_response(rid: str, model: str, text: str, finish: str, usage: dict, who: dict, chat: bool) -> dict:
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
              if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage, "properlm": who}


def chunk(rid: str, model: str, delta: str | None, finish: str | None, chat: bool, who: dict | None = None,
          first: bool = False) -> dict:
    if chat:
        d = {"role": "assistant", "content": delta or ""} if first else ({"content": delta} if delta else {})
        choice = {"index": 0, "delta": d, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
           "model": model, "choices": [choice]}
    if who is not None:
        out["properlm"] = who
    return out


def error_body(message: str, kind: str, status: int, param: str | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}
