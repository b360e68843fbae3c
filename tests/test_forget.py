"""Forgetting is complete: after ``users delete`` no file of the run directory holds the user's id."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import properlm.io as pio
from properlm.cli import main
from properlm.errors import UnknownUser
from properlm.evaluate import baselines
from properlm.evaluate.evaluate import evaluate_run
from properlm.evaluate.report import report
from properlm.forget import forget_users
from properlm.io import atomic_dir
from properlm.store.run import open_bank, read_config, stages_done
from properlm.train.loop import save_checkpoint
from properlm.train.run import train

pytestmark = pytest.mark.slow

NAMES = ["zelda-8c1f9e", "link-47ab02", "ganon-d93e11", "impa-5b7c3a", "midna-e02f64", "saria-9a41dd",
         "darunia-3c88f0", "ruto-71be29", "nabooru-c5d012", "rauru-0f6e7b"]


def write_log(path: Path) -> Path:
    """A JSONL log whose user ids appear nowhere else by chance (so a byte scan for them is exact)."""
    lines = []
    for i, u in enumerate(NAMES):
        for j in range(6 + i % 3):
            lines.append({"user_id": u, "prompt": f"Reply to message {j} about topic {(i + j) % 4}.",
                          "response": f"style{i % 3} reply {j}", "time": f"2024-01-{j + 1:02d}"})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, h):
    root = tmp_path_factory.mktemp("forget")
    log = write_log(root / "log.jsonl")
    cfg = h.small_cfg(data=dict(path=str(log), split="oppu", n_targets=4, max_len=48),
                      population=dict(max_steps=2), group=dict(max_steps=2), user=dict(max_steps=2))
    run_dir = root / "run"
    train(cfg, run_dir)
    evaluate_run(run_dir, methods=["stage1", "stage2", "proper", "pag", "oppu-kv", "oppu-mlp"], max_new_tokens=2,
                 profile_max_new_tokens=3, batch_size=8, progress=False)
    report([run_dir], run_dir / "report", figures=False)
    return run_dir


def _files_holding(root: Path, needle: str) -> list[str]:
    b = needle.encode("utf-8")
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and b in p.read_bytes()]


def test_delete_leaves_no_trace_in_any_file(run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run, run_dir)
    split = json.loads((run_dir / "split.json").read_text())
    target, trainer = split["target"][0], split["train"][0]
    kept = split["target"][1]
    # An interrupted stage's checkpoint that holds the target's rows (as a killed `users add` leaves).
    save_checkpoint(run_dir / "checkpoints" / "add-users" / "abc", 1, {"w": torch.zeros(2)}, {"rng": None},
                    users=[target])
    for u in (target, trainer):
        assert _files_holding(run_dir, u), f"{u} should be in the run before the delete"
    assert main(["users", "delete", "--run", str(run_dir), "--users", target, trainer]) == 0
    for u in (target, trainer):
        assert _files_holding(run_dir, u) == [], u
    # The others are still there, and their results stand, recomputed without the deleted user.
    assert kept in open_bank(run_dir, "lora") and _files_holding(run_dir, kept)
    scores = json.loads((run_dir / "eval" / "proper" / "scores.json").read_text())
    preds = json.loads((run_dir / "eval" / "proper" / "predictions.json").read_text())
    assert scores["n_queries"] == len(preds["golds"]) and {p["user_id"] for p in preds["golds"]} == set(split["target"][1:])
    assert not (run_dir / "report").exists()  # derived from everyone's rows: rerun `properlm report`
    from properlm import load_run
    lm = load_run(run_dir)
    with pytest.raises(UnknownUser):
        lm.generate(["hi"], [target], max_new_tokens=1)
    assert lm.generate(["hi"], [kept], max_new_tokens=1)


def test_a_failed_one_user_add_leaves_no_logs_behind(run, tmp_path):
    """An onboarding job that failed keeps its add's logs (the loss on the user's own data) under a
    name derived from their id, which a byte scan for the id cannot find: the delete removes them."""
    from properlm.train.users import add_stage

    run_dir = tmp_path / "run"
    shutil.copytree(run, run_dir)
    target = json.loads((run_dir / "split.json").read_text())["target"][0]
    stage = add_stage([target])
    left = [run_dir / "logs" / f"{stage}.jsonl", run_dir / "logs" / stage / "fit.jsonl",
            run_dir / "logs" / "tb" / stage / "events", run_dir / "checkpoints" / stage / "step-1" / "x"]
    for p in left:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text('{"loss": 1.0}\n')
    other = run_dir / "logs" / f"{add_stage(['someone-else'])}.jsonl"
    other.write_text('{"loss": 2.0}\n')
    removed = forget_users(run_dir, [target])
    assert removed["add logs and checkpoints"] == 4 and not any(p.exists() for p in left)
    assert other.exists()


def test_a_crashed_add_of_several_users_leaves_no_logs_behind(run, tmp_path):
    """``users add`` of two users that dies mid-way keeps its logs (named from a hash of both ids):
    deleting either user finds them through the add's list of users and removes them."""
    from properlm.train.users import add_users

    run_dir = tmp_path / "run"
    shutil.copytree(run, run_dir)
    a, b = json.loads((run_dir / "split.json").read_text())["target"][:2]

    def die(step, steps):
        if step == 1:
            raise RuntimeError("killed")
        return False

    with pytest.raises(RuntimeError):
        add_users(run_dir, [a, b], on_step=die)
    left = [p for p in (run_dir / "logs" / "add-users").rglob("*") if p.is_file()]
    assert any(p.name.endswith(".jsonl") for p in left) and any(p.name.endswith(".users.json") for p in left)
    removed = forget_users(run_dir, [a])
    assert removed["add logs and checkpoints"] >= 2
    assert not (run_dir / "logs" / "add-users").exists() or not any((run_dir / "logs" / "add-users").rglob("*.*"))


