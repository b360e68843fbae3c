"""``properlm store verify``: every kind of damage is found and named, and ``--repair`` removes only garbage.

The run is built by hand (config, split, stage directories with checksums, two user
banks, a checkpoint, a log): no model is trained or loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from properlm.cli import main
from properlm.config import save_config
from properlm.errors import ProperError
from properlm.io import atomic_dir, write_json
from properlm.store.run import open_bank
from properlm.store.user_store import UserStore, user_hash
from properlm.store.verify import DEFAULT_MIN_AGE, verify_run
from properlm.train.loop import save_checkpoint

SCHEMA = {"params": {"a": (2, 3), "b": (4,)}, "adamw": {"a.exp_avg": (2, 3)}}
#: Ids that would show up in the output if it printed them.
USERS = [f"secret-user-{i}-9d2f" for i in range(8)]


def state(seed: float) -> dict[str, dict[str, torch.Tensor]]:
    return {"params": {"a": torch.full((2, 3), seed), "b": torch.arange(4.0) + seed},
            "adamw": {"a.exp_avg": torch.full((2, 3), -seed)}}


def make_run(root: Path, h) -> Path:
    run = root / "run"
    save_config(h.small_cfg(), run / "config.yaml")
    write_json(run / "split.json", {"task": "synth-cls", "train": USERS[:4], "target": USERS[4:]})
    with atomic_dir(run / "population", checksums=True) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"population weights " * 20)
        (tmp / "adapter_config.json").write_text('{"r": 4}\n')
    with atomic_dir(run / "group", checksums=True) as tmp:
        (tmp / "experts.safetensors").write_bytes(b"experts " * 50)
    lora = UserStore(run / "store" / "lora", schema=SCHEMA)
    lora.put_many({u: state(float(i)) for i, u in enumerate(USERS)})
    emb = UserStore(run / "store" / "emb", schema={"params": {"e": (3,)}})
    emb.put_many({u: {"params": {"e": torch.full((3,), float(i))}} for i, u in enumerate(USERS[:4])})
    save_checkpoint(run / "checkpoints" / "user", 3, {"w": torch.zeros(2)}, {"rng": None}, users=USERS[4:6])
    (run / "logs").mkdir()
    (run / "logs" / "user.jsonl").write_text('{"step": 1, "loss": 9.8}\n')
    return run


@pytest.fixture
def run(tmp_path, h) -> Path:
    return make_run(tmp_path, h)


def cli(capsys, *argv: str) -> tuple[int, list[str]]:
    status = main(["store", "verify", *argv])
    out = capsys.readouterr().out
    for u in USERS:  # users' ids are never printed: store files are named by the id's sha256
        assert u not in out
    return status, out.splitlines()


def user_file(run: Path, user: str, part: str = "params", bank: str = "lora") -> Path:
    store = open_bank(run, bank)
    return store.shard(user) / store.entry(user)["parts"][part]["file"]


def aged(path: Path, seconds: float = 2 * DEFAULT_MIN_AGE) -> Path:
    """Make ``path`` (and everything under it) look untouched for ``seconds``."""
    t = path.stat().st_mtime - seconds
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.utime(p, (t, t))
    return path


def made(path: Path, folder: bool = False, old: bool = True) -> Path:
    """A partial file (or a directory holding one) as a killed write leaves it."""
    if folder:
        path.mkdir()
        (path / "state.safetensors").write_bytes(b"partial")
    else:
        path.write_bytes(b"partial")
    return aged(path) if old else path


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def orphan_of(run: Path, user: str) -> Path:
    """A user file no index names (an old version a killed write left), in the user's own leaf."""
    src = user_file(run, user)
    dst = src.with_name(f"{user_hash(user)}.params.{'0' * 12}.safetensors")
    shutil.copyfile(src, dst)
    return dst


def test_a_clean_run_exits_0_with_a_summary(run, capsys):
    status, lines = cli(capsys, "--run", str(run))
    assert status == 0
    shards = len({open_bank(run, "lora").shard(u) for u in USERS}) + len({open_bank(run, "emb").shard(u) for u in USERS[:4]})
    assert lines == [f"checked 3 stage files, 2 checkpoint files, 12 users in {shards} shards of 2 banks: 0 problems"]


def _corrupt_stage(run):
    flip(run / "group" / "experts.safetensors")
    return run / "group" / "experts.safetensors", "corrupt"


def _corrupt_entry(run):
    flip(user_file(run, USERS[2]))
    return user_file(run, USERS[2]), "corrupt"


def _wrong_size(run):
    p = user_file(run, USERS[3], "adamw")
    p.write_bytes(p.read_bytes() + b"\0")
    return p, "wrong size"


def _missing(run):
    p = user_file(run, USERS[5])
    p.unlink()
    return p, "missing"


