"""Whole runs: saved adapters reload to the same model, interrupted runs resume exactly, checkpoints are atomic."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import properlm.train.loop as loop
import properlm.train.run as run_mod
from properlm.store.run import load_model, open_bank
from properlm.train.loop import RunLogger, load_checkpoint, save_checkpoint
from properlm.train.run import train

OUTPUTS = ("population/adapter_model.safetensors", "group/experts.safetensors", "user/router.safetensors")
BANKS = ("emb", "lora")


def build_model(cfg, run_dir, upto):
    return load_model(cfg, run_dir, upto)


def bank_tensors(run_dir: Path, bank: str) -> dict[str, torch.Tensor]:
    """Every user's tensors of a bank, as ``user/part.name -> tensor``."""
    store = open_bank(run_dir, bank)
    return {f"{u}/{p}.{k}": v for u in store.users() for p, d in store.get(u, ("params", "adamw")).items()
            for k, v in d.items()}


def run_cfg(h, **user):
    """Six steps per stage, a checkpoint every two, dropout on (so resuming must restore the RNG)."""
    return h.small_cfg(checkpoint_every=2, data=dict(split="oppu"),
                       population=dict(max_steps=6, dropout=0.05), group=dict(max_steps=6, dropout=0.05),
                       user=dict(max_steps=6, dropout=0.05, **user))


@pytest.fixture(scope="module")
def reference(h, tmp_path_factory):
    """An uninterrupted run, with the in-memory models of stages 2 and 3 as training left them."""
    d = tmp_path_factory.mktemp("reference")
    cfg = run_cfg(h)
    models = {}

    def capture(name, fn):
        def wrapped(cfg, run_dir, pm, *a, **kw):
            out = fn(cfg, run_dir, pm, *a, **kw)
            models[name] = pm
            return out
        return wrapped

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_mod, "train_group", capture("group", run_mod.train_group))
        mp.setattr(run_mod, "train_users", capture("user", run_mod.train_users))
        train(cfg, d)
    return cfg, d, models


def _logits(pm, tok, h, users, emb=False, lora=False):
    ex = [type(e)(u, e.prompt, e.answer) for u, e in zip(users, h.make_examples({"x": "love"}, n=len(users)))]
    b = h.batch(tok, ex)
    with torch.no_grad():
        pm.bind(emb_users=users if emb else None, lora_users=users if lora else None)
        out = pm(b["input_ids"], b["attention_mask"])
    pm.state.clear()
    return out[b["attention_mask"].bool()]


# -- 6. save -> load reproduces the model ----------------------------------------------------------------

def test_run_layout(reference):
    cfg, d, _ = reference
    for f in OUTPUTS + ("config.yaml", "split.json", "manifest.json"):
        assert (d / f).is_file(), f
    split = json.loads((d / "split.json").read_text())
    assert sorted(open_bank(d, "lora").users()) == sorted(split["target"])
    assert set(split["train"]) <= set(open_bank(d, "emb").users())
    assert json.loads((d / "manifest.json").read_text())["stages_done"] == ["population", "group", "user"]
    for s in ("population", "group", "user"):
        assert len((d / "logs" / f"{s}.jsonl").read_text().splitlines()) == 6
        assert not list((d / "checkpoints" / s).glob("step-*")), "a finished stage keeps no checkpoint"