def test_a_report_is_found_holding_an_id_in_escaped_form(tmp_path):
    from properlm.forget import _mentions

    (tmp_path / "per_user.csv").write_text('user_id,acc\n"bob ""the"" builder",1\n')
    (tmp_path / "r.json").write_text(json.dumps({"u": "back\\slash"}))
    assert _mentions(tmp_path, {'bob "the" builder'}) and _mentions(tmp_path, {"back\\slash"})
    assert not _mentions(tmp_path, {"nobody"})


def test_oppu_users_keep_their_own_adapter_after_a_delete(run, tmp_path):
    """The defect: a stale user list in baseline.json served the deleted user's id the next user's
    adapter, and the last user hit an IndexError. Users now come from the bank itself."""
    run_dir = tmp_path / "run"
    shutil.copytree(run, run_dir)
    cfg = read_config(run_dir)
    targets = json.loads((run_dir / "split.json").read_text())["target"]
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    mask = torch.ones_like(ids)

    def logits(pm, u):
        with torch.no_grad():
            pm.bind(lora_users=[u])
            out = pm(ids, mask)
        pm.state.clear()
        return out

    pm, _ = baselines.load_oppu(cfg, run_dir, "oppu-mlp")
    before = {u: logits(pm, u) for u in targets}
    assert not torch.equal(before[targets[0]], before[targets[1]])
    forget_users(run_dir, [targets[0]])
    pm, _ = baselines.load_oppu(cfg, run_dir, "oppu-mlp")
    for u in targets[1:]:  # the last user included
        assert torch.equal(logits(pm, u), before[u]), u
    with pytest.raises(UnknownUser):
        logits(pm, targets[0])


def test_an_interrupted_directory_swap_loses_nothing(run, tmp_path, monkeypatch):
    """The defect: atomic_dir removed the old directory before renaming the new one in. Killed between the
    two, the stage was gone. Now the old one is renamed aside first and put back if the swap did not finish."""
    run_dir = tmp_path / "run"
    shutil.copytree(run, run_dir)
    old = (run_dir / "user" / "router.safetensors").read_bytes()
    calls = {"n": 0}
    real = os.replace

    def dies_after_moving_the_old_one_aside(src, dst):
        calls["n"] += 1
        if Path(dst).name == ".user.old":
            real(src, dst)
            raise KeyboardInterrupt  # killed between the two renames
        return real(src, dst)

    monkeypatch.setattr(pio.os, "replace", dies_after_moving_the_old_one_aside)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(run_dir / "user") as tmp:
            (tmp / "router.safetensors").write_bytes(b"new")
    monkeypatch.undo()
    assert not (run_dir / "user").exists()            # the moment the old code lost everything
    assert "user" in stages_done(run_dir)              # repaired: the old directory is back
    assert (run_dir / "user" / "router.safetensors").read_bytes() == old


def test_a_damaged_delete_intent_stops_the_run_until_that_user_is_deleted_again(run, tmp_path):
    """An intent is written atomically, so an unreadable one was damaged later: its user may be partly deleted.
    Training and serving refuse the run (naming the file) until a delete of the user whose id hashes to the
    file's name finishes it; an unreadable intent is never silently dropped."""
    from properlm import load_run
    from properlm.errors import ProperError
    from properlm.store.run import refuse_pending_forgets
    from properlm.store.user_store import user_hash

    d = tmp_path / "run"
    shutil.copytree(run, d)
    victim = json.loads((d / "split.json").read_text())["target"][0]
    assert _files_holding(d, victim)
    intent = d / "forgetting" / f"{user_hash(victim)}.json"
    intent.parent.mkdir(exist_ok=True)
    intent.write_bytes(b'{"us')  # damaged after it was written
    for attempt in (lambda: refuse_pending_forgets(d), lambda: load_run(d),
                    lambda: forget_users(d, [NAMES[-1]])):  # another user's delete does not guess which one it was
        with pytest.raises(ProperError, match="delete intent that cannot be read"):
            attempt()
    assert intent.exists()
    forget_users(d, [victim])
    assert not intent.exists() and _files_holding(d, victim) == []
    refuse_pending_forgets(d)
