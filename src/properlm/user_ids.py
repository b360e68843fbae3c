"""Which strings may name a new user: one rule for the server's onboarding and ``properlm users add``.

A user id is also a model name on the server (``"model": "u007"``), a path segment
of its routes (``/v1/users/{id}/history``) and a line of ``properlm users list``,
so a new id must be usable in all three. The rule, checked by :func:`check_user_id`:

- 1 to :data:`MAX_USER_ID_CHARS` characters;
- not a name the server gives another meaning: ``base``, ``properlm``
  (:data:`RESERVED_USER_IDS`);
- not ``.`` or ``..`` (path segments with a meaning of their own);
- no control characters, line or paragraph separators (they break lines of
  logs and listings), and no ``/`` (it cannot be one segment of a URL path).

Ids already in a run are not checked again (deleting one works whatever it is);
the rule applies where a user is added. This module imports nothing of properlm
but :mod:`properlm.errors`, so every layer may use it.
"""

from __future__ import annotations

import unicodedata

from properlm.errors import ProperError

#: The longest user id, in characters.
MAX_USER_ID_CHARS = 128
#: Model names with another meaning on the server: the non-personalized model and the run's own name.
RESERVED_USER_IDS = ("base", "properlm")
#: Unicode categories refused: control and format characters, line and paragraph separators.
_REFUSED_CATEGORIES = ("Cc", "Cf", "Zl", "Zp")


class BadUserId(ProperError, ValueError):
    """A string that may not name a new user; the message says which rule it breaks."""


def user_id_problem(user_id: object) -> str | None:
    """Which rule ``user_id`` breaks, in a few words, or None when it may name a new user."""
    if not isinstance(user_id, str):
        return f"must be a string, not {type(user_id).__name__}"
    if not user_id:
        return "must not be empty"
    if len(user_id) > MAX_USER_ID_CHARS:
        return f"must be at most {MAX_USER_ID_CHARS} characters (it has {len(user_id)})"
    if user_id in RESERVED_USER_IDS:
        return f"{user_id!r} is reserved (the server's model names {', '.join(RESERVED_USER_IDS)})"
    if user_id in (".", ".."):
        return "must not be '.' or '..'"
    if "/" in user_id:
        return "must not contain '/'"
    bad = next((c for c in user_id if unicodedata.category(c) in _REFUSED_CATEGORIES), None)
    if bad is not None:
        return f"must not contain control characters (it contains U+{ord(bad):04X})"
    return None


def check_user_id(user_id: object) -> str:
    """``user_id`` itself when it may name a new user.

    Raises:
        BadUserId: naming the rule it breaks (never echoing the id, which may hold anything).
    """
    problem = user_id_problem(user_id)
    if problem is not None:
        raise BadUserId(f"user id {problem}")
    return user_id  # type: ignore[return-value]