def test_saved_run_reproduces_the_trained_model(reference, tok, h):
    cfg, d, models = reference
    split = json.loads((d / "split.json").read_text())
    targets, trainers = split["target"], split["train"]
    assert len(targets) == 2 and len(trainers) == 4

    # Stage 3: a batch mixing both target users and a row without a user LoRA.
    loaded, _ = build_model(cfg, d, "done")
    mem = models["user"]
    assert loaded.user_loras.cached == [], "loading a run reads no user"
    assert sorted(loaded.user_loras.user_ids) == mem.user_loras.user_ids == sorted(targets)
    mixed = [targets[0], None, targets[1], targets[0]]
    got, want = _logits(loaded, tok, h, mixed, lora=True), _logits(mem, tok, h, mixed, lora=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # Each user's personalized model on its own, and users differ from each other and from no LoRA.
    per_user = {}
    for u in targets + [None]:
        per_user[u] = _logits(loaded, tok, h, [u], lora=True)
        torch.testing.assert_close(per_user[u], _logits(mem, tok, h, [u], lora=True), atol=1e-6, rtol=0)
    assert (per_user[targets[0]] - per_user[None]).abs().max() > 1e-4
    assert (per_user[targets[0]] - per_user[targets[1]]).abs().max() > 1e-4

    # Stage 2: training users' embeddings and the fallback for anyone else.
    loaded2, _ = build_model(cfg, d, "user")
    loaded2.eval()  # build_model returns the "user" model in training mode (stage-2 dropout on); callers eval() it
    mixed2 = [trainers[0], trainers[3], None, trainers[1]]
    torch.testing.assert_close(_logits(loaded2, tok, h, mixed2, emb=True), _logits(models["group"], tok, h, mixed2, emb=True),
                               atol=1e-6, rtol=0)


def test_saved_shared_embedding_run_reproduces_stage_2(reference, tok, h, tmp_path):
    """``group.user_embedding: shared``: one embedding per user on disk, and the reloaded stage 2 routes the same."""
    _, ref_dir, _ = reference
    cfg = h.small_cfg(checkpoint_every=2, data=dict(split="oppu"), population=dict(max_steps=6, dropout=0.05),
                      group=dict(max_steps=6, dropout=0.05, user_embedding="shared"))
    shutil.copytree(ref_dir / "population", tmp_path / "population")
    models = {}
    orig = run_mod.train_group

    def capture(cfg, run_dir, pm, *a, **kw):
        out = orig(cfg, run_dir, pm, *a, **kw)
        models["group"] = pm
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_mod, "train_group", capture)
        train(cfg, tmp_path, stages=["group"])
    assert list(open_bank(tmp_path, "emb").schema["params"]) == ["user_emb"]
    loaded, _ = build_model(cfg, tmp_path, "user")
    loaded.eval()
    trainers = json.loads((tmp_path / "split.json").read_text())["train"]
    mixed = [trainers[0], None, trainers[2]]
    got, want = _logits(loaded, tok, h, mixed, emb=True), _logits(models["group"], tok, h, mixed, emb=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (_logits(loaded, tok, h, [trainers[0]], emb=True) - _logits(loaded, tok, h, [trainers[2]], emb=True)).abs().max() > 0


def test_saved_run_without_lora_aware_router(reference, tok, h, tmp_path):
    """The ablation: user LoRAs on top of stage-2 routing (fallback embedding), reloaded from disk."""
    _, ref_dir, _ = reference
    cfg = run_cfg(h, lora_aware_router=False)
    for s in ("population", "group"):
        shutil.copytree(ref_dir / s, tmp_path / s)
    models = {}
    orig = run_mod.train_users

    def capture(cfg, run_dir, pm, *a, **kw):
        models["user"] = pm
        return orig(cfg, run_dir, pm, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_mod, "train_users", capture)
        train(cfg, tmp_path, stages=["user"])
    assert (tmp_path / "user").is_dir() and not (tmp_path / "user" / "router.safetensors").exists()
    loaded, _ = build_model(cfg, tmp_path, "done")
    assert all(s.router.kind == "user-aware" for s in loaded.sites.values())
    targets = json.loads((tmp_path / "split.json").read_text())["target"]
    mixed = [targets[1], None, targets[0]]
    torch.testing.assert_close(_logits(loaded, tok, h, mixed, lora=True), _logits(models["user"], tok, h, mixed, lora=True),
                               atol=1e-6, rtol=0)


def test_saved_end_to_end_run_reproduces_the_trained_model(reference, tok, h, tmp_path):
    """The end-to-end ablation: experts, embeddings of the targets and their LoRAs, trained jointly, reloaded."""
    _, ref_dir, _ = reference
    cfg = run_cfg(h, end_to_end=True)
    shutil.copytree(ref_dir / "population", tmp_path / "population")
    models = {}
    orig = run_mod.train_end_to_end

    def capture(cfg, run_dir, pm, *a, **kw):
        models["user"] = pm
        return orig(cfg, run_dir, pm, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_mod, "train_end_to_end", capture)
        train(cfg, tmp_path)
    targets = json.loads((tmp_path / "split.json").read_text())["target"]
    loaded, _ = build_model(cfg, tmp_path, "done")
    assert sorted(loaded.user_embs.user_ids) == sorted(loaded.user_loras.user_ids) == sorted(targets)
    mixed = [targets[1], None, targets[0]]
    for emb in (False, True):
        torch.testing.assert_close(_logits(loaded, tok, h, mixed, emb=emb, lora=True),
                                   _logits(models["user"], tok, h, mixed, emb=emb, lora=True), atol=1e-6, rtol=0)


# -- 7. an interrupted run resumes to the same result ---------------------------------------------------

class Interrupted(Exception):
    pass


def _interrupt_at(mp, stage: str, step: int) -> None:
    """Make ``stage`` die right after logging ``step`` (its last checkpoint is then the one before)."""
    orig = RunLogger.log

    def log(self, s, **metrics):
        orig(self, s, **metrics)
        if self.stage == stage and s == step:
            raise Interrupted(f"{stage} at step {step}")

    mp.setattr(RunLogger, "log", log)


def _assert_same_outputs(d: Path, ref: Path) -> None:
    for f in OUTPUTS:
        a, b = load_file(str(d / f)), load_file(str(ref / f))
        assert a.keys() == b.keys(), f
        for k in a:
            assert torch.equal(a[k], b[k]), f"{f} {k}: max diff {(a[k] - b[k]).abs().max()}"
    for bank in BANKS:
        a, b = bank_tensors(d, bank), bank_tensors(ref, bank)
        assert a.keys() == b.keys(), bank
        for k in a:
            assert torch.equal(a[k], b[k]), f"{bank} {k}: max diff {(a[k].float() - b[k].float()).abs().max()}"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["population", "group", "user"])
