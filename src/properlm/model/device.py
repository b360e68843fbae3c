"""Where the model runs and in which precision: device resolution, dtypes, autocast.

Every tensor properlm creates in a hot path is created on the model's device
(``device_of(module)``), and autocast is entered for that device's type, never
for "cuda because CUDA exists": a model kept on the CPU of a GPU machine still
runs CPU autocast.

    device = resolve_device("auto")              # cuda when available, else cpu
    dtype = base_dtype("auto", bf16=True, device=device)  # bfloat16 weights on GPU, float32 on CPU
    with autocast(True, device):
        ...

``bf16: true`` asks for bfloat16 where the hardware computes it: a GPU with bf16
(Ampere or newer), a CPU whose oneDNN has bf16 kernels (AVX-512 or AMX on x86,
BF16 on Arm). Elsewhere bf16 is emulated, about 45x slower than float32 on an
AVX2-only CPU (docs/training.md), so properlm computes in float32 there and says
so once. ``PROPERLM_CPU_BF16=1`` forces bf16 on any CPU, ``=0`` turns it off.
"""

from __future__ import annotations

import functools
import os
import sys

import torch
import torch.nn as nn

from properlm.errors import ProperError

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")


def resolve_device(spec: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:1"`` as given.

    Raises:
        ValueError: CUDA asked for on a machine without it, or an unknown device.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} asked for, but CUDA is not available on this machine (use device=auto or cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {spec!r}: use auto, cpu, cuda or cuda:N")
    return dev


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether ``device_type``'s hardware runs bf16 matmuls natively (CPU: ``PROPERLM_CPU_BF16`` decides
    when set to 1 or 0, else oneDNN's own check)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        forced = os.environ.get("PROPERLM_CPU_BF16", "").strip()
        if forced in ("0", "1"):
            return forced == "1"
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


@functools.cache
def _say_float32(device_type: str) -> None:
    print(f"properlm: bf16 is on, but this {device_type.upper()} has no native bfloat16 "
          f"({'oneDNN reports none, e.g. AVX2 only' if device_type == 'cpu' else 'before Ampere'}): "
          "computing in float32, which is much faster here"
          + (" (PROPERLM_CPU_BF16=1 forces bf16)" if device_type == "cpu" else ""), file=sys.stderr, flush=True)


def use_bf16(requested: bool, device: torch.device | str = "cpu") -> bool:
    """``requested`` (the config's ``bf16``) where ``device`` computes bf16 natively, else False (said once)."""
    if not requested:
        return False
    kind = torch.device(device).type
    if native_bf16(kind):
        return True
    _say_float32(kind)
    return False


def base_dtype(spec: str, bf16: bool, device: torch.device) -> torch.dtype:
    """The dtype the frozen base weights are loaded in.

    ``"bfloat16"`` loads them in bf16 on any device, as a GPU run does; it needs
    bf16 autocast there (``bf16`` on, and on a CPU without native bf16
    ``PROPERLM_CPU_BF16=1``), since properlm's own layers keep float32 weights
    and rely on autocast to meet the base's bf16 activations. Without it this
    raises :class:`~properlm.errors.ProperError`.

    ``"auto"``: bfloat16 on a GPU when ``bf16`` is on (a 7B base then needs
    14 GB, not 28), float32 otherwise. On the CPU the weights stay float32 and
    the training loops hold bf16 copies of the frozen linears instead
    (:func:`properlm.model.precision.frozen_bf16`), so that merged stage-1
    weights and evaluation keep full precision there.
    """
    if spec == "float32":
        return torch.float32
    if spec == "bfloat16":
        if not use_bf16(bf16, device):  # float32 adapters and routers would meet bf16 activations
            raise ProperError(
                f"base_dtype=bfloat16 needs bf16 autocast on the {device.type.upper()}: set bf16=true"
                + (" and, on a CPU without native bf16, PROPERLM_CPU_BF16=1" if device.type == "cpu" else
                   " (this GPU has no native bf16: use base_dtype=float32)" if bf16 else ""))
        return torch.bfloat16
    if spec != "auto":
        raise ValueError(f"unknown base dtype {spec!r}: use auto, float32 or bfloat16")
    return torch.bfloat16 if device.type == "cuda" and use_bf16(bf16, device) else torch.float32


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without any)."""
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def autocast(enabled: bool, device: torch.device | str = "cpu"):
    """bf16 autocast for ``device``'s type when ``enabled`` and the device computes bf16 natively
    (:func:`use_bf16`), else a no-op context."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                          enabled=use_bf16(enabled, device))