def _orphan(run):
    return orphan_of(run, USERS[1]), "orphan"


def _stray(run):
    p = open_bank(run, "lora").shard(USERS[0]) / "notes.txt"
    p.write_text("not the store's")
    return p, "stray"


def _stray_top(run):
    (run / "old-run.tar").write_bytes(b"x")
    return run / "old-run.tar", "stray"


def _temp(run):
    p = open_bank(run, "lora").shard(USERS[0]) / f".{user_hash(USERS[0])}.params.abc.safetensors.k2j4a9x1.tmp"
    p.write_bytes(b"half a file")
    return p, "temporary"


def _corrupt_checkpoint(run):
    p = run / "checkpoints" / "user" / "step-00000003" / "state.safetensors"
    flip(p)
    return p, "corrupt"


def _stage_file_unlisted(run):
    p = run / "population" / "extra.bin"
    p.write_bytes(b"?")
    return p, "stray"


def _interrupted_delete(run):
    p = run / "forgetting" / f"{user_hash(USERS[6])}.json"
    write_json(p, {"user": USERS[6]})
    return p, "interrupted"


def _misplaced(run):
    store = open_bank(run, "lora")
    a, b = store.shard(USERS[0]), store.shard(USERS[1])
    ia, ib = json.loads((a / "index.json").read_text()), json.loads((b / "index.json").read_text())
    ib[USERS[0]] = ia[USERS[0]]  # an entry in a leaf its id does not hash to
    (b / "index.json").write_text(json.dumps(ib))
    return b / "index.json", "misplaced"


def _interrupted_swap(run):
    # A stage rewrite killed between its two renames: the old copy, aside, is the stage's only copy.
    os.replace(run / "population", run / ".population.old")
    return run / ".population.old", "interrupted"


DAMAGE = [_corrupt_stage, _corrupt_entry, _wrong_size, _missing, _orphan, _stray, _stray_top, _temp,
          _corrupt_checkpoint, _stage_file_unlisted, _interrupted_delete, _misplaced,
          _interrupted_swap]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__[1:] for d in DAMAGE])
def test_each_kind_of_damage_is_one_line_naming_the_file(run, capsys, damage):
    path, kind = damage(run)
    status, lines = cli(capsys, "--run", str(run))
    assert status == 1
    assert lines[:-1] == [lines[0]] and lines[0].startswith(f"{path}: {kind}: "), lines
    assert lines[-1].startswith("checked ") and lines[-1].endswith(": 1 problem")


def test_an_unreadable_index_is_reported_and_its_leaf_left_alone(run, capsys):
    leaf = open_bank(run, "lora").shard(USERS[0])
    orphan = orphan_of(run, USERS[0])
    files = sorted(p for p in leaf.iterdir() if p.name.endswith(".safetensors"))
    (leaf / "index.json").write_text('{"trunc')
    for p in files:
        aged(p)
    status, lines = cli(capsys, "--run", str(run), "--repair")
    assert status == 1 and len(lines) == 2
    assert lines[0].startswith(f"{leaf / 'index.json'}: corrupt: unreadable index")
    assert orphan in files and all(p.exists() for p in files)  # nothing in the leaf is removed


def test_repair_removes_garbage_only_and_a_second_verify_exits_0(run, capsys):
    store = open_bank(run, "lora")
    before = {u: store.get(u, ("params", "adamw")) for u in USERS}
    garbage = [
        aged(orphan_of(run, USERS[1])),                                      # an old version of a user's file
        made(store.shard(USERS[2]) / ".index.json.q8w7e6r5.tmp", old=False),  # an index write killed (just now)
        made(store.shard(USERS[3]) / f".{user_hash(USERS[3])}.params.x.safetensors.a1b2c3d4.tmp"),
        made(run / ".split.json.zz9y8x7w.tmp"),                              # a killed write_json
        made(run / "logs" / ".user.jsonl.abcdefgh.tmp"),
        made(run / ".user.k3j2h1g0", folder=True),                           # a killed stage write
        made(run / "checkpoints" / "user" / ".step-00000004.a8s7d6f5", folder=True),  # a killed checkpoint write
        made(run / ".group.old", folder=True, old=False),                    # a swap killed after the new copy went in
    ]
    kept = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p not in garbage and p.parent not in garbage}

    status, lines = cli(capsys, "--run", str(run), "--repair")
    assert status == 0, lines
    assert all(l.startswith("removed ") for l in lines[:-1])
    assert {Path(l[len("removed "):].split(": ")[0]) for l in lines[:-1]} == set(garbage)
    assert lines[-1].endswith(f": {len(garbage)} problems ({len(garbage)} removed, 0 left)")
    assert not any(p.exists() for p in garbage)
    # Every other file is as it was (the lock files of the leaves repair locked aside), every user reads back.
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == \
        {p: b for p, b in kept.items() if p.name != ".lock"}
    for u in USERS:
        got = store.get(u, ("params", "adamw"))
        assert all(torch.equal(got[k][n], before[u][k][n]) for k in got for n in got[k])
    assert cli(capsys, "--run", str(run))[0] == 0


