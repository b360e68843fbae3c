"""Instant routing of a run's users: ``users add --instant``, ``add_users`` under ``group.unseen=instant``,
``properlm instant fit`` on a finished run and ``properlm instant compare``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from properlm.cli import main
from properlm.errors import ProperError
from properlm.store.run import open_bank

#: 14 users: 3 targets, 8 training users, 3 in the data but in no stage (newcomers).
TINY = ["base_model=tiny-random", "progress=false", "data.synth_users=14", "data.n_targets=3", "data.split=oppu",
        "data.max_train_users=8", "population.max_steps=2", "group.max_steps=3", "user.max_steps=2",
        "group.unseen_epochs=1"]


def _outsiders(run) -> list[str]:
    from properlm.store.run import read_config
    from properlm.train.run import load_data

    split = json.loads((run / "split.json").read_text())
    known = set(split["train"]) | set(split["target"])
    return [u.id for u in load_data(read_config(run)).users if u.id not in known]


@pytest.fixture(scope="module")
def instant_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("instant") / "run"
    assert main(["train", "--all", "--out", str(out), *TINY, "group.unseen=instant"]) == 0
    return out


def test_users_add_instant_gives_only_an_embedding_then_the_group_answers_and_delete_removes_it(instant_run,
                                                                                                tmp_path, capsys):
    from properlm import load_run
    from properlm.store.run import load_model, read_config
    from properlm.train.group import load_encoder
    from properlm.train.users import history_examples
    from properlm.train.instant import instant_embeddings

    run = tmp_path / "run"
    shutil.copytree(instant_run, run)
    new = _outsiders(run)[0]
    assert main(["users", "add", "--run", str(run), "--users", new, "--instant"]) == 0
    assert "gave 1 user(s) their instant stage-2 embedding" in capsys.readouterr().out
    assert new in open_bank(run, "emb") and new not in open_bank(run, "lora")
    cfg = read_config(run)
    pm, tok = load_model(cfg, run, "user")
    want = instant_embeddings(pm, tok, load_encoder(run), history_examples(run, [new]), cfg.data.max_len, cfg.bf16)
    got = open_bank(run, "emb").get(new)["params"]
    assert all(torch.equal(got[k], want[new][k]) for k in got)
    lm = load_run(run)
    assert lm.model_for(new) == "group"
    # The group answers them exactly as the stage-2 model does with their embedding.
    lm.model.eval()
    ids = tok(["hello there"], return_tensors="pt")
    with torch.no_grad():
        full = lm.logits(ids.input_ids, ids.attention_mask, [new])
        pm.bind(emb_users=[new])
        stage2 = pm(ids.input_ids, ids.attention_mask)
    torch.testing.assert_close(full, stage2, atol=1e-5, rtol=0)
    assert main(["generate", "--run", str(run), "--user", new, "--max-new-tokens", "2", "hi"]) == 0
    assert f"personalized for {new} (their stage-2 group)" in capsys.readouterr().err
    # Again: they have an embedding, which is kept.
    assert main(["users", "add", "--run", str(run), "--users", new, "--instant"]) == 0
    assert "1 already had an embedding, kept" in capsys.readouterr().out
    # Deleting them removes the embedding with everything else.
    assert main(["users", "delete", "--run", str(run), "--users", new]) == 0
    assert new not in open_bank(run, "emb")
    assert [str(p) for p in run.rglob("*") if p.is_file() and new.encode() in p.read_bytes()] == []
    assert load_run(run).model_for(new, fallback=True) == "base"


def test_add_users_under_instant_routing_uses_the_encoder_then_trains_the_lora(instant_run, tmp_path, monkeypatch):
    """``group.unseen=instant``: a new user's embedding is the encoder's (nothing fitted), then their LoRA trains
    with it bound."""
    from properlm import load_run
    from properlm.train import users
    from properlm.train.users import add_users

    run = tmp_path / "run"
    shutil.copytree(instant_run, run)
    new = _outsiders(run)[1]

    def no_fit(*a, **k):
        raise AssertionError("fit_unseen ran under group.unseen=instant")

    monkeypatch.setattr(users, "fit_unseen", no_fit)
    seen = []
    original = users.train_users

    def spy(cfg, run_dir, pm, tok, examples, **kw):
        seen.append(new in open_bank(run_dir, "emb"))  # the embedding is there before the LoRA trains
        return original(cfg, run_dir, pm, tok, examples, **kw)

    monkeypatch.setattr(users, "train_users", spy)
    phases = []
    assert add_users(run, [new], on_phase=phases.append) == [new]
    assert seen == [True] and phases == ["embedding", "adapter"]
    assert load_run(run).model_for(new) == "user-lora"
    phases.clear()
    assert add_users(run, [new], on_phase=phases.append) == [new]  # a refresh keeps the embedding
    assert phases == ["adapter"]


def test_instant_fit_into_a_fit_run_and_compare_the_routings(tmp_path, capsys):
    """A run trained with ``group.unseen=fit`` gets an encoder afterwards (its stage-2 files stay checked);
    ``instant compare`` files mean / instant / fit / proper on the targets with intervals over users and the
    seconds per user, writes nothing into the run's banks, and a deleted target leaves none of it behind."""
    from properlm.evaluate.unseen import compare_unseen
    from properlm.store.verify import verify_run

    run = tmp_path / "run"
    assert main(["train", "--all", "--out", str(run), *TINY]) == 0
    experts = (run / "group" / "experts.safetensors").read_bytes()
    assert main(["instant", "fit", "--run", str(run)]) == 0
    report = json.loads((run / "group" / "instant.json").read_text())
    assert report["users"] == 8 and report["validation"]["users"] == 2
    assert (run / "group" / "experts.safetensors").read_bytes() == experts and verify_run(run).ok
    emb_before = {u: open_bank(run, "emb").get(u)["params"] for u in json.loads((run / "split.json").read_text())["target"]}
    with pytest.raises(ProperError, match="expected is for rating tasks"):
        compare_unseen(run, decode="expected", progress=False)
    res = compare_unseen(run, decode="labels", progress=False, n_boot=200)
    assert set(res["routings"]) == {"mean", "instant", "fit", "proper"} and res["n_users"] == 3
    for r in ("instant", "fit"):
        assert res["routings"][r]["seconds_per_user"] > 0
        vs = res["intervals"][r]["vs_mean"]
        assert vs["n_users"] == 3 and vs["ci95"][0] <= vs["diff"] <= vs["ci95"][1]
    assert res["routings"]["mean"]["seconds_per_user"] == 0
    assert res["routings"]["proper"]["seconds_per_user"] > 0
    assert json.loads((run / "eval" / "unseen.json").read_text())["routings"].keys() == res["routings"].keys()
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert not [m for m in summary["methods"] if m.startswith("stage2-")]  # not in properlm report's tables
    for u, t in emb_before.items():
        assert all(torch.equal(open_bank(run, "emb").get(u)["params"][k], v) for k, v in t.items())
    target = next(iter(emb_before))
    assert main(["users", "delete", "--run", str(run), "--users", target]) == 0
    assert not (run / "eval" / "unseen.json").exists()
    assert [str(p) for p in run.rglob("*") if p.is_file() and target.encode() in p.read_bytes()] == []
    capsys.readouterr()
