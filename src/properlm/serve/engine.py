"""Continuous batching: requests of many users decoded together, one token per step for every row.

One thread owns the model. It admits waiting requests between token steps (up
to ``max_batch`` rows: their prompts are prefilled together and merged into the
running batch), takes one decoding step for all rows at once, each row with its
own user's adapter (:class:`~properlm.model.decoding.DecodeBatch`), and drops
rows that finished, timed out or were cancelled (a client that went away, a
user who was deleted). Tokens reach each request's handler as events, so
streaming clients see them as they come.

A request's tokens depend only on its own prompt, user and sampling settings:
greedy decoding gives the same answer as ``properlm generate`` whatever else is
in the batch, and a seeded sample draws from the request's own generator.

A request may ask for log probabilities (``logprobs``: how many alternatives):
each generated token's log probability under the model's next-token
distribution (the logits as they are: before temperature and ``top_p``), and
those of the most likely tokens, with each token's text and bytes.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from properlm.model.decoding import DecodeBatch, Row, choose
from properlm.model.generate import stop_ids
from properlm.serve.settings import log_failure

log = logging.getLogger("properlm.serve")


class QueueFull(Exception):
    """More requests are waiting than the server's ``max_queue``."""


@dataclass(eq=False)
class GenRequest:
    """One generation request as the engine runs it.

    Attributes:
        prompt_ids: the formatted prompt's token ids.
        lora_user, emb_user: whose LoRA / stage-2 embedding apply (None: none).
        user: the request's user id (for cancelling a deleted user's requests).
        max_tokens: new-token limit.
        temperature, top_p, seed: sampling (temperature 0: greedy).
        stops: strings that end the answer (not included in it).
        deadline: ``time.monotonic()`` after which the request is dropped (timeout).
        sink: called from the engine thread with ``(kind, payload)``: ``("delta", text)``,
            ``("done", {"text", "finish_reason", "completion_tokens", "logprobs"})`` or
            ``("error", (status, message))``; with ``logprobs``, also ``("tokens", [entry, ...])`` before
            each delta: the entries of the tokens generated since the previous one (see :meth:`Engine.entry`).
        logprobs: alternatives per token to report with their log probabilities (None: no log probabilities).
    """

    prompt_ids: list[int]
    lora_user: str | None
    emb_user: str | None
    user: str | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]
    deadline: float
    sink: Callable[[str, object], None]
    logprobs: int | None = None
    cancelled: str | None = None        # why, once cancelled
    generated: list[int] = field(default_factory=list)
    sent: str = ""
    generator: torch.Generator | None = None
    entries: list[dict] = field(default_factory=list)  # with logprobs: one per generated token
    entries_sent: int = 0


