"""The one in-memory form every loader produces and every stage consumes.

A :class:`Dataset` is a task plus its users; each :class:`User` has history
items (their past behaviour, the training signal for personalization) and
queries (held-out inputs with golds). Loaders for LaMP, OPPU, MovieLens, JSONL
logs and the synthetic generator all return this form; the exporter writes it
back out in LaMP's layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Item:
    """One history item of a user, with LaMP's raw profile fields.

    Attributes:
        id: the item id (unique within its user).
        fields: the raw profile fields as strings, e.g. ``{"text": ..., "score": "4"}``
            for LaMP-3 or ``{"description": ..., "tag": ...}`` for LaMP-2M. The
            task's template (``properlm.data.tasks``) turns them into a
            (prompt, answer) training pair.
        date: ``YYYY-MM-DD`` or other sortable time stamp, if known.
    """

    id: str
    fields: dict[str, str]
    date: str | None = None


@dataclass
class Query:
    """One query of a user: the full prompt text and, if known, its gold answer.

    Attributes:
        id: the query id, unique across the dataset (LaMP's question id).
        input: the full prompt as LaMP gives it (instruction included).
        gold: the gold output, or ``None`` when no golds were loaded.
    """

    id: str
    input: str
    gold: str | None = None


@dataclass
class User:
    """A user: history items in time order, queries, and optional ground truth.

    Attributes:
        id: the user id (unique within the dataset).
        history: past items, oldest first.
        queries: held-out queries.
        group: the planted group of a synthetic user (``None`` for real data).
        meta: free-form extra facts (e.g. MovieLens demographics).
    """

    id: str
    history: list[Item] = field(default_factory=list)
    queries: list[Query] = field(default_factory=list)
    group: int | None = None
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class Dataset:
    """A task and its users.

    Attributes:
        task: a task name known to ``properlm.data.tasks`` (e.g. ``LaMP-3``,
            ``movielens``, ``synth-cls``).
        users: the users, in a stable order.
        source: where it was loaded from (a path or a description), for messages.
        meta: free-form facts about the dataset (e.g. the synthetic generator's
            settings, number of planted groups).
    """

    task: str
    users: list[User]
    source: str = ""
    meta: dict = field(default_factory=dict)

    def user(self, user_id: str) -> User:
        """Return the user with this id (``KeyError`` if absent)."""
        for u in self.users:
            if u.id == user_id:
                return u
        raise KeyError(user_id)
