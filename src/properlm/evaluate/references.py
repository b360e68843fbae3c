"""References without a model: the user's and the item's mean rating, and the user's closest past answer.

Numbers a user of a task asks for before believing an LLM. For a rating task
(LaMP-3, MovieLens): how well does predicting the user's own average rating do,
and how well does predicting the item's average rating over everyone's history
do? Predictions are the unrounded means as text, scored with the same MAE/RMSE
code as every method. For any task: how well does answering with the user's own
past answer to the most similar past input do (``user-bm25``: LaMP's BM25
retrieval of the top-1 history item, whose answer is returned as it is)? On a
generation task that is the score of copying the user's style without writing
anything new.
"""

from __future__ import annotations

import re
from collections import defaultdict

from properlm.data.schema import Dataset, User
from properlm.data.tasks import Task
from properlm.evaluate.retrieval import bm25_top_k, rag_style

RATING_REFERENCES = ("user-mean", "item-mean")
#: Every reference: the rating ones, and ``user-bm25`` for any task.
REFERENCES = RATING_REFERENCES + ("user-bm25",)
_MARKER = re.compile(r"\b(?:movie|review): ")


def _score(item_fields: dict[str, str], task: Task) -> float | None:
    raw = item_fields.get(task.answer_field) if getattr(task, "answer_field", None) else item_fields.get("score")
    try:
        return float(raw)
    except (TypeError, ValueError):
        return None


def _item_key(text: str) -> str:
    return " ".join(text.split()).lower()


def reference_predictions(task: Task, ds: Dataset, targets: list[User]) -> dict[str, dict[str, str]]:
    """``{"user-mean": {query_id: pred}, "item-mean": {...}}`` for the targets' queries.

    user-mean: the mean of the user's history ratings (the global mean for an
    empty history). item-mean: the mean rating of the query's item over every
    user's history in ``ds`` (the global mean for an item nobody rated). The
    query's item is its text after the task's ``movie:``/``review:`` marker.

    Raises:
        ValueError: the task is not a rating task.
    """
    if task.kind != "rating":
        raise ValueError(f"classical references are for rating tasks; {task.name} is {task.kind}")
    item_scores: dict[str, list[float]] = defaultdict(list)
    all_scores: list[float] = []
    for u in ds.users:
        for it in u.history:
            s = _score(it.fields, task)
            if s is not None:
                item_scores[_item_key(it.fields.get("text", ""))].append(s)
                all_scores.append(s)
    global_mean = sum(all_scores) / len(all_scores) if all_scores else 3.0
    out: dict[str, dict[str, str]] = {"user-mean": {}, "item-mean": {}}
    for u in targets:
        own = [s for s in (_score(it.fields, task) for it in u.history) if s is not None]
        um = sum(own) / len(own) if own else global_mean
        for q in u.queries:
            m = _MARKER.search(q.input)  # the first marker: titles may hold colons of their own
            text = q.input[m.end():] if m else q.input
            scores = item_scores.get(_item_key(text))
            out["user-mean"][q.id] = f"{um:.4f}"
            out["item-mean"][q.id] = f"{(sum(scores) / len(scores)) if scores else global_mean:.4f}"
    return out


def references_for(kind: str) -> tuple[str, ...]:
    """The references that apply to a task of this kind."""
    return REFERENCES if kind == "rating" else ("user-bm25",)


def user_bm25_predictions(task: Task, targets: list[User]) -> dict[str, str]:
    """``{query_id: answer}``: the answer of the user's history item closest to the query by BM25.

    Retrieval is RAG's (:func:`properlm.evaluate.retrieval.rag_style`: the same corpus
    text and query extraction, LaMP's BM25Okapi on whitespace tokens). A user with no history answers
    with the empty string.
    """
    style = rag_style(task)
    out: dict[str, str] = {}
    for u in targets:
        corpus = [style.corpus(it.fields) for it in u.history]
        for q in u.queries:
            query = style.query(q.input)
            best = bm25_top_k(corpus, u.history, q.input if query is None else query, k=1)
            out[q.id] = best[0].fields.get(task.answer_field, "") if best else ""
    return out
