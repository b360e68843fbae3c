"""Per-user parameters with their own row-sparse AdamW state.

Every user-owned tensor (a user's LoRA factors in stage 3, a user's embedding
in stage 2) is one row of a stacked tensor ``(U, *shape)``. A training step
gathers only the rows of the users in the batch into fresh leaf tensors
(``gather``), the forward pass uses them, and ``adamw_step`` writes the update
back into those rows with per-user AdamW moments and per-user step counts.

Why not ``nn.Parameter`` + ``torch.optim.AdamW``: AdamW moves a parameter even
when its gradient is zero (momentum, weight decay), so a user absent from a step
would drift. Here an absent user's row, moments and step count are not touched
at all (bit for bit), and training users one at a time or many per batch gives
the same updates. The gradient and optimizer work per step is proportional to
the users present, not to all users.

A bank holds only the users being trained (a stage-3 cohort, stage 2's training
users); trained users live in the user store (``properlm.store``), which reads
and writes one user's rows with :meth:`UserParams.row_state` /
:meth:`UserParams.set_row_state`. Anything that plays the same part for a
forward pass (the inference cache) provides ``__contains__`` and
:meth:`UserParams.gather_users`.
"""

from __future__ import annotations

import math
import zlib
from typing import Protocol

import torch

from properlm.errors import UnknownUser

#: Optimizer part of a user's state: AdamW moments per tensor and the user's step count.
MOMENTS = ("exp_avg", "exp_avg_sq")


class UserBank(Protocol):
    """What :meth:`properlm.model.proper.ProperModel.bind` needs of a bank of per-user tensors."""

    shapes: dict[str, tuple[int, ...]]

    def __contains__(self, user_id: str) -> bool: ...

    def gather_users(self, users: list[str], requires_grad: bool = False) -> dict[str, torch.Tensor]:
        """``name -> (len(users), *shape)`` for the given (distinct, known) users, on the model's device."""
        ...


