"""OPPU's per-user LoRAs are compared with PROPER's at equal per-user sizes, as in the paper."""

from __future__ import annotations

import pytest

from properlm.evaluate.baselines import OPPU_TARGETS, oppu_rank
from properlm.model.proper import FFN_TARGETS, ProperModel


def _per_user(lm, targets, r):
    pm = ProperModel(lm, targets=targets)
    pm.add_user_lora(r, 2 * r, lora_aware_router=False)
    n = 0
    for shape in pm.lora_shapes.values():
        n += shape[0] * shape[1]
    return n


@pytest.mark.parametrize("kind", ["oppu-kv", "oppu-mlp"])
def test_oppu_gets_as_many_parameters_per_user_as_proper(fresh_lm, kind):
    r = 4
    proper = _per_user(fresh_lm(), FFN_TARGETS, r)
    rank = oppu_rank(kind, fresh_lm(), r)
    got = _per_user(fresh_lm(), OPPU_TARGETS[kind], rank)
    one_rank = _per_user(fresh_lm(), OPPU_TARGETS[kind], 1)
    assert abs(got - proper) <= one_rank / 2 + 1e-9  # the nearest size a whole rank can give
    if kind == "oppu-mlp":
        assert rank == r and got == proper
    else:  # k and v are narrower than the FFN (grouped KV heads): the rank goes up
        assert rank > r and _per_user(fresh_lm(), OPPU_TARGETS[kind], r) < proper / 2