class Engine:
    """The decoding thread and its queue.

    Args:
        model: the run's :class:`~properlm.model.proper.ProperModel` (or a plain LM).
        tok: the tokenizer.
        bf16: bfloat16 autocast.
        max_batch: rows per forward pass.
        max_queue: requests allowed to wait for a row.
    """

    def __init__(self, model, tok, bf16: bool = False, max_batch: int = 32, max_queue: int = 256):
        self.model, self.tok, self.bf16 = model, tok, bf16
        self.max_batch, self.max_queue = max_batch, max_queue
        self.stops = stop_ids(tok)
        self._byte_level = _is_byte_level(tok)
        self._pieces: dict[int, tuple[str, list[int]]] = {}
        self.pending: collections.deque[GenRequest] = collections.deque()
        self.cond = threading.Condition()
        self.batch = DecodeBatch(model, tok.pad_token_id, bf16)
        self.active: list[GenRequest] = []
        self.steps = 0
        self.counts = {"finished": 0, "cancelled": 0, "timed_out": 0, "failed": 0}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="properlm-engine", daemon=True)

    # -- the handlers' side ------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def close(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        self._thread.join(timeout=10)

    def submit(self, req: GenRequest) -> None:
        """Queue a request (``QueueFull`` when ``max_queue`` are already waiting)."""
        with self.cond:
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"{len(self.pending)} requests are waiting")
            if req.temperature > 0:
                req.generator = torch.Generator()
                req.generator.manual_seed(req.seed if req.seed is not None else torch.seed() % 2**63)
            self.pending.append(req)
            self.cond.notify()

    def cancel(self, req: GenRequest, why: str = "cancelled") -> None:
        """Stop a request at the next step (its client went away)."""
        req.cancelled = req.cancelled or why

    def cancel_user(self, user: str, why: str = "deleted") -> int:
        """Stop every waiting or running request of ``user``; how many."""
        with self.cond:
            reqs = [r for r in (*self.pending, *self.active) if r.user == user]
        for r in reqs:
            self.cancel(r, why)
        return len(reqs)

    @property
    def load(self) -> dict:
        return {"running": len(self.active), "waiting": len(self.pending), "steps": self.steps, **self.counts}

    # -- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cond:
                while not self._stop and not self.pending and not self.active:
                    self.cond.wait(0.5)
                if self._stop:
                    break
                take = []
                while self.pending and len(self.active) + len(take) < self.max_batch:
                    take.append(self.pending.popleft())
            try:
                self._admit(take)
                if self.active:
                    self._step()
            except Exception as e:  # a bug must not take every later request down with it
                # Where it failed goes to the log, not its message (it may name a request's user).
                log_failure(log, "decoding step failed", e)
                for r in [*self.active, *take]:
                    self._fail(r, 500, "internal error while decoding")
                self.active = []
                self.batch = DecodeBatch(self.model, self.tok.pad_token_id, self.bf16)

    def _fail(self, r: GenRequest, status: int, message: str) -> None:
        r.cancelled = r.cancelled or "failed"
        self.counts["timed_out" if status == 504 else "failed"] += 1
        r.sink("error", (status, message))

    def _dropped(self, r: GenRequest, now: float) -> bool:
        """Finish a request that was cancelled or ran out of time; whether it was."""
        if r.cancelled == "deleted":
            self._fail(r, 404, f"unknown user {r.user!r}: deleted")
        elif r.cancelled:
            self.counts["cancelled"] += 1
            r.sink("error", (499, "cancelled"))
        elif now > r.deadline:
            self._fail(r, 504, "request timed out")
        else:
            return False
        return True

    def _admit(self, take: list[GenRequest]) -> None:
        now = time.monotonic()
        join = [r for r in take if not self._dropped(r, now)]
        if not join:
            return
        rows = [Row(r, r.prompt_ids, r.lora_user, r.emb_user) for r in join]
        try:
            self.batch.add(rows)
            self.active += join
        except Exception:
            # One bad row (e.g. a user deleted since the request was checked) must not fail the others.
            for row, r in zip(rows, join):
                try:
                    self.batch.add([row])
                    self.active.append(r)
                except Exception as e:
                    status = 404 if isinstance(e, KeyError) else 500
                    self._fail(r, status, str(e).strip("'\""))

    def _step(self) -> None:
        now = time.monotonic()
        logits = self.batch.next_logits
        done: set[GenRequest] = set()
        keep: list[int] = []
        for i, r in enumerate(self.active):
            if self._dropped(r, now):
                done.add(r)
                continue
            try:
                t = choose(logits[i], r.temperature, r.top_p, None, r.generator)
            except Exception as e:  # one row's sampling settings must not fail the others
                log_failure(log, "sampling failed for one request", e)
                self._fail(r, 500, "internal error while sampling")
                done.add(r)
                continue
            if t in self.stops:
                self._finish(r, "stop")
                done.add(r)
                continue
            r.generated.append(t)
            if r.logprobs is not None:
                r.entries.append(self.entry(logits[i], t, r.logprobs))
            hit = self._emit(r)
            if hit or len(r.generated) >= r.max_tokens:
                self._finish(r, "stop" if hit else "length")
                done.add(r)
            else:
                keep.append(t)
        self.batch.remove(done)
        self.active = [r for r in self.active if r not in done]
        if self.active:
            self.batch.step(keep)
            self.steps += 1

    # -- log probabilities -----------------------------------------------------------------------
    def piece(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and UTF-8 bytes (a byte-level BPE token's own bytes, which may be part of a character)."""
        got = self._pieces.get(token_id)
        if got is None:
            raw = self.tok.convert_ids_to_tokens(token_id)
            if self._byte_level and isinstance(raw, str) and all(c in _BYTE_DECODER for c in raw):
                data = bytes(_BYTE_DECODER[c] for c in raw)
            else:
                data = self.tok.decode([token_id]).encode("utf-8")
            got = self._pieces[token_id] = (data.decode("utf-8", errors="replace"), list(data))
        return got

    def entry(self, logits: torch.Tensor, token_id: int, k: int) -> dict:
        """``{"token", "logprob", "bytes", "top": [{"token", "logprob", "bytes"}] * k}`` of a chosen token."""
        lp = torch.log_softmax(logits.float(), -1)
        text, data = self.piece(token_id)
        top = []
        if k:
            values, ids = torch.topk(lp, min(k, lp.numel()))
            for v, i in zip(values.tolist(), ids.tolist()):
                t, b = self.piece(i)
                top.append({"token": t, "logprob": v, "bytes": b})
        return {"token": text, "logprob": float(lp[token_id]), "bytes": data, "top": top}

    def _send_entries(self, r: GenRequest) -> None:
        if r.logprobs is not None and r.entries_sent < len(r.entries):
            r.sink("tokens", r.entries[r.entries_sent:])
            r.entries_sent = len(r.entries)

    def _text(self, r: GenRequest) -> str:
        return self.tok.decode(r.generated, skip_special_tokens=True)

    def _emit(self, r: GenRequest) -> bool:
        """Send the new text of a request (holding back what may still become a stop string); True at a stop string."""
        text = self._text(r)
        hits = [text.find(s) for s in r.stops if s in text]
        if hits:
            text = text[:min(hits)]
        else:
            hold = max((k for s in r.stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                        if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
            if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
                text = text[:-1]
        if len(text) > len(r.sent) and text.startswith(r.sent):
            self._send_entries(r)
            r.sink("delta", text[len(r.sent):])
            r.sent = text
        return bool(hits)

    def _finish(self, r: GenRequest, reason: str) -> None:
        text = self._text(r)
        for s in r.stops:
            if s in text:
                text = text[:text.find(s)]
        self._send_entries(r)
        if len(text) > len(r.sent) and text.startswith(r.sent):
            r.sink("delta", text[len(r.sent):])
            r.sent = text
        self.counts["finished"] += 1
        r.sink("done", {"text": text, "finish_reason": reason, "completion_tokens": len(r.generated),
                        "logprobs": r.entries if r.logprobs is not None else None})


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: each byte as the printable character its tokens use."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def _is_byte_level(tok) -> bool:
    """Whether the tokenizer is a byte-level BPE (its tokens are strings of GPT-2's byte alphabet)."""
    try:
        from tokenizers import decoders

        return isinstance(tok.backend_tokenizer.decoder, decoders.ByteLevel)
    except Exception:  # a slow tokenizer, or one without a decoder
        return False
