"""The Python API for using a trained run: personalized generation for many users.

    >>> from properlm import load_run
    >>> lm = load_run("runs/demo", cache_mb=512)
    >>> lm.generate(["query for alice", "query for bob"], users=["alice", "bob"])

One call answers queries of different users in one batch: each row uses its
user's personalized model. Users are read from the run's user store when first
asked for and kept in an LRU cache of ``cache_mb`` (per bank), on the model's
device; loading a run reads no user. An id without a personalized model raises
:class:`~properlm.errors.UnknownUser`; ``fallback=True`` (or ``None`` as the
user) asks for the non-personalized model instead.

Which model answers a user (:meth:`PersonalizedLM.model_for`):

- ``"user-lora"``: the user's stage-3 LoRA (with their stage-2 group, if any);
- ``"group"``: the user's stage-2 embedding and no LoRA: a run trained up to stage 2, or
  in a stage-3 run a user who has an embedding but no LoRA (yet): a new user given an
  instant embedding while their LoRA trains, a stage-2 training user. Such a user is
  answered exactly as by the stage-2 model (:class:`~properlm.model.layers.Router`);
- ``"base"``: the non-personalized model (population + group experts, fallback routing).
"""

from __future__ import annotations

from pathlib import Path

import torch

from properlm.errors import ProperError, UnknownUser
from properlm.model.generate import generate
from properlm.model.proper import MODEL_BASE, MODEL_GROUP, MODEL_USER
from properlm.store.run import deleted_stamp, load_model, read_config, stages_done


class PersonalizedLM:
    """A trained run loaded for inference.

    Args:
        run_dir: the run directory.
        cache_mb: byte budget (MiB) of each user bank's in-memory cache.
        device: where the model runs (default: the run config's ``device``).

    Attributes:
        run_dir: the run directory.
        cfg: its saved config.
        model: the :class:`~properlm.model.proper.ProperModel` with every trained stage.
        tok: the tokenizer.
        level: the last trained stage (``population``, ``group`` or ``user``).
    """

    def __init__(self, run_dir: str | Path, cache_mb: float = 1024, device: str | None = None):
        from properlm.forget import complete_pending

        self.run_dir = Path(run_dir)
        self.cfg = read_config(self.run_dir)
        complete_pending(self.run_dir)  # an interrupted users delete is finished before anything is served
        done = stages_done(self.run_dir)
        if not done:
            raise ProperError(f"{self.run_dir}: no trained stage yet (run `properlm train`)")
        self.level = done[-1]
        upto = {"population": "group", "group": "user", "user": "done"}[self.level]
        self.model, self.tok = load_model(self.cfg, self.run_dir, upto, device=device,
                                          cache_bytes=int(cache_mb * 2**20))
        self.model.eval()
        self._deleted = deleted_stamp(self.run_dir)

    def sync_deletes(self) -> list[str]:
        """Drop from memory the users another process deleted (``properlm users delete`` beside a
        server); who they were. One ``stat`` when nobody was deleted since the last call."""
        stamp = deleted_stamp(self.run_dir)
        if stamp == self._deleted:
            return []
        self._deleted = stamp
        gone = []
        for bank in (self.model.user_loras, self.model.user_embs):
            if hasattr(bank, "drop_missing"):
                gone += bank.drop_missing()
        return gone

    @property
    def users(self) -> list[str]:
        """Users with a personalized model (a listing of the store: reads every shard's index). In a
        stage-3 run, those with a LoRA: the users answered by their group alone (the stage-2 training
        users, users given only an instant embedding) are served but not listed."""
        bank = self._bank()
        return list(bank.user_ids) if bank is not None else []

    def _bank(self):
        if self.level == "user":
            return self.model.user_loras
        if self.level == "group":
            return self.model.user_embs
        return None

    def model_for(self, user: str | None, fallback: bool = False) -> str:
        """Which model answers ``user``: ``"user-lora"``, ``"group"`` or ``"base"``.

        Raises:
            UnknownUser: ``user`` has no personalized model and ``fallback`` is false.
        """
        if user is None:
            return MODEL_BASE
        bank = self._bank()
        if bank is not None and user in bank:
            return MODEL_USER if self.level == "user" else MODEL_GROUP
        embs = self.model.user_embs if self.level == "user" else None
        if embs is not None and user in embs:  # an embedding, no LoRA (yet): their group answers
            return MODEL_GROUP
        if fallback:
            return MODEL_BASE
        raise UnknownUser(user, f"in {self.run_dir}")

    def rows_for(self, users: list[str | None], fallback: bool = False) -> tuple[list[str | None], list[str | None]]:
        """Per row, the LoRA user and the stage-2 embedding user its model reads (None: none)."""
        kinds = [self.model_for(u, fallback) for u in users]
        lora_rows = [u if k == MODEL_USER else None for u, k in zip(users, kinds)]
        embs = self.model.user_embs
        # The user's stage-2 embedding (training users; unseen users fitted on their history),
        # read by the stage-2 router and carried into the stage-3 router.
        emb_rows = [u if k != MODEL_BASE and embs is not None and u in embs else None for u, k in zip(users, kinds)]
        return lora_rows, emb_rows

    def generate(self, queries: list[str], users: list[str | None], max_new_tokens: int = 32,
                 fallback: bool = False, **kw) -> list[str]:
        """Answer ``queries[i]`` as personalized for ``users[i]``, all in one batch.

        Args:
            queries: the prompts (the chat template is applied here).
            users: per query, a user id, or None for the non-personalized model.
            max_new_tokens: answer length limit.
            fallback: answer ids without a personalized model with the non-personalized
                model instead of raising :class:`UnknownUser`.
            **kw: decoding settings of :func:`properlm.model.generate.generate`.
        """
        if len(queries) != len(users):
            raise ValueError("queries and users must have the same length")
        lora_rows, emb_rows = self.rows_for(users, fallback)
        return generate(self.model, self.tok, queries, lora_users=lora_rows, emb_users=emb_rows,
                        max_new_tokens=max_new_tokens, bf16=self.cfg.bf16, **kw)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, users: list[str | None],
               fallback: bool = False) -> torch.Tensor:
        """Full logits (B, T, V) with each row personalized for its user."""
        lora_rows, emb_rows = self.rows_for(users, fallback)
        self.model.bind(emb_users=emb_rows, lora_users=lora_rows)
        try:
            return self.model(input_ids, attention_mask)
        finally:
            self.model.state.clear()

    def forget(self, user: str) -> None:
        """Drop a user from the in-memory caches (after deleting or refreshing them on disk)."""
        for bank in (self.model.user_loras, self.model.user_embs):
            if hasattr(bank, "evict"):
                bank.evict(user)


def load_run(run_dir: str | Path, cache_mb: float = 1024, device: str | None = None) -> PersonalizedLM:
    """Load a trained run directory for personalized generation (no user is read until asked for)."""
    return PersonalizedLM(run_dir, cache_mb=cache_mb, device=device)


__all__ = ["MODEL_BASE", "MODEL_GROUP", "MODEL_USER", "PersonalizedLM", "UnknownUser", "load_run"]
