"""Mixed precision for the training loops: bf16 copies of frozen weights (a CPU speed trick).

Under bf16 autocast every matmul casts its float32 weight to bf16 on each call.
For weights that never train (the base model's linears in every stage) that
cast is repeated work: :func:`frozen_bf16` swaps in bf16 copies for the length
of a training loop and puts the float32 originals back afterwards. Under
autocast the results are bit-for-bit the same (autocast would have made the
same bf16 copy); outside autocast nothing changes because the swap is undone.
The LM head is tied to the input embedding in SmolLM2, so its weight cannot
change dtype in place (the embeddings would turn bf16 too): a frozen head is
swapped for a separate bf16 ``nn.Linear`` for the loop instead. Casting it was
~2% of a stage-3 step (28M weights on every call).

On a GPU the base is loaded in bf16 already (:func:`properlm.model.device.base_dtype`),
so there is nothing float32 to swap and this is a no-op. Autocast itself lives
in :mod:`properlm.model.device`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from properlm.model.device import device_of, use_bf16


@contextlib.contextmanager
def frozen_bf16(model: nn.Module, enabled: bool) -> Iterator[int]:
    """While inside, the frozen float32 ``nn.Linear`` weights of the decoder layers are bf16.

    Only the decoder's layers are touched (not the embeddings or a tied LM head).
    Yields the number of weights swapped (0 when ``enabled`` is false).
    """
    saved: list[tuple[nn.Linear, torch.Tensor]] = []
    head = None
    if use_bf16(enabled, device_of(model)):  # no bf16 copies where autocast will not use them
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        for m in decoder.layers.modules():
            w = getattr(m, "weight", None)
            if (isinstance(m, nn.Linear) and w is not None and not w.requires_grad and w.dtype == torch.float32
                    and not isinstance(w, DTensor)):  # a sharded weight (FSDP) is gathered per use: left as it is
                saved.append((m, w.data))
                m.weight.data = w.data.to(torch.bfloat16)
        head = _frozen_head(model)
        if head is not None:
            model.set_output_embeddings(_bf16_linear(head))
    try:
        yield len(saved) + (head is not None)
    finally:
        for m, w in saved:
            m.weight.data = w
        if head is not None:
            model.set_output_embeddings(head)


def _frozen_head(model: nn.Module) -> nn.Linear | None:
    """The model's LM head if it is a frozen float32 ``nn.Linear``, else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if (isinstance(head, nn.Linear) and hasattr(model, "set_output_embeddings") and not head.weight.requires_grad
            and head.weight.dtype == torch.float32 and (head.bias is None or not head.bias.requires_grad)):
        return head
    return None


def _bf16_linear(m: nn.Linear) -> nn.Linear:
    """A frozen bf16 copy of ``m`` (its own storage: ``m``'s weight may be tied elsewhere)."""
    out = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
    out.weight = nn.Parameter(m.weight.detach().to(torch.bfloat16), requires_grad=False)
    if m.bias is not None:
        out.bias = nn.Parameter(m.bias.detach().to(torch.bfloat16), requires_grad=False)
    return out