class UserParams:
    """A bank of per-user tensors sharing a user index.

    Args:
        user_ids: the users, in row order.
        shapes: ``name -> per-user shape``, e.g. ``{"layers.0.mlp.up_proj.lora_A": (4, 576)}``.
        init: ``name -> "kaiming" | "zeros" | "normal"``; "kaiming" is LoRA's A
            initialisation (PEFT's kaiming-uniform with a=sqrt(5)).
        normal_std: standard deviation of "normal" rows: small, so all users start with the
            same routing and users with similar data receive similar gradients.
        seed: each user's rows are initialised from ``seed`` and a hash of the
            user id, so a user's start is the same however many users share the bank.
        device: where the rows live (the model's device).
        start: ``name -> (per-user shape)``: a fixed start for "start" rows instead of a
            random one (stage 2's mean embedding, from which unseen users are fitted).
    """

    def __init__(self, user_ids: list[str], shapes: dict[str, tuple[int, ...]], init: dict[str, str], seed: int = 0,
                 normal_std: float = 0.02, device: torch.device | str = "cpu",
                 start: dict[str, torch.Tensor] | None = None):
        self.normal_std = normal_std
        self.user_ids = list(user_ids)
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.init, self.seed = dict(init), seed
        self.device = torch.device(device)
        self.start = {k: v.detach().to("cpu", torch.float32) for k, v in (start or {}).items()}
        n = len(self.user_ids)
        self.params = {k: torch.zeros(n, *s, device=self.device) for k, s in self.shapes.items()}
        self.exp_avg = {k: torch.zeros(n, *s, device=self.device) for k, s in self.shapes.items()}
        self.exp_avg_sq = {k: torch.zeros(n, *s, device=self.device) for k, s in self.shapes.items()}
        self.steps = torch.zeros(n, dtype=torch.long, device=self.device)
        for i, uid in enumerate(self.user_ids):
            self._init_row(i, uid)
        self._index = {u: i for i, u in enumerate(self.user_ids)}

    def _init_row(self, row: int, user_id: str) -> None:
        # Drawn on the CPU from a per-user generator: the same start on every device.
        g = torch.Generator().manual_seed((zlib.crc32(user_id.encode()) * 1000003 + self.seed) % (2**63))
        for k in sorted(self.shapes):  # sorted: init order must not depend on dict order
            s, how = self.shapes[k], self.init.get(k, "zeros")
            if how == "kaiming":
                fan_in = s[-1]
                bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) gives 1/sqrt(fan_in)
                value = torch.rand(s, generator=g, device="cpu") * 2 * bound - bound
            elif how == "normal":
                value = torch.randn(s, generator=g, device="cpu") * self.normal_std
            elif how == "start":
                value = self.start[k]
            else:
                value = torch.zeros(s, device="cpu")
            self.params[k][row] = value.to(self.device)

    def __len__(self) -> int:
        return len(self.user_ids)

    def __contains__(self, user_id: str) -> bool:
        return user_id in self._index

    def index(self, user_id: str) -> int:
        """Row of a user (``KeyError`` if unknown)."""
        return self._index[user_id]

    def rows(self, user_ids: list[str]) -> torch.Tensor:
        """Rows of the given users, in that order (``UnknownUser`` for one not in the bank)."""
        try:
            return torch.tensor([self._index[u] for u in user_ids], dtype=torch.long, device=self.device)
        except KeyError as e:
            raise UnknownUser(e.args[0], "not in this bank") from None

    def gather_users(self, user_ids: list[str], requires_grad: bool = False) -> dict[str, torch.Tensor]:
        """``gather`` by user ids (the :class:`UserBank` protocol)."""
        return self.gather(self.rows(user_ids), requires_grad)

    def add_users(self, user_ids: list[str]) -> None:
        """Append new users with fresh rows and empty optimizer state."""
        new = [u for u in user_ids if u not in self._index]
        if not new:
            return
        n0 = len(self.user_ids)
        for k, s in self.shapes.items():
            pad = torch.zeros(len(new), *s, device=self.device)
            self.params[k] = torch.cat([self.params[k], pad])
            self.exp_avg[k] = torch.cat([self.exp_avg[k], pad.clone()])
            self.exp_avg_sq[k] = torch.cat([self.exp_avg_sq[k], pad.clone()])
        self.steps = torch.cat([self.steps, torch.zeros(len(new), dtype=torch.long, device=self.device)])
        self.user_ids += new
        for i, u in enumerate(new):
            self._init_row(n0 + i, u)
        self._index = {u: i for i, u in enumerate(self.user_ids)}

    def remove_users(self, user_ids: list[str]) -> None:
        """Delete users' rows and optimizer state entirely."""
        keep = [i for i, u in enumerate(self.user_ids) if u not in set(user_ids)]
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        for d in (self.params, self.exp_avg, self.exp_avg_sq):
            for k in d:
                d[k] = d[k][idx].clone()
        self.steps = self.steps[idx].clone()
        self.user_ids = [self.user_ids[i] for i in keep]
        self._index = {u: i for i, u in enumerate(self.user_ids)}

    def gather(self, rows: torch.Tensor, requires_grad: bool) -> dict[str, torch.Tensor]:
        """Copies of the given rows as leaf tensors ``(P, *shape)`` for one step."""
        return {k: v[rows].clone().requires_grad_(requires_grad) for k, v in self.params.items()}

    @torch.no_grad()
    def clip_grad_norm(self, leaves: dict[str, torch.Tensor], max_norm: float) -> None:
        """Clip each user's gradient to ``max_norm`` on its own (a shared clip would couple users)."""
        sq = None
        for v in leaves.values():
            if v.grad is not None:
                s = v.grad.pow(2).flatten(1).sum(1)  # (P,)
                sq = s if sq is None else sq + s
        if sq is None:
            return
        factor = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for v in leaves.values():
            if v.grad is not None:
                v.grad.mul_(factor.view(-1, *[1] * (v.grad.dim() - 1)))

    @torch.no_grad()
    def adamw_step(self, rows: torch.Tensor, leaves: dict[str, torch.Tensor], lr: float,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        """Apply one AdamW update (torch's formula) to the given rows only.

        Rows whose leaves received no gradient in this step are still counted as
        stepped, exactly as a per-user ``torch.optim.AdamW`` with a zero gradient;
        callers pass only the rows of users with data in the step.
        """
        b1, b2 = betas
        self.steps[rows] += 1
        step = self.steps[rows].to(torch.float32)  # (P,)
        bc1 = 1 - b1 ** step
        bc2_sqrt = (1 - b2 ** step).sqrt()
        for k, leaf in leaves.items():
            if leaf.grad is None:
                continue
            view = (-1,) + (1,) * (leaf.dim() - 1)
            p = self.params[k][rows]
            m = self.exp_avg[k][rows]
            v = self.exp_avg_sq[k][rows]
            g = leaf.grad
            p.mul_(1 - lr * weight_decay)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bc2_sqrt.view(view)).add_(eps)
            p.addcdiv_(m, denom * (bc1.view(view) / lr), value=-1.0)
            self.params[k][rows] = p
            self.exp_avg[k][rows] = m
            self.exp_avg_sq[k][rows] = v

    # -- one user's state, for the user store ---------------------------------------
    def row_state(self, user_id: str, optimizer: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        """``{"params": {name: (*shape)}, "adamw": {name.exp_avg, name.exp_avg_sq, steps}}`` of one user, on the CPU.

        ``adamw`` is left out when ``optimizer`` is false.
        """
        i = self._index[user_id]
        out = {"params": {k: v[i].detach().to("cpu").contiguous() for k, v in self.params.items()}}
        if optimizer:
            adamw = {f"{k}.{m}": getattr(self, m)[k][i].to("cpu").contiguous() for k in self.params for m in MOMENTS}
            adamw["steps"] = self.steps[i].to("cpu").reshape(1).clone()
            out["adamw"] = adamw
        return out

    def set_row_state(self, user_id: str, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Inverse of :meth:`row_state`; without ``adamw`` the moments and step count start at zero."""
        i = self._index[user_id]
        for k in self.shapes:
            self.params[k][i] = state["params"][k].to(self.device, torch.float32)
        adamw = state.get("adamw")
        for k in self.shapes:
            for m in MOMENTS:
                getattr(self, m)[k][i] = adamw[f"{k}.{m}"].to(self.device) if adamw else 0.0
        self.steps[i] = int(adamw["steps"].reshape(-1)[0]) if adamw else 0

    # -- persistence ---------------------------------------------------------------
    def state_tensors(self, prefix: str, optimizer: bool) -> dict[str, torch.Tensor]:
        """Flat name -> tensor map for safetensors (optimizer moments optional)."""
        out = {f"{prefix}{k}": v.contiguous() for k, v in self.params.items()}
        if optimizer:
            out.update({f"{prefix}{k}.exp_avg": v.contiguous() for k, v in self.exp_avg.items()})
            out.update({f"{prefix}{k}.exp_avg_sq": v.contiguous() for k, v in self.exp_avg_sq.items()})
            out[f"{prefix}steps"] = self.steps.clone()
        return out

    def load_state_tensors(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_tensors` (moments are reset when absent)."""
        for k in self.shapes:
            self.params[k] = tensors[f"{prefix}{k}"].clone()
            self.exp_avg[k] = tensors.get(f"{prefix}{k}.exp_avg", torch.zeros_like(self.params[k])).clone()
            self.exp_avg_sq[k] = tensors.get(f"{prefix}{k}.exp_avg_sq", torch.zeros_like(self.params[k])).clone()
        dev = self.device
        for d in (self.params, self.exp_avg, self.exp_avg_sq):
            for k in d:
                d[k] = d[k].to(dev)
        self.steps = tensors.get(f"{prefix}steps", torch.zeros(len(self.user_ids), dtype=torch.long)).to(dev).clone()
