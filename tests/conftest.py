"""Shared fixtures for the model and training tests: a tiny random Llama, small configs, toy data.

Everything runs on the CPU with ``load_base("tiny-random")`` (2 layers, hidden 64,
SmolLM2's tokenizer). The base is loaded once per session; tests get deep
copies, because :class:`~properlm.model.proper.ProperModel` wraps a model's
linears in place.

Torch runs on one thread: the model is far too small to gain from more, and on
a shared 2-core machine two busy threads per process slowed steps ~100x.
"""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import pytest
import torch

from properlm.model.proper import ProperModel, completion_nll
from properlm.run_config import DataConfig, GroupConfig, PopulationConfig, RunConfig, UserConfig
from properlm.train.examples import Example, collate, encode

torch.set_num_threads(1)
# bf16 autocast on every CPU, as on the machines these tests were written on: the same numbers
# whether or not this CPU has native bf16 (properlm.model.device.native_bf16; its own test
# covers the automatic choice). Subprocesses (CLI, server) inherit it.
os.environ["PROPERLM_CPU_BF16"] = "1"

TOPICS = ("jazz", "soccer", "coffee", "taxes", "robots", "hiking", "poetry", "sushi")


def prompt(i: int) -> str:
    """The i-th toy prompt (a LaMP-style classification query about one topic)."""
    return (f"Does the user love, like, dislike or hate this post? post: "
            f"Yesterday the group chat was all about {TOPICS[i % len(TOPICS)]}.")


def make_examples(answers: dict[str, str], n: int = 4, offset: int = 0) -> list[Example]:
    """``n`` examples per user over the same prompts; user ``u`` always answers ``answers[u]``."""
    return [Example(u, prompt(offset + i), a) for u, a in answers.items() for i in range(n)]


@pytest.fixture(scope="session")
def tiny_base():
    """(lm, tok) of the tiny random Llama, loaded once. Never modify ``lm``: use ``fresh_lm``."""
    from properlm.model.base import load_base

    lm, tok = load_base("tiny-random")
    return lm, tok


@pytest.fixture(scope="session")
def tok(tiny_base):
    return tiny_base[1]


@pytest.fixture
def fresh_lm(tiny_base):
    """A factory of independent copies of the tiny base model (eval mode).

    ``head_scale`` multiplies the (frozen) final RMSNorm weight. The tiny model's
    logits have a std of about 0.16 (hidden states have norm 8 after the norm,
    embeddings norm 0.16), so no adapter can bring its loss much below ~9.5 nats;
    tests that need the loss to really fall use ``head_scale=10``.
    """

    def make(head_scale: float = 1.0):
        lm = copy.deepcopy(tiny_base[0])
        if head_scale != 1.0:
            with torch.no_grad():
                lm.get_decoder().norm.weight.mul_(head_scale)
        lm.eval()
        return lm

    return make


def small_cfg(**sections) -> RunConfig:
    """A RunConfig for the tiny model; ``sections`` override fields, e.g. ``group=dict(lr=1e-2)``.

    Defaults: no progress bars, dropout 0, synthetic data with few users,
    short sequences, high learning rates and few steps.
    """
    top = {k: v for k, v in sections.items() if k not in ("data", "population", "group", "user")}
    data = dict(path="synth:synth-cls", synth_users=6, synth_groups=2, n_targets=2, split="count", max_len=64)
    pop = dict(lr=1e-2, batch_size=2, dropout=0.0, max_steps=4)
    grp = dict(lr=1e-2, num_experts=3, user_dim=8, dropout=0.0, users_per_step=3, max_steps=4)
    usr = dict(lr=1e-2, router_lr=1e-2, dropout=0.0, users_per_step=2, max_steps=4)
    data.update(sections.get("data", {}))
    pop.update(sections.get("population", {}))
    grp.update(sections.get("group", {}))
    usr.update(sections.get("user", {}))
    base = dict(base_model="tiny-random", seed=0, progress=False, checkpoint_every=1000)
    base.update(top)
    return RunConfig(**base, data=DataConfig(**data), population=PopulationConfig(**pop),
                     group=GroupConfig(**grp), user=UserConfig(**usr))




