"""API keys: one admin key and per-user keys, stored only as salted hashes.

A key reads ``plm-<id>.<secret>``. ``RUN/serve/keys/<id[:2]>/<id>.json`` holds
its user, a random salt and ``sha256(salt + secret)`` (admin keys:
``RUN/serve/admin-keys/<id>.json``); the secret itself is never written. Checking a key reads one file,
whatever the number of users. The secrets are 256-bit random strings, so a
plain salted hash is enough (a slow password hash protects guessable
passwords, which these are not) and keeps the check cheap on every request.
A user's key ids are listed in ``RUN/serve/users/<h[:2]>/<h>.json`` (``h`` the
sha256 of the id) so that forgetting the user removes their keys.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from properlm.io import read_json, write_json
from properlm.store.user_store import user_hash


@dataclass(frozen=True)
class Identity:
    """Who a key belongs to: the admin, or one user."""

    admin: bool
    user: str | None = None


class Keys:
    """The keys of one served run (``RUN/serve``)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _key_path(self, kid: str, admin: bool = False) -> Path:
        if admin:
            return self.root / "admin-keys" / f"{kid}.json"
        return self.root / "keys" / kid[:2] / f"{kid}.json"

    def _user_path(self, user: str) -> Path:
        h = user_hash(user)
        return self.root / "users" / h[:2] / f"{h}.json"

    def issue(self, user: str | None) -> str:
        """A new key for ``user`` (None: an admin key); returns the key, which is not stored."""
        kid, secret, salt = secrets.token_hex(8), secrets.token_urlsafe(32), secrets.token_hex(16)
        digest = hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()
        if user is not None:  # the user's record lists the key before the key exists: forgetting finds it
            rec = self.user_record(user)
            rec["keys"] = [*rec.get("keys", []), kid]
            write_json(self._user_path(user), rec)
        write_json(self._key_path(kid, admin=user is None), {"id": kid, "admin": user is None, "user": user, "salt": salt,
                                         "sha256": digest, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        return f"plm-{kid}.{secret}"

    def user_record(self, user: str) -> dict:
        p = self._user_path(user)
        return read_json(p) if p.exists() else {"user": user, "keys": []}

    def check(self, key: str | None) -> Identity | None:
        """The key's identity, or None for a missing, malformed or wrong key."""
        if not key or not key.startswith("plm-") or "." not in key:
            return None
        kid, _, secret = key[4:].partition(".")
        if len(kid) != 16 or not all(c in "0123456789abcdef" for c in kid):
            return None
        rec = None
        for p in (self._key_path(kid), self._key_path(kid, admin=True)):
            try:
                rec = json.loads(p.read_text())
                break
            except (OSError, ValueError):
                continue
        if rec is None:
            return None
        digest = hashlib.sha256(bytes.fromhex(rec["salt"]) + secret.encode()).hexdigest()
        if not hmac.compare_digest(digest, rec["sha256"]):
            return None
        return Identity(admin=bool(rec["admin"]), user=rec.get("user"))

    def has_admin(self) -> bool:
        d = self.root / "admin-keys"
        return d.is_dir() and any(d.glob("*.json"))

    def forget(self, user: str) -> int:
        """Remove a user's keys and record; how many files were removed."""
        n = 0
        for kid in self.user_record(user).get("keys", []):
            p = self._key_path(kid)
            if p.exists():
                p.unlink()
                n += 1
        p = self._user_path(user)
        if p.exists():
            p.unlink()
            n += 1
        return n