def test_interrupted_run_resumes_to_the_same_adapters(reference, h, tmp_path, stage):
    cfg, ref_dir, _ = reference
    before = run_mod.STAGES[:run_mod.STAGES.index(stage)]
    for s in before:  # earlier stages as the uninterrupted run left them
        shutil.copytree(ref_dir / s, tmp_path / s)
        if s == "group":
            shutil.copytree(ref_dir / "store" / "emb", tmp_path / "store" / "emb")
    with pytest.MonkeyPatch.context() as mp:
        _interrupt_at(mp, stage, 5)
        with pytest.raises(Interrupted):
            train(cfg, tmp_path, stages=run_mod.STAGES[len(before):])
    assert not (tmp_path / stage).exists(), "an interrupted stage has no output"
    ck = load_checkpoint(tmp_path / "checkpoints" / stage)
    assert ck is not None and ck[0] == 4
    # the newest checkpoint and the one before it (to fall back to if the newest is corrupt)
    assert sorted(p.name for p in (tmp_path / "checkpoints" / stage).glob("step-*")) == ["step-00000002",
                                                                                          "step-00000004"]
    assert len((tmp_path / "logs" / f"{stage}.jsonl").read_text().splitlines()) == 5

    train(cfg, tmp_path, resume=True)
    _assert_same_outputs(tmp_path, ref_dir)
    for s in run_mod.STAGES[len(before):]:
        got = [json.loads(x) for x in (tmp_path / "logs" / f"{s}.jsonl").read_text().splitlines()]
        want = [json.loads(x) for x in (ref_dir / "logs" / f"{s}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in got] == list(range(1, 7)), s
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-6), s


def test_finished_stages_are_refused_or_skipped(reference, h, tmp_path):
    """Without --resume a finished stage is refused; with it, finished stages are skipped untouched."""
    cfg, ref_dir, _ = reference
    shutil.copytree(ref_dir, tmp_path / "run")
    d = tmp_path / "run"
    with pytest.raises(run_mod.ProperError):
        train(cfg, d)
    files = [*OUTPUTS, *(str(p.relative_to(d)) for p in (d / "store").rglob("*") if p.is_file())]
    stamp = {f: (d / f).stat().st_mtime_ns for f in files}
    train(cfg, d, resume=True)
    assert stamp == {f: (d / f).stat().st_mtime_ns for f in files}


# -- 10. checkpoints are atomic --------------------------------------------------------------------------

def _visible(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if not p.name.startswith(".")}


def test_checkpoint_round_trip_and_latest(tmp_path):
    root = tmp_path / "ck"
    assert load_checkpoint(root) is None
    save_checkpoint(root, 2, {"w": torch.ones(3)}, {"optimizer": None, "n": 2})
    save_checkpoint(root, 4, {"w": torch.full((3,), 4.0)}, {"optimizer": None, "n": 4})
    save_checkpoint(root, 6, {"w": torch.full((3,), 6.0)}, {"optimizer": None, "n": 6})
    assert (root / "latest").read_text().strip() == "step-00000006"
    assert _visible(root) == {"latest", "step-00000004", "step-00000006"}  # the two newest are kept
    step, tensors, extra = load_checkpoint(root)
    assert step == 6 and torch.equal(tensors["w"], torch.full((3,), 6.0)) and extra["n"] == 6


@pytest.mark.parametrize("fail_in", ["save_file", "torch.save"])
def test_checkpoint_crash_mid_write_keeps_the_previous_one(tmp_path, monkeypatch, fail_in):
    root = tmp_path / "ck"
    save_checkpoint(root, 2, {"w": torch.ones(3)}, {"n": 2})

    def boom(obj, path, *a, **kw):
        Path(path).write_bytes(b"partial")  # a half-written file, then the crash
        raise KeyboardInterrupt

    if fail_in == "save_file":
        monkeypatch.setattr(loop, "save_file", boom)
    else:
        monkeypatch.setattr(loop.torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(root, 4, {"w": torch.zeros(3)}, {"n": 4})
    monkeypatch.undo()
    assert _visible(root) == {"latest", "step-00000002"}
    assert (root / "latest").read_text().strip() == "step-00000002"
    step, tensors, extra = load_checkpoint(root)
    assert step == 2 and torch.equal(tensors["w"], torch.ones(3)) and extra["n"] == 2


def test_checkpoint_visible_only_once_complete(group_model, tok, h, tmp_path, monkeypatch):
    """During a real stage, files are written outside any visible step-* directory, and
    ``latest`` is only pointed at a directory that is already complete."""
    from properlm.train.user import train_users

    events = []
    orig_save_file, orig_write_text = loop.save_file, loop.write_text

    def save_file(tensors, path, *a, **kw):
        parent = Path(path).parent
        assert parent.name.startswith("."), f"tensors written into a visible directory {parent}"
        assert not any(p.name.startswith("step-") and p not in _complete(parent.parent) for p in parent.parent.iterdir())
        events.append("tensors")
        return orig_save_file(tensors, path, *a, **kw)

    def write_text(path, text):
        if Path(path).name == "latest":
            d = Path(path).parent / text.strip()
            assert d in _complete(d.parent), f"latest -> {d.name} before it is complete"
            assert json.loads((d / "step.json").read_text())["step"] == int(d.name.split("-")[1])
            events.append(f"latest {text.strip()}")
        return orig_write_text(path, text)

    monkeypatch.setattr(loop, "save_file", save_file)
    monkeypatch.setattr(loop, "write_text", write_text)
    cfg = h.small_cfg(checkpoint_every=1, user=dict(max_steps=3))
    train_users(cfg, tmp_path, group_model(), tok, h.make_examples({"ta": "love", "tb": "hate"}, n=3))
    assert events == ["tensors", "latest step-00000001", "tensors", "latest step-00000002"]
    assert _visible(tmp_path / "checkpoints" / "user") == {"latest", "step-00000001", "step-00000002"}


def _complete(root: Path) -> set[Path]:
    """step-* directories under ``root`` holding all three checkpoint files."""
    need = {"state.safetensors", "extra.pt", "step.json"}
    return {p for p in root.glob("step-*") if need <= {f.name for f in p.iterdir()}}


# -- drills: corrupt files, a full disk, a changed config --------------------------------------------------

def _flip(path: Path, at: int = -7) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_refused_and_resume_falls_back_to_the_one_before(reference, h, tmp_path, capsys):
    cfg, ref_dir, _ = reference
    with pytest.MonkeyPatch.context() as mp:
        _interrupt_at(mp, "population", 5)
        with pytest.raises(Interrupted):
            train(cfg, tmp_path)
    _flip(tmp_path / "checkpoints" / "population" / "step-00000004" / "state.safetensors")
    train(cfg, tmp_path, resume=True)
    out = capsys.readouterr().out
    assert "step-00000004/state.safetensors: corrupt file" in out and "trying the checkpoint before it" in out
    _assert_same_outputs(tmp_path, ref_dir)  # resumed from step 2, same adapters


def test_a_corrupt_stage_file_is_refused_naming_it(reference, tmp_path, capsys):
    from properlm.cli import main
    from properlm.errors import CorruptFile

    cfg, ref_dir, _ = reference
    shutil.copytree(ref_dir, tmp_path / "run")
    target = tmp_path / "run" / "group" / "experts.safetensors"
    _flip(target)
    with pytest.raises(CorruptFile, match="experts.safetensors"):
        build_model(cfg, tmp_path / "run", "done")
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert main(["generate", "--run", str(tmp_path / "run"), "--user", split["target"][0], "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(target) in err and "corrupt" in err and "\n" not in err
    (tmp_path / "run" / "population" / "adapter_model.safetensors").write_bytes(b"truncated")
    with pytest.raises(CorruptFile, match="adapter_model.safetensors"):
        build_model(cfg, tmp_path / "run", "group")


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(h, tmp_path, monkeypatch, capsys):
    import errno

    from properlm.cli import main

    calls = {"n": 0}
    real = loop.save_file

    def full(tensors, path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint's tensors: the disk fills up half way
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(loop, "save_file", full)
    args = ["train", "--stage", "population", "--out", str(tmp_path / "r"), "base_model=tiny-random", "progress=false",
            "data.synth_users=8", "data.n_targets=2", "population.max_steps=6", "checkpoint_every=2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "No space left on device" in err and "\n" not in err
    ck = tmp_path / "r" / "checkpoints" / "population"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-00000002"]  # no temporaries left
    assert load_checkpoint(ck)[0] == 2
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    assert (tmp_path / "r" / "population" / "adapter_model.safetensors").exists()


def test_resume_with_a_changed_config_is_refused_naming_the_keys(reference, h, tmp_path, capsys):
    from properlm.cli import main

    cfg, ref_dir, _ = reference
    shutil.copytree(ref_dir, tmp_path / "run")
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert main(["train", "--all", "--out", str(tmp_path / "run"), "--resume", "user.lr=0.5", "group.num_experts=4",
                 "progress=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert "user.lr (saved 0.01, given 0.5)" in err and "group.num_experts" in err and "progress" not in err
    assert (tmp_path / "run" / "config.yaml").read_text() == saved
    assert main(["train", "--all", "--out", str(tmp_path / "run"), "--resume", "progress=false"]) == 0


def test_a_later_stage_uses_the_runs_own_config_and_refuses_changes_to_trained_ones(tmp_path, capsys):
    """``train --stage user`` on a run trained up to stage 2 takes the run's config (no --config needed),
    with overrides of its own stage's settings; a setting of a trained stage or of the data is refused,
    naming it, and the saved config stays as it was."""
    import yaml

    from properlm.cli import main

    run = tmp_path / "run"
    common = ["base_model=tiny-random", "progress=false", "data.synth_users=8", "data.n_targets=2",
              "population.max_steps=2", "group.max_steps=2", "user.max_steps=2"]
    assert main(["train", "--stage", "population", "--out", str(run), *common]) == 0
    assert main(["train", "--stage", "group", "--out", str(run)]) == 0   # the run's own data and sizes
    saved = (run / "config.yaml").read_text()
    for bad in (["data.synth_users=9"], ["group.num_experts=7"], ["base_model=smollm2"]):
        assert main(["train", "--stage", "user", "--out", str(run), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert bad[0].split("=")[0] + " (saved" in err and "\n" not in err
        assert (run / "config.yaml").read_text() == saved and not (run / "user").exists()
    assert main(["train", "--stage", "user", "--out", str(run), "user.lr=0.02"]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["user"]["lr"] == 0.02 and cfg["data"]["synth_users"] == 8 and cfg["group"]["max_steps"] == 2
    assert (run / "user" / "router.safetensors").exists()
