"""The run configuration: one dataclass per stage, loaded from YAML with overrides.

``properlm train --config configs/paper.yaml group.num_experts=8`` builds a
:class:`RunConfig` from the YAML file and the dotted overrides; the run
directory keeps the resolved config so a run can be reproduced or resumed.
Training, loading a run for inference and serving all read it, so it sits
below every layer that does.
"""

from __future__ import annotations

from dataclasses import dataclass, field


#: How users not in stage 2 get their stage-2 embedding (``group.unseen``).
UNSEEN = ("fit", "instant", "mean")
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class DataConfig:
    """Which data and which users.

    Attributes:
        path: a dataset properlm can load (LaMP files, OPPU dir, MovieLens dir, JSONL),
            or ``synth:<task>`` for a synthetic grouped task generated on the fly.
        task: task name when the files don't say it.
        split: "oppu" (the n most active users are targets), "low-resource" (the n
            least active) or "count" (n random users).
        n_targets: n of the split.
        max_len: tokens per example (prompt truncated to fit).
        max_history: keep only each user's latest N history items (None: all);
            bounds training cost on long histories such as MovieLens's.
        max_train_users: train stages 1-2 on at most this many of the non-target
            users, a seeded random sample (None: all).
        synth_users: number of users of a ``synth:`` dataset.
        synth_groups: planted groups of a ``synth:`` dataset.
        synth_queries: held-out queries per user of a ``synth:`` dataset (more: a larger
            evaluation set; the training users' queries are stage 1-2 training data).
    """

    path: str = "synth:synth-cls"
    task: str | None = None
    split: str = "oppu"
    n_targets: int = 100
    max_len: int = 128
    max_history: int | None = None
    max_train_users: int | None = None
    synth_users: int = 60
    synth_groups: int = 5
    synth_queries: int = 3

    def __post_init__(self):
        _check(self.split in ("oppu", "low-resource", "count"), f"data.split must be oppu, low-resource or count, got {self.split!r}")
        _check(self.n_targets >= 1, "data.n_targets must be >= 1")
        _check(self.max_len >= 16, "data.max_len must be >= 16")
        _check(self.max_history is None or self.max_history >= 1, "data.max_history must be >= 1 or null")
        _check(self.max_train_users is None or self.max_train_users >= 1, "data.max_train_users must be >= 1 or null")


