"""The stage-1 population adapter applied to a base model: PEFT's LoRA, merged.

Stage 1 saves a plain PEFT LoRA (``RUN/population/``); every later stage and
every loaded run starts from the base with that adapter merged in,
``W1 = W0 + (alpha/r) B A``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from peft import PeftModel

# PEFT calls a transformers method that warns about its own rename; not ours to act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def merge_population(lm, adapter_dir: str | Path):
    """Apply the saved population adapter to ``lm`` and merge it into the weights (W1)."""
    return PeftModel.from_pretrained(lm, str(adapter_dir)).merge_and_unload()
