"""The Python API for using a trained run: personalized generation for many users.

    >>> from properlm import load_run
    >>> lm = load_run("runs/demo")
    >>> lm.generate(["query for alice", "query for bob"], users=["alice", "bob"])

One call answers queries of different users in one batch: each row uses its
user's LoRA (stage 3 target users), or its user's stage-2 embedding (training
users), or neither (unknown users get the population + group model with the
fallback routing).
"""

from __future__ import annotations

from pathlib import Path

import torch

from properlm.config import load_config
from properlm.errors import ProperError
from properlm.model.generate import generate
from properlm.train.config import RunConfig


class PersonalizedLM:
    """A trained run loaded for inference.

    Attributes:
        run_dir: the run directory.
        cfg: its saved config.
        model: the :class:`~properlm.model.proper.ProperModel` with every trained stage.
        tok: the tokenizer.
    """

    def __init__(self, run_dir: str | Path):
        from properlm.train.run import STAGES, build_model

        self.run_dir = Path(run_dir)
        if not (self.run_dir / "config.yaml").exists():
            raise ProperError(f"{self.run_dir}: not a properlm run directory (no config.yaml)")
        self.cfg = load_config(RunConfig, self.run_dir / "config.yaml")
        done = [s for s in STAGES if (self.run_dir / s).exists()]
        if not done:
            raise ProperError(f"{self.run_dir}: no trained stage yet (run `properlm train`)")
        upto = {"population": "group", "group": "user", "user": "done"}[done[-1]]
        self.model, self.tok = build_model(self.cfg, self.run_dir, upto)
        self.model.eval()

    @property
    def users(self) -> list[str]:
        """Users with a personal LoRA (stage 3)."""
        return list(self.model.user_loras.user_ids) if self.model.user_loras is not None else []

    def _rows(self, users: list[str | None]) -> tuple[list[str | None], list[str | None]]:
        lora = self.model.user_loras
        emb = self.model.user_embs
        lora_rows = [u if lora is not None and u in lora._index else None for u in users]
        # A user with a stage-2 embedding uses it (training users; target users too
        # in the end-to-end ablation, whose router keeps the user embeddings).
        emb_rows = [u if emb is not None and u in emb._index else None for u in users]
        return lora_rows, emb_rows

    def generate(self, queries: list[str], users: list[str | None], max_new_tokens: int = 32, **kw) -> list[str]:
        """Answer ``queries[i]`` as personalized for ``users[i]``, all in one batch."""
        if len(queries) != len(users):
            raise ValueError("queries and users must have the same length")
        lora_rows, emb_rows = self._rows(users)
        return generate(self.model, self.tok, queries, lora_users=lora_rows, emb_users=emb_rows,
                        max_new_tokens=max_new_tokens, bf16=self.cfg.bf16, **kw)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, users: list[str | None]) -> torch.Tensor:
        """Full logits (B, T, V) with each row personalized for its user."""
        lora_rows, emb_rows = self._rows(users)
        self.model.bind(emb_users=emb_rows, lora_users=lora_rows)
        try:
            return self.model(input_ids, attention_mask)
        finally:
            self.model.state.clear()


def load_run(run_dir: str | Path) -> PersonalizedLM:
    """Load a trained run directory for personalized generation."""
    return PersonalizedLM(run_dir)
