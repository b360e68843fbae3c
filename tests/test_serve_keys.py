"""API keys on disk: salted hashes only, and forgetting a user removes every key file, even after a crash."""

from __future__ import annotations

from unittest import mock

import pytest

from properlm.serve import keys as keys_mod
from properlm.serve.keys import Keys


def files_naming(root, text: str) -> list:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def test_keys_are_stored_hashed_and_checked(tmp_path):
    keys = Keys(tmp_path / "serve")
    key = keys.issue("alice")
    assert keys.check(key).user == "alice" and not keys.check(key).admin
    assert keys.check(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    secret = key.partition(".")[2]
    assert files_naming(tmp_path, secret) == []


def test_forget_after_an_issue_killed_midway_leaves_no_key_of_the_user(tmp_path):
    """A crash between the two writes of ``issue`` (the user's record and the key file) must not
    leave a key file that forgetting the user cannot find."""
    keys = Keys(tmp_path / "serve")
    keys.issue("alice")
    real = keys_mod.write_json
    calls = []

    def crash_on_second(path, obj):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real(path, obj)

    with mock.patch.object(keys_mod, "write_json", crash_on_second), pytest.raises(KeyboardInterrupt):
        keys.issue("alice")
    keys.forget("alice")
    assert files_naming(tmp_path, "alice") == []
