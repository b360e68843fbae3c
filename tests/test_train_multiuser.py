"""Many users per batch: absent users are untouched, and batching users changes nothing."""

from __future__ import annotations

import pytest
import torch

from properlm.model.proper import ProperModel
from properlm.model.user_params import UserParams
from properlm.train.group import train_group
from properlm.train.loop import user_schedule
from properlm.train.user import train_users


def user_rows(bank: UserParams, user: str) -> dict[str, torch.Tensor]:
    """Everything the bank holds for one user: parameters, AdamW moments, step count."""
    i = bank.index(user)
    out = {f"param.{k}": v[i].clone() for k, v in bank.params.items()}
    out.update({f"exp_avg.{k}": v[i].clone() for k, v in bank.exp_avg.items()})
    out.update({f"exp_avg_sq.{k}": v[i].clone() for k, v in bank.exp_avg_sq.items()})
    out["steps"] = bank.steps[i].clone()
    return out


def assert_rows_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{what}: {diff[:4]}"


@pytest.fixture
def absent_spy(monkeypatch):
    """Wrap ``UserParams.adamw_step``: at every call, rows not being stepped must be bit-for-bit unchanged.

    Returns the list of per-call (stepped rows, bank size) for the test to inspect.
    """
    calls = []
    orig = UserParams.adamw_step

    def spy(self, rows, leaves, *args, **kwargs):
        others = [i for i in range(len(self)) if i not in set(rows.tolist())]
        snap = lambda: ([self.params[k][others].clone() for k in sorted(self.params)]  # noqa: E731
                        + [self.exp_avg[k][others].clone() for k in sorted(self.params)]
                        + [self.exp_avg_sq[k][others].clone() for k in sorted(self.params)]
                        + [self.steps[others].clone()])
        before = snap()
        orig(self, rows, leaves, *args, **kwargs)
        after = snap()
        assert all(torch.equal(x, y) for x, y in zip(before, after)), f"rows {others} moved in a step of rows {rows}"
        calls.append((rows.tolist(), len(self)))

    monkeypatch.setattr(UserParams, "adamw_step", spy)
    return calls


# Users with different history lengths: with one example per user per step and
# three users per step, "tc" (2 examples) is in steps 1-2 only, "tb" in 1-4, "ta" in 1-6.
HISTORY = {"ta": ("love", 6), "tb": ("hate", 4), "tc": ("like", 2)}


def _examples(h):
    return [e for u, (a, n) in HISTORY.items() for e in h.make_examples({u: a}, n=n)]


def test_schedule_leaves_users_out(h):
    by_user = {}
    for i, e in enumerate(_examples(h)):
        by_user.setdefault(e.user_id, []).append(i)
    steps = user_schedule(by_user, per_user_batch=1, users_per_step=3, epochs=1, seed=0)
    assert [sorted(u for u, _ in s) for s in steps] == [["ta", "tb", "tc"]] * 2 + [["ta", "tb"]] * 2 + [["ta"]] * 2


def test_absent_user_lora_untouched(group_model, tok, h, tmp_path, absent_spy):
    """Stage 3: a user's LoRA and its AdamW state do not move in steps without the user.

    The same run stopped after step 2 (the last step with "tc") and run to the
    end (4 more steps that train the others and the shared router) leave "tc"
    bit-for-bit the same; and every optimizer call leaves absent rows alone.
    """
    ex = _examples(h)
    cfg = lambda n: h.small_cfg(user=dict(max_steps=n, users_per_step=3, per_user_batch=1, weight_decay=0.1))  # noqa: E731
    short, full = group_model(), group_model()
    train_users(cfg(2), tmp_path / "short", short, tok, ex)
    train_users(cfg(None), tmp_path / "full", full, tok, ex)
    assert_rows_equal(user_rows(full.user_loras, "tc"), user_rows(short.user_loras, "tc"), "absent user tc")
    assert int(full.user_loras.steps[full.user_loras.index("tc")]) == 2
    for u in ("ta", "tb"):  # the others did train on
        assert not torch.equal(user_rows(full.user_loras, u)["param.layers.0.mlp.up_proj.lora_B"],
                               user_rows(short.user_loras, u)["param.layers.0.mlp.up_proj.lora_B"])
    assert [s for s, _ in absent_spy[-4:]] == [[0, 1], [0, 1], [0], [0]]  # rows of ta, tb stepped alone at the end


def test_absent_user_untouched_by_a_later_run(group_model, tok, h, tmp_path, absent_spy):
    """Users trained earlier stay exactly as they were, on disk, when new users train (with a frozen router)."""
    pm = group_model()
    cfg = h.small_cfg(user=dict(max_steps=None, users_per_step=3, weight_decay=0.1))
    train_users(cfg, tmp_path, pm, tok, _examples(h))
    before = h.bank_files(tmp_path, "lora")
    earlier = {u: h.bank_user(tmp_path, "lora", u) for u in HISTORY}
    routers = {n: p.clone() for n, p in pm.named_parameters() if ".router." in n}
    train_users(cfg, tmp_path, pm, tok, h.make_examples({"td": "dislike", "te": "love"}, n=3), train_router=False)
    after = h.bank_files(tmp_path, "lora")
    for f, data in before.items():  # every file of an earlier user, byte for byte (the leaves' indexes aside)
        if not f.endswith("index.json"):
            assert after.get(f) == data, f
    for u in HISTORY:
        assert_rows_equal(h.bank_user(tmp_path, "lora", u), earlier[u], f"earlier user {u}")
    assert all(torch.equal(p, routers[n]) for n, p in pm.named_parameters() if ".router." in n)
    assert int(h.bank_user(tmp_path, "lora", "td")["adamw.steps"]) == 3


