"""Several training processes: which rank this is, and the few collectives the training loops need.

    properlm train --all --processes 2 ...                        # on this machine (CPU: gloo; GPUs: one each)
    accelerate launch --multi_gpu --num_processes 8 -m properlm train --all ...

The process group comes from Hugging Face accelerate (``PartialState``), which
reads the launcher's environment (``accelerate launch``, ``torchrun``, ``--processes``):
gloo on CPUs, NCCL on GPUs. With one process every call here is a no-op, so
the single-process path is unchanged.

What is shared: stage 1's LoRA and stage 2's experts and routers (gradients
all-reduced, so every rank applies the same update), stage 3's shared
LoRA-aware router (likewise). What is not: a user's own parameters (LoRA,
embedding) are trained by the one rank that owns the user, and never
all-reduced; stage 2's embeddings (small) are copied from their owner to every
rank after each step so that all ranks hold the same bank. Logs, progress bars
and checkpoints come from rank 0.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist


@functools.cache
def state():
    """accelerate's process state (initialises the process group once), or None with one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    cpu = os.environ.get("PROPERLM_DIST_CPU") == "1" or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def world() -> int:
    s = state()
    return s.num_processes if s is not None else 1


def rank() -> int:
    s = state()
    return s.process_index if s is not None else 0


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device | None:
    """This rank's device when several processes run (None: the config decides)."""
    s = state()
    return s.device if s is not None else None


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place (one flat buffer: one collective)."""
    if world() == 1 or not tensors:
        return
    where = device() or tensors[0].device  # NCCL reduces on the rank's GPU, gloo on the CPU
    flat = torch.cat([t.reshape(-1).float().to(where) for t in tensors])
    dist.all_reduce(flat)
    i = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[i:i + n].view_as(t).to(t.device, t.dtype))
        i += n


def sum_int(x: int, device_: torch.device) -> int:
    if world() == 1:
        return x
    t = torch.tensor([x], dtype=torch.long, device=device_)
    dist.all_reduce(t)
    return int(t.item())


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def all_gather_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` (B_r, ...) along dim 0, differentiably (ranks may hold different B_r)."""
    if world() == 1:
        return x
    sizes = all_gather_objects(int(x.shape[0]))
    pad = max(sizes) - x.shape[0]
    xp = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(xp)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


