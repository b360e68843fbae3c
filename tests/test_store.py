"""The user store: per-user files in shards, atomic writes, checksums, complete deletes, concurrent writers."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch

import properlm.store.user_store as us
from properlm.errors import CorruptFile, ProperError, UnknownUser
from properlm.store.user_store import UserStore, user_hash

SCHEMA = {"params": {"a": (2, 3), "b": (4,)}, "adamw": {"a.exp_avg": (2, 3), "steps": (1,)}}


def user_state(seed: float) -> dict[str, dict[str, torch.Tensor]]:
    return {"params": {"a": torch.full((2, 3), seed), "b": torch.arange(4.0) + seed},
            "adamw": {"a.exp_avg": torch.full((2, 3), -seed), "steps": torch.tensor([int(seed)])}}


def test_round_trip_and_index_entry(tmp_path):
    store = UserStore(tmp_path / "bank", schema=SCHEMA, meta={"r": 4})
    entry = store.put("alice", user_state(3.0))
    assert set(entry["parts"]) == {"params", "adamw"} and entry["updated"]
    got = store.get("alice", ("params", "adamw"))
    assert torch.equal(got["params"]["a"], torch.full((2, 3), 3.0)) and int(got["adamw"]["steps"]) == 3
    assert set(store.get("alice")) == {"params"}  # only what is asked for is read
    # The index names the shard's files and their checksums; the bank reopens from disk.
    shard = store.shard("alice")
    index = json.loads((shard / "index.json").read_text())
    for part in entry["parts"].values():
        assert (shard / part["file"]).stat().st_size == part["bytes"]
    assert index["alice"] == entry
    again = UserStore(tmp_path / "bank")
    assert again.meta == {"r": 4} and "alice" in again and "bob" not in again
    with pytest.raises(UnknownUser, match="'bob'"):
        again.get("bob")
    assert again.get("bob", missing_ok=True) == {}


def test_files_are_named_by_hash_and_spread_over_shards(tmp_path):
    store = UserStore(tmp_path / "bank", schema={"params": {"w": (1,)}})
    users = [f"user-{i}" for i in range(3000)]
    for s in range(0, len(users), 500):
        store.put_many({u: {"params": {"w": torch.tensor([float(i)])}} for i, u in enumerate(users[s:s + 500], s)})
    assert sorted(store.users()) == sorted(users) and len(store) == 3000
    top = list((tmp_path / "bank" / "shards").iterdir())
    assert len(top) <= 256
    leaves = [d for a in top for d in a.iterdir()]
    # 3000 users over up to 65,536 leaves: no directory grows with the number of users
    assert max(len(list(d.iterdir())) for d in leaves) <= 12
    names = "".join(p.name for d in leaves for p in d.iterdir())
    assert "user-" not in names and user_hash("user-7") in names  # ids are not in file names
    assert store.shard("user-7") == tmp_path / "bank" / "shards" / user_hash("user-7")[:2] / user_hash("user-7")[2:4]


def test_reading_one_user_touches_only_their_files(tmp_path, monkeypatch):
    store = UserStore(tmp_path / "bank", schema=SCHEMA)
    store.put_many({f"u{i}": user_state(float(i)) for i in range(50)})
    opened = []
    real_open = us.safe_open
    monkeypatch.setattr(us, "safe_open", lambda path, *a, **kw: opened.append(path) or real_open(path, *a, **kw))
    store.get("u7", ("params",))
    assert opened == [str(store.shard("u7") / store.entry("u7")["parts"]["params"]["file"])]


def test_rewrite_replaces_the_file_and_leaves_no_old_bytes(tmp_path):
    store = UserStore(tmp_path / "bank", schema=SCHEMA)
    old = store.put("alice", user_state(1.0))
    new = store.put("alice", {"params": user_state(2.0)["params"]})  # moments dropped
    shard = store.shard("alice")
    assert not (shard / old["parts"]["params"]["file"]).exists()
    assert not (shard / old["parts"]["adamw"]["file"]).exists()
    assert set(new["parts"]) == {"params"} and store.get("alice", ("params", "adamw")).keys() == {"params"}
    assert sorted(p.name for p in shard.iterdir()) == sorted([".lock", "index.json", new["parts"]["params"]["file"]])


@pytest.mark.parametrize("where", ["file", "index"])
def test_a_crash_mid_write_leaves_the_user_as_before(tmp_path, monkeypatch, where):
    store = UserStore(tmp_path / "bank", schema=SCHEMA)
    store.put("alice", user_state(1.0))
    real = us._write_durable

    def crash(path, data):
        if (where == "file" and path.name.endswith(".safetensors")) or (where == "index" and path.name == "index.json"):
            real(path.parent / ".partial.tmp", data[: len(data) // 2])  # half written, then the crash
            raise KeyboardInterrupt
        return real(path, data)

    monkeypatch.setattr(us, "_write_durable", crash)
    with pytest.raises(KeyboardInterrupt):
        store.put("alice", user_state(9.0))
    monkeypatch.undo()
    got = UserStore(tmp_path / "bank").get("alice", ("params", "adamw"))
    assert torch.equal(got["params"]["a"], torch.full((2, 3), 1.0)) and int(got["adamw"]["steps"]) == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "index"])
def test_a_corrupt_file_is_refused_naming_it(tmp_path, damage):
    store = UserStore(tmp_path / "bank", schema=SCHEMA)
    store.put("alice", user_state(1.0))
    shard = store.shard("alice")
    path = shard / store.entry("alice")["parts"]["params"]["file"]
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:40])
    else:
        path = shard / "index.json"
        path.write_text(path.read_text()[:25])
    with pytest.raises(CorruptFile) as e:
        store.get("alice")
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg


def test_delete_removes_entry_files_and_stray_temporaries(tmp_path):
    store = UserStore(tmp_path / "bank", schema=SCHEMA)
    store.put_many({"alice": user_state(1.0), "bob": user_state(2.0)})
    shard = store.shard("alice")
    (shard / f".{user_hash('alice')}.params.x.safetensors.123.tmp").write_bytes(b"left by a crash")
    # An index write killed before its rename: a temporary copy of the leaf's index, naming alice.
    (shard / ".index.json.k3j2.tmp").write_bytes((shard / "index.json").read_bytes())
    assert store.delete("alice") and not store.delete("alice")
    assert "alice" not in store and "bob" in store
    leftovers = [p for p in (tmp_path / "bank").rglob("*") if p.is_file() and user_hash("alice") in p.name]
    assert leftovers == []
    for p in (tmp_path / "bank").rglob("*"):
        if p.is_file():
            assert b"alice" not in p.read_bytes(), p
    assert store.drop_part("bob", "adamw") and set(store.entry("bob")["parts"]) == {"params"}


def test_schema_is_checked(tmp_path):
    store = UserStore(tmp_path / "bank", schema=SCHEMA)
    with pytest.raises(ProperError, match="tensors differ"):
        store.put("alice", {"params": {"a": torch.zeros(2, 3)}})
    with pytest.raises(ProperError, match="no part"):
        store.put("alice", {"extra": {"a": torch.zeros(2, 3)}})
    with pytest.raises(ProperError, match="schema differs"):
        UserStore(tmp_path / "bank", schema={"params": {"a": (9,)}})
    with pytest.raises(ProperError, match="no user store"):
        UserStore(tmp_path / "nothing")


def _writer(root: str, prefix: str, n: int) -> None:
    store = UserStore(root)
    for i in range(n):
        store.put(f"{prefix}{i}", {"params": {"w": torch.tensor([float(i)])}})


def test_processes_writing_the_same_shards_lose_no_user(tmp_path):
    """Two processes (e.g. two ranks) writing users that share leaf directories: every entry survives."""
    root = tmp_path / "bank"
    store = UserStore(root, schema={"params": {"w": (1,)}})
    # Force one leaf for everyone, so that the two writers race on one index.
    ctx = mp.get_context("fork")
    orig = UserStore.shard
    UserStore.shard = lambda self, u: self.root / "shards" / "00" / "00"
    try:
        procs = [ctx.Process(target=_writer, args=(str(root), p, 40)) for p in ("a", "b")]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert all(p.exitcode == 0 for p in procs)
        assert sorted(store.users()) == sorted([f"a{i}" for i in range(40)] + [f"b{i}" for i in range(40)])
        assert float(store.get("b39")["params"]["w"]) == 39.0
    finally:
        UserStore.shard = orig
    os.sync()


def test_a_reader_retries_when_a_writer_removed_the_file_it_was_about_to_open(tmp_path, monkeypatch):
    store = UserStore(tmp_path / "bank", schema=SCHEMA)
    store.put("alice", user_state(1.0))
    real_index = UserStore._index
    calls = {"n": 0}

    def racing_index(self, shard: Path):
        index = real_index(self, shard)
        calls["n"] += 1
        if calls["n"] == 1:  # between our reading the index and opening the file, a writer replaces the user
            store.put("alice", user_state(5.0))
        return index

    monkeypatch.setattr(UserStore, "_index", racing_index)
    got = store.get("alice")
    assert torch.equal(got["params"]["a"], torch.full((2, 3), 5.0)) and calls["n"] >= 2