def test_absent_user_embedding_untouched(fresh_lm, tok, h, tmp_path, absent_spy):
    """Stage 2: a training user's embedding and its AdamW state do not move in steps without the user."""
    ex = _examples(h)
    cfg = lambda n: h.small_cfg(group=dict(max_steps=n, users_per_step=3, per_user_batch=1,  # noqa: E731
                                           constraint_weight=1.0, dropout=0.05))
    short, full = ProperModel(fresh_lm()), ProperModel(fresh_lm())
    train_group(cfg(2), tmp_path / "short", short, tok, ex)
    train_group(cfg(None), tmp_path / "full", full, tok, ex)
    assert_rows_equal(user_rows(full.user_embs, "tc"), user_rows(short.user_embs, "tc"), "absent user tc")
    assert int(full.user_embs.steps[full.user_embs.index("tc")]) == 2
    assert not torch.equal(full.user_embs.params["layers.0.mlp.up_proj.user_emb"][0],
                           short.user_embs.params["layers.0.mlp.up_proj.user_emb"][0])
    assert absent_spy and all(n == 3 for _, n in absent_spy)


# -- 5. users together or one at a time give the same adapters ----------------------------------------

@pytest.mark.parametrize("lora_aware_router", [True, False], ids=["frozen-lora-aware-router", "stage2-router"])
def test_batched_users_equal_one_at_a_time(group_model, tok, h, tmp_path, lora_aware_router):
    answers = {"ta": ("love", 3), "tb": ("hate", 4), "tc": ("like", 5), "td": ("dislike", 6)}
    ex = [e for i, (u, (a, n)) in enumerate(answers.items()) for e in h.make_examples({u: a}, n=n, offset=i)]
    banks = {}
    for ups in (4, 1):
        pm = group_model()
        # Users (and a non-trivial LoRA-aware router) exist before training so the frozen router matters.
        h.add_random_users(pm, sorted(answers), lora_aware_router=lora_aware_router)
        cfg = h.small_cfg(user=dict(max_steps=None, epochs=2, users_per_step=ups, per_user_batch=2,
                                    lora_aware_router=lora_aware_router, weight_decay=0.01))
        router = {n: p.clone() for n, p in pm.named_parameters() if ".router." in n}
        start = {k: v.clone() for k, v in pm.user_loras.params.items()}
        train_users(cfg, tmp_path / str(ups), pm, tok, ex, train_router=False)
        assert all(torch.equal(p, router[n]) for n, p in pm.named_parameters() if ".router." in n)
        banks[ups] = pm.user_loras
    together, alone = banks[4], banks[1]
    assert together.user_ids == alone.user_ids
    assert torch.equal(together.steps, alone.steps)
    assert together.steps.tolist() == [4, 4, 6, 6]  # ceil(n/2) per epoch, 2 epochs
    for k in together.params:
        assert (together.params[k] - start[k]).abs().amax(dim=tuple(range(1, start[k].dim()))).min() > 1e-3, k
        for what, tol in (("params", 2e-5), ("exp_avg", 1e-6), ("exp_avg_sq", 1e-9)):
            a, b = getattr(together, what)[k], getattr(alone, what)[k]
            torch.testing.assert_close(a, b, atol=tol, rtol=1e-4, msg=lambda m: f"{what} {k}: {m}")


def test_constraint_ramp_goes_linearly_from_zero_to_full():
    from properlm.train.multiuser import constraint_ramp

    assert [constraint_ramp(s, 10, 0.5) for s in range(7)] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    assert constraint_ramp(0, 10, 0.0) == 1.0


def test_constraint_warmup_and_router_init_are_checked(h):
    with pytest.raises(ValueError, match="constraint_warmup"):
        h.small_cfg(group=dict(constraint_warmup=1.5))
    with pytest.raises(ValueError, match="text_router_init"):
        h.small_cfg(group=dict(text_router_init="ones"))


def test_schedule_mixes_who_shares_a_step_but_not_what_each_user_sees():
    by_user = {f"u{i}": list(range(10 * i, 10 * i + 4)) for i in range(8)}
    steps = user_schedule(by_user, per_user_batch=1, users_per_step=4, epochs=3, seed=0)
    cohorts = {frozenset(u for u, _ in s) for s in steps}
    assert len(cohorts) > 2, "the same two cohorts every round: users never meet the others"
    assert all(len(s) == 4 for s in steps)
    for u in by_user:  # each user's own batches do not depend on who else trains
        alone = user_schedule({u: by_user[u]}, per_user_batch=1, users_per_step=4, epochs=3, seed=0)
        assert [b for s in steps for v, b in s if v == u] == [b for s in alone for _, b in s]
    assert steps == user_schedule(by_user, per_user_batch=1, users_per_step=4, epochs=3, seed=0)