@dataclass
class PopulationConfig:
    """Stage 1: one LoRA on all users' data (PEFT), merged into the base.

    Attributes:
        r, alpha, dropout: LoRA shape (paper: 8, 16).
        targets: linears to adapt (paper: q,k,v,o,gate,up,down).
        lr: AdamW learning rate (paper 3e-4).
        batch_size: examples per step (paper 2).
        epochs: passes over the data.
        max_steps: stop after this many steps (None: all epochs).
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    lr: float = 3e-4
    batch_size: int = 2
    epochs: int = 1
    max_steps: int | None = None

    def __post_init__(self):
        _check(self.r >= 1 and self.batch_size >= 1 and self.epochs >= 1, "population: r, batch_size, epochs must be >= 1")


@dataclass
class GroupConfig:
    """Stage 2: K LoRA experts on the FFN with a (user-aware) router and the constraint loss.

    Attributes:
        num_experts: K (paper 5).
        r, alpha, dropout: expert LoRA shape (paper 4, 8, 0.05).
        router: "user-aware" (paper) or "text" (the regular-router ablation).
        user_dim: width of the learned user embeddings.
        user_embedding: "per-site" (one embedding per user and adapted linear) or
            "shared" (one per user, read by every router through its own ``W_u``,
            so all sites see the same user position and their LM-loss gradients
            add up on it).
        text_router_init: "kaiming" (nn.Linear's default) or "zeros": the routers'
            text part starts at zero, so routing starts uniform and user-independent
            text features do not decide the first expert assignments.
        constraint_weight: weight of the cross-user routing cosine loss (0 = ablation w/o it).
        constraint_warmup: share of stage 2's steps over which that weight ramps up
            linearly from 0, so the experts can specialise on the language-model
            loss before the constraint spreads users apart (0: full weight at once).
        lr: AdamW learning rate (paper 2e-4).
        user_lr: learning rate of the user embeddings (None: ``lr``); each
            embedding sees only its user's steps, so it may want a larger one.
        users_per_step: distinct users per batch (>= 2 so the constraint loss has pairs).
        per_user_batch: examples of each user per step.
        epochs, max_steps: how long.
        unseen: how users not in stage 2 (the targets, users added later) are routed:
            "fit" (each one's embedding is fitted on their own history with everything
            else frozen, starting from the mean embedding: they join the group their
            data points to), "instant" (each one's embedding is predicted from their
            history in one forward pass by an encoder fitted after stage 2 on the training
            users, no gradient step: properlm.train.instant) or "mean" (the mean learned
            embedding for all of them). Used by the stage-2 model of every table and
            carried into stage 3's router.
        unseen_epochs: passes over a user's history when fitting their embedding.
        unseen_lr: learning rate of that fit (None: ``user_lr``, else ``lr``).
    """

    num_experts: int = 5
    r: int = 4
    alpha: float = 8
    dropout: float = 0.05
    router: str = "user-aware"
    user_dim: int = 32
    user_embedding: str = "per-site"
    text_router_init: str = "kaiming"
    constraint_weight: float = 0.1
    constraint_warmup: float = 0.0
    lr: float = 2e-4
    user_lr: float | None = None
    users_per_step: int = 4
    per_user_batch: int = 1
    epochs: int = 1
    max_steps: int | None = None
    unseen: str = "fit"
    unseen_epochs: int = 2
    unseen_lr: float | None = None

    def __post_init__(self):
        _check(self.num_experts >= 1, "group.num_experts must be >= 1")
        _check(self.unseen in UNSEEN, f"group.unseen must be fit, instant or mean, got {self.unseen!r}")
        _check(self.unseen_epochs >= 1, "group.unseen_epochs must be >= 1")
        _check(self.router in ("user-aware", "text"), f"group.router must be user-aware or text, got {self.router!r}")
        _check(self.constraint_weight >= 0, "group.constraint_weight must be >= 0")
        _check(self.user_embedding in ("per-site", "shared"),
               f"group.user_embedding must be per-site or shared, got {self.user_embedding!r}")
        _check(self.text_router_init in ("kaiming", "zeros"),
               f"group.text_router_init must be kaiming or zeros, got {self.text_router_init!r}")
        _check(0 <= self.constraint_warmup <= 1, "group.constraint_warmup must be in [0, 1]")


@dataclass
class UserConfig:
    """Stage 3: one LoRA per target user and the shared LoRA-aware router.

    Attributes:
        r, alpha, dropout: user LoRA shape (paper 4, 8, 0.05).
        lora_aware_router: train the shared LoRA-aware router (False: the ablation
            that keeps stage 2's routing with its fallback for unseen users).
        lr: AdamW learning rate of the user LoRAs.
        router_lr: learning rate of the shared router.
        users_per_step: users trained together in one batch.
        per_user_batch: examples of each user per step (paper/OPPU: 1).
        epochs: passes over each user's history.
        max_steps: stop each cohort after this many steps (None: all epochs).
        cohort_size: users trained together as one working set. Their LoRAs and AdamW
            moments are in memory while they train and are written to the user store
            when their cohort ends; peak memory grows with this, not with the number
            of users. The shared router trains on through the cohorts in turn.
        keep_optimizer: keep each user's AdamW moments in the store after training, so
            that ``users add`` can refresh a user where their training stopped
            (False: only the LoRA is kept, a third of the bytes).
        weight_decay: AdamW weight decay of the user LoRAs.
        end_to_end: the paper's end-to-end ablation: no separate stage 2; the group
            experts, the user-aware router (with an embedding per target user) and
            the user LoRAs train jointly on the target users' data, with the
            constraint loss (settings of the experts from ``group``).
    """

    r: int = 4
    alpha: float = 8
    dropout: float = 0.05
    lora_aware_router: bool = True
    lr: float = 2e-4
    router_lr: float = 2e-4
    users_per_step: int = 8
    per_user_batch: int = 1
    epochs: int = 1
    max_steps: int | None = None
    cohort_size: int = 256
    keep_optimizer: bool = True
    weight_decay: float = 0.0
    end_to_end: bool = False

    def __post_init__(self):
        _check(self.r >= 1 and self.users_per_step >= 1 and self.per_user_batch >= 1, "user: r, users_per_step, per_user_batch must be >= 1")
        _check(self.cohort_size >= 1, "user.cohort_size must be >= 1")


@dataclass
class RunConfig:
    """A whole PROPER run.

    Attributes:
        base_model: "smollm2" (embedded), "tiny-random", a HF model dir or a .gguf file.
        seed: seeds model init, data order and dropout.
        checkpoint_every: steps between checkpoints (each stage also saves at its end).
        max_grad_norm: gradient clipping (per user for user-owned parameters).
        bf16: bfloat16 autocast for the forward pass, on the model's device; on the CPU
            the frozen base linears are held in bf16 while a stage trains (same numbers,
            fewer casts).
        device: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
        base_dtype: dtype of the frozen base weights: "auto" (bfloat16 on a GPU when
            ``bf16`` is on, float32 otherwise), "float32" or "bfloat16".
        attention: "auto" (eager on the CPU, sdpa on a GPU), "sdpa" or "eager"; eager
            is faster on CPU for short sequences (the demo's), sdpa for long ones and on GPU.
        progress: show progress bars.
        fsdp: with several processes, shard the frozen base's decoder layers over them
            (PyTorch FSDP2), so that each holds 1/N of them between uses; the trained
            parameters stay whole on every process. Also on when launched with an
            accelerate FSDP config (``ACCELERATE_USE_FSDP``). See docs/training.md.
    """

    base_model: str = "smollm2"
    seed: int = 0
    checkpoint_every: int = 50
    max_grad_norm: float = 1.0
    bf16: bool = False
    device: str = "auto"
    base_dtype: str = "auto"
    attention: str = "auto"
    progress: bool = True
    fsdp: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    population: PopulationConfig = field(default_factory=PopulationConfig)
    group: GroupConfig = field(default_factory=GroupConfig)
    user: UserConfig = field(default_factory=UserConfig)

    def __post_init__(self):
        _check(self.checkpoint_every >= 1, "checkpoint_every must be >= 1")
        _check(self.attention in ("auto", "sdpa", "eager"), f"attention must be auto, sdpa or eager, got {self.attention!r}")
        _check(self.base_dtype in ("auto", "float32", "bfloat16"),
               f"base_dtype must be auto, float32 or bfloat16, got {self.base_dtype!r}")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


