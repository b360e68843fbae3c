"""Mixed precision for the training loops: bf16 autocast and bf16 copies of frozen weights.

Under bf16 autocast every matmul casts its float32 weight to bf16 on each call.
For weights that never train (the base model's linears in every stage) that
cast is repeated work: :func:`frozen_bf16` swaps in bf16 copies for the length
of a training loop and puts the float32 originals back afterwards. Under
autocast the results are bit-for-bit the same (autocast would have made the
same bf16 copy); outside autocast nothing changes because the swap is undone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn


def autocast(enabled: bool):
    """bf16 autocast on the CPU (or GPU) when asked, else a no-op context."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=enabled)


@contextlib.contextmanager
def frozen_bf16(model: nn.Module, enabled: bool) -> Iterator[int]:
    """While inside, the frozen float32 ``nn.Linear`` weights of the decoder layers are bf16.

    Only the decoder's layers are touched (not the embeddings or a tied LM head).
    Yields the number of weights swapped (0 when ``enabled`` is false).
    """
    saved: list[tuple[nn.Linear, torch.Tensor]] = []
    if enabled:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        for m in decoder.layers.modules():
            w = getattr(m, "weight", None)
            if isinstance(m, nn.Linear) and w is not None and not w.requires_grad and w.dtype == torch.float32:
                saved.append((m, w.data))
                m.weight.data = w.data.to(torch.bfloat16)
    try:
        yield len(saved)
    finally:
        for m, w in saved:
            m.weight.data = w