def batch(tok, examples: list[Example], max_len: int = 64) -> dict[str, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels) of ``examples``."""
    return collate([encode(tok, e, max_len) for e in examples], tok.pad_token_id)


@torch.no_grad()
def mean_nll(model, tok, examples: list[Example], emb: bool = False, lora: bool = False) -> float:
    """Mean completion-token NLL of ``examples``; a ProperModel gets the rows' users bound
    as stage-2 embedding users (``emb``) and/or stage-3 LoRA users (``lora``)."""
    b = batch(tok, examples)
    if isinstance(model, ProperModel):
        users = [e.user_id for e in examples]
        model.bind(emb_users=users if emb else None, lora_users=users if lora else None)
        lm = model.lm
    else:
        lm = model
    nll, n = completion_nll(lm, b["input_ids"], b["attention_mask"], b["labels"])
    if isinstance(model, ProperModel):
        model.state.clear()
    return (nll.sum() / n.sum()).item()


def randomize_(params, std: float, seed: int) -> None:
    """Fill parameters with N(0, std^2) draws (e.g. zero-initialised LoRA B) so they matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture
def group_model(fresh_lm):
    """A factory of ProperModels with stage-2 experts whose B factors are random (non-trivial routing/experts)."""

    def make(train_users=("ua", "ub", "uc"), router="user-aware", num_experts=3, r=4, user_dim=8, seed=0,
             head_scale=1.0):
        pm = ProperModel(fresh_lm(head_scale))
        pm.add_group(num_experts, r, 2 * r, 0.0, router, user_dim, list(train_users), seed=seed)
        randomize_([s.experts.lora_B for s in pm.sites.values()], 0.05, seed + 1)
        randomize_([s.router.w_text.weight for s in pm.sites.values()], 0.5, seed + 2)
        if router == "user-aware":
            randomize_([s.router.w_user.weight for s in pm.sites.values()], 0.5, seed + 3)
            g = torch.Generator().manual_seed(seed + 4)
            for k, v in pm.user_embs.params.items():
                v.copy_(torch.randn(v.shape, generator=g))
            pm.set_fallback_embedding()
        for p in pm.parameters():
            p.requires_grad_(False)
        pm.eval()
        return pm

    return make


def add_random_users(pm: ProperModel, users, r: int = 4, lora_aware_router: bool = True, seed: int = 0) -> None:
    """Stage-3 LoRAs for ``users`` with random B (and a random LoRA part of the shared router)."""
    pm.add_users(list(users), r, 2 * r, lora_aware_router, seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    for k, v in pm.user_loras.params.items():
        if k.endswith("lora_B"):
            v.copy_(torch.randn(v.shape, generator=g) * 0.05)
    if lora_aware_router:
        randomize_([s.router.w_user.weight for s in pm.sites.values()], 0.5, seed + 11)
    for p in pm.parameters():
        p.requires_grad_(False)
    pm.eval()


def bank_files(run_dir, bank: str) -> dict[str, bytes]:
    """Every file of the user bank ``RUN/store/<bank>`` (relative path -> bytes), to compare byte for byte."""
    from pathlib import Path

    root = Path(run_dir) / "store" / bank
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def bank_user(run_dir, bank: str, user: str, parts=("params", "adamw")) -> dict[str, torch.Tensor]:
    """One user's tensors in a bank, flattened to ``part.name -> tensor``."""
    from properlm.store.run import open_bank

    got = open_bank(run_dir, bank).get(user, parts)
    return {f"{p}.{k}": v for p, d in got.items() for k, v in d.items()}


@pytest.fixture(scope="session")
def h():
    """The helpers above, as a fixture (tests do not import conftest)."""
    return SimpleNamespace(prompt=prompt, make_examples=make_examples, small_cfg=small_cfg, randomize_=randomize_,
                           add_random_users=add_random_users, batch=batch, mean_nll=mean_nll, bank_files=bank_files,
                           bank_user=bank_user)