def test_repair_never_removes_data_stage_files_or_strays(run, capsys):
    store = open_bank(run, "lora")
    corrupt = user_file(run, USERS[2])
    flip(corrupt)
    flip(run / "group" / "experts.safetensors")
    stray = aged(made(run / "old-run.tar"))
    os.replace(run / "population", run / ".population.old")  # a stage swap killed between its renames
    # A leaf whose index.json is gone: its files may be users' data whose index was lost.
    lost = store.shard(USERS[4])
    (lost / "index.json").unlink()
    lost_files = sorted(p for p in lost.iterdir() if p.name.endswith(".safetensors"))
    for p in lost_files:
        aged(p)
    fresh_orphan = orphan_of(run, USERS[1])  # just written: a write may be about to index it
    fresh_temp = run / ".split.json.fresh123.tmp"
    fresh_temp.write_bytes(b"partial")
    intent = run / "forgetting" / f"{user_hash(USERS[6])}.json"
    write_json(intent, {"user": USERS[6]})

    status, lines = cli(capsys, "--run", str(run), "--repair")
    assert status == 1 and not any(l.startswith("removed ") for l in lines), lines
    for p in [corrupt, run / "group" / "experts.safetensors", stray, run / ".population.old" / "adapter_model.safetensors",
              *lost_files, fresh_orphan, fresh_temp, intent]:
        assert p.exists(), p
    text = "\n".join(lines)
    assert f"{fresh_temp}: temporary: " in text and "a write may be in progress" in text
    assert all(f"{p}: orphan: " in text and "not removed" in text for p in lost_files)
    # Once the fresh files are old enough (or --min-age says so), they go; the rest stays.
    status, lines = cli(capsys, "--run", str(run), "--repair", "--min-age", "0")
    assert status == 1
    removed = sorted(Path(l[len("removed "):].split(": ")[0]) for l in lines if l.startswith("removed "))
    assert removed == sorted([fresh_orphan, fresh_temp])
    assert corrupt.exists() and all(p.exists() for p in lost_files)


def test_verify_reads_bytes_and_never_loads_tensors(run, monkeypatch):
    import safetensors
    import safetensors.torch

    import properlm.store.user_store as us

    def refuse(*a, **kw):
        raise AssertionError("verify loaded tensors")

    for mod, name in ((us, "safe_open"), (safetensors, "safe_open"), (safetensors.torch, "load_file"),
                      (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)
    monkeypatch.setattr(UserStore, "get", refuse)
    seen = []
    result = verify_run(run, on_problem=seen.append)
    assert result.ok and seen == [] and result.users == 12 and result.banks == 2


def test_not_a_run_exits_2(tmp_path, capsys):
    assert main(["store", "verify", "--run", str(tmp_path)]) == 2
    assert "not a properlm run directory" in capsys.readouterr().err
    with pytest.raises(ProperError):
        verify_run(tmp_path)


def test_help_names_the_default_min_age(capsys):
    with pytest.raises(SystemExit):
        main(["store", "verify", "--help"])
    assert f"default {DEFAULT_MIN_AGE:.0f}" in " ".join(capsys.readouterr().out.split())


def test_the_files_of_a_write_killed_before_its_index_are_orphans_that_repair_removes(run, capsys, monkeypatch):
    store = open_bank(run, "lora")
    before = {u: store.entry(u) for u in USERS[:2]}

    def killed(self, shard, index):
        raise KeyboardInterrupt  # the new files are in place, the index never points at them

    monkeypatch.setattr(UserStore, "_write_index", killed)
    with pytest.raises(KeyboardInterrupt):
        store.put_many({u: state(7.0) for u in USERS[:2]})  # killed in the first user's leaf
    monkeypatch.undo()
    new = sorted(p for u in USERS[:2] for p in store.shard(u).iterdir()
                 if p.name.endswith(".safetensors") and p.name not in {x["file"] for x in before[u]["parts"].values()})
    assert len(new) == 2  # that user's params and moments
    status, lines = cli(capsys, "--run", str(run), "--repair")  # just written: left alone
    assert status == 1 and sorted(Path(l.split(": ")[0]) for l in lines[:-1]) == new
    assert all(": orphan: " in l and "a write may be in progress" in l for l in lines[:-1])
    status, lines = cli(capsys, "--run", str(run), "--repair", "--min-age", "0")
    assert status == 0 and sorted(Path(l[len("removed "):].split(": ")[0]) for l in lines[:-1]) == new
    assert {u: store.entry(u) for u in USERS[:2]} == before and cli(capsys, "--run", str(run))[0] == 0
