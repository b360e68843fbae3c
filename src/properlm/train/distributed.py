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
import re
import sys

import torch
import torch.distributed as dist


#: Names of the parameters properlm and PEFT add to a decoder layer (never sharded).
ADDED = re.compile(r"(^|\.)(experts|router|lora_[A-Za-z_]+|user_[A-Za-z_]+)(\.|$)")


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




def sharding(requested: bool) -> bool:
    """Whether to shard the base: several processes and ``fsdp: true`` or an accelerate FSDP launch."""
    env = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    return world() > 1 and (requested or env)


def shard_layers(lm: torch.nn.Module) -> int:
    """Shard each decoder layer's frozen weights over the ranks (FSDP2); returns the layers sharded.

    Only the base's own weights are sharded: parameters that train
    (``requires_grad``) and the small ones properlm or PEFT add (experts, routers,
    LoRA factors; they are saved whole, trained or not) are not. Layers sharded
    before are left as they are, so a second training loop on the same model
    (stage 2's fit of unseen users) does not shard twice. The embeddings, final
    norm and LM head (tied in SmolLM2) stay whole.
    """
    if world() == 1:
        return 0
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    dev = device() or next(lm.parameters()).device
    mesh = init_device_mesh(dev.type, (world(),))
    # accelerate's FSDP config may ask to keep gathered layers until the backward pass (more memory, fewer gathers).
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "0", "shard_grad_op",
                                                                                  "no_shard")
    n = 0
    for layer in lm.get_decoder().layers:
        if isinstance(layer, FSDPModule):
            continue
        keep = {p for name, p in layer.named_parameters() if p.requires_grad or ADDED.search(name)}
        if all(p in keep for p in layer.parameters()):
            continue
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, ignored_params=keep)
        n += 1
    if n and is_main():
        from torch.distributed.tensor import DTensor

        shards = [p for p in lm.get_decoder().layers.parameters() if isinstance(p, DTensor)]
        held, full = sum(p.to_local().numel() for p in shards), sum(p.numel() for p in shards)
        print(f"properlm: fsdp: {n} decoder layers sharded over {world()} processes; this process holds "
              f"{held:,} of their {full:,} frozen weights", file=sys.stderr, flush=True)
    return n


def idle_loss(lm: torch.nn.Module, pad_id: int, device_: torch.device) -> torch.Tensor:
    """A forward pass of one pad token, as a zero loss whose backward pass changes no gradient.

    For a rank with no rows in a step while the base is sharded: the other ranks'
    forward and backward passes gather each layer's shards, and every rank must
    take part in each gather, in the same order. Call this where the rows' forward
    pass would run and ``.backward()`` the result where theirs would. The input
    embedding is made a leaf that requires grad, so the backward pass runs through
    every layer whatever trains; the loss is multiplied by zero. The autocast the
    caller set applies.
    """
    ids = torch.full((1, 1), pad_id, dtype=torch.long, device=device_)
    emb = lm.get_input_embeddings()(ids).detach().requires_grad_()
    # Its dropout draws are put back: the rank's own rows see the same random stream as without sharding.
    cuda = [device_.index if device_.index is not None else torch.cuda.current_device()] if device_.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        hidden = lm.get_decoder()(inputs_embeds=emb, attention_mask=torch.ones_like(ids),
                                  use_cache=False).last_hidden_state
    return hidden.float().sum() * 0.0
