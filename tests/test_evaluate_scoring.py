"""Scoring known predictions to hand-computed numbers, and LaMP-style retrieval prompts (no model)."""

from __future__ import annotations

import math

import pytest

from properlm.data.schema import Item, Query, User
from properlm.data.tasks import get_task
from properlm.errors import ProperError
from properlm.evaluate.evaluate import canonical_method, lamp_predictions, score_predictions
from properlm.evaluate.retrieval import (add_after_title, bm25_top_k, pag_prompt, profile_prompt, rag_prompt,
                                         strings_between_quotes)


def _user(uid: str, n_hist: int, golds: list[str | None], prefix: str = "q") -> User:
    history = [Item(id=f"{uid}-h{i}", fields={"text": f"item {i}", "label": "love"}) for i in range(n_hist)]
    queries = [Query(id=f"{uid}-{prefix}{i}", input=f"input {i}", gold=g) for i, g in enumerate(golds)]
    return User(id=uid, history=history, queries=queries)


# --- known predictions, known numbers ----------------------------------------------------------


def test_classification_scores_by_hand():
    a, b = _user("a", 2, ["love", "like"]), _user("b", 5, ["hate", None])
    preds = {"a-q0": "love", "a-q1": "hate", "b-q0": " hate\n"}  # b-q1 has no gold: not scored
    metrics, rows = score_predictions("synth-cls", [a, b], preds)
    # overall: preds [love, hate, hate] vs golds [love, like, hate] -> 2 of 3 correct
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    # F1 per label over (love, like, dislike, hate): love 2*1/(2*1+0+0)=1; like TP0 FN1 -> 0;
    # dislike never seen -> 0; hate TP1 FP1 (gold like) -> 2/(2+1)=2/3; mean (1+0+0+2/3)/4 = 5/12
    assert metrics["f1"] == pytest.approx(5 / 12)
    assert [r["user_id"] for r in rows] == ["a", "b"]
    assert rows[0] == {"user_id": "a", "history_len": 2, "n_queries": 2, "accuracy": 0.5,
                       "f1": pytest.approx(1 / 4)}  # love 1, like 0, hate TP0 FP1 -> 0, dislike 0
    assert rows[1] == {"user_id": "b", "history_len": 5, "n_queries": 1, "accuracy": 1.0, "f1": 0.25}
    _, rows = score_predictions("synth-cls", [a, b], preds, history_lengths={"a": 40})  # e.g. before data.max_history
    assert [r["history_len"] for r in rows] == [40, 5]


def test_rating_scores_by_hand():
    a, b = _user("a", 1, ["5", "1"]), _user("b", 3, ["3"])
    preds = {"a-q0": "4", "a-q1": "five", "b-q0": "3"}
    metrics, rows = score_predictions("LaMP-3", [a, b], preds)
    # errors: |4-5|=1; "five" unparseable, gold 1 -> counts as 5 (farther) -> 4; |3-3|=0
    assert metrics["mae"] == pytest.approx(5 / 3)
    assert metrics["rmse"] == pytest.approx(math.sqrt(17 / 3))
    assert rows[0]["mae"] == pytest.approx(2.5) and rows[0]["rmse"] == pytest.approx(math.sqrt(17 / 2))
    assert rows[1]["mae"] == 0.0


def test_generation_scores_by_hand():
    a, b = _user("a", 1, ["honestly, jazz is the best"]), _user("b", 1, ["sadly, chess bores me"])
    preds = {"a-q0": "jazz is the best", "b-q0": ""}
    metrics, rows = score_predictions("synth-gen", [a, b], preds)
    # a: 4 of 5 gold words (the comma is not a token): P=1, R=4/5 -> F=8/9 for ROUGE-1 and ROUGE-L; b: 0
    assert metrics["rouge-1"] == pytest.approx(4 / 9)
    assert metrics["rouge-L"] == pytest.approx(4 / 9)
    assert rows[0]["rouge-1"] == pytest.approx(8 / 9) and rows[1]["rouge-L"] == 0.0


def test_missing_prediction_or_no_gold_is_an_error():
    a = _user("a", 1, ["love", "like"])
    with pytest.raises(ProperError, match="a-q1"):
        score_predictions("synth-cls", [a], {"a-q0": "love"})
    with pytest.raises(ProperError, match="nothing to score"):
        score_predictions("synth-cls", [_user("b", 1, [None])], {"b-q0": "love"})


def test_lamp_prediction_layout():
    out = lamp_predictions(get_task("LaMP-3"), {"310": "4", "311": "2"})
    assert out == {"task": "LaMP_3", "golds": [{"id": "310", "output": "4"}, {"id": "311", "output": "2"}]}


def test_method_names():
    assert canonical_method("stage3") == "proper"
    assert canonical_method("oppu-kv") == "oppu-kv"
    with pytest.raises(ProperError, match="unknown method"):
        canonical_method("icl")


# --- retrieval --------------------------------------------------------------------------------


def _reviews() -> list[Item]:
    return [Item("r0", {"text": "the battery died after a week", "score": "1"}),
            Item("r1", {"text": "fast shipping and a great phone", "score": "5"}),
            Item("r2", {"text": "okay case nothing special", "score": "3"})]


def test_bm25_picks_the_matching_item():
    items = _reviews()
    top = bm25_top_k([it.fields["text"] for it in items], items, "great phone with fast shipping", k=1)
    assert [it.id for it in top] == ["r1"]
    assert bm25_top_k([], [], "anything") == []
    assert len(bm25_top_k(["a", "b"], items[:2], "a", k=5)) == 2


def test_rag_prompt_lamp3_phrasing():
    task = get_task("LaMP-3")
    q = task.prompt_template.format(text="great phone, arrived fast")
    # LaMP's query is the text after "review:"; the item reads '<score> is the score for "<text>" '
    assert rag_prompt(task, q, _reviews()) == f'5 is the score for "fast shipping and a great phone" . {q}'
    assert rag_prompt(task, q, []) == q


def test_rag_prompt_lamp1_inserts_after_title():
    task = get_task("LaMP-1")
    q = ('For an author who has written the paper with the title "Deep nets", which reference is related? '
         'Just answer with [1] or [2] without explanation. [1]: "Graph kernels" [2]: "Convolutional nets"')
    assert strings_between_quotes(q) == ["Deep nets", "Graph kernels", "Convolutional nets"]
    # BM25 needs a term in fewer than half of the items to score it (idf > 0), and is case-sensitive
    hist = [Item("p0", {"title": "Pooling in nets", "abstract": "Convolutional nets pool"}),
            Item("p1", {"title": "Kernels", "abstract": "spectral theory"}),
            Item("p2", {"title": "Parsing", "abstract": "grammars"})]
    out = rag_prompt(task, q, hist)
    assert out.startswith('For an author who has written the paper with the title, and "Pooling in nets" "Deep nets"')
    assert add_after_title("no such word", "x") == "no such word"


def test_rag_prompt_synthetic_task_and_token_budget():
    from properlm.model.base import load_tokenizer

    task = get_task("synth-cls")
    hist = [Item("h0", {"text": "my neighbour talked about jazz " * 40, "label": "love"}),
            Item("h1", {"text": "a video about taxes", "label": "hate"}),
            Item("h2", {"text": "reading on soccer", "label": "like"})]
    q = task.prompt_template.format(text="a long post about jazz")
    assert rag_prompt(task, q, hist).startswith('the label for "my neighbour')  # query after "post:" matches h0
    tok = load_tokenizer("tiny-random")
    cut = rag_prompt(task, q, hist, tok=tok, max_length=64)
    assert cut.endswith(q) and '"love"' in cut
    assert len(tok(cut)["input_ids"]) <= 64 < len(tok(rag_prompt(task, q, hist))["input_ids"])


def test_profile_prompt_is_seeded_and_short():
    task = get_task("LaMP-3")
    hist = [Item(f"r{i}", {"text": f"review number {i} " + "word " * 300, "score": str(1 + i % 5)}) for i in range(25)]
    p1, p2 = profile_prompt(task, "u1", hist, seed=0), profile_prompt(task, "u1", hist, seed=0)
    assert p1 == p2 and p1 != profile_prompt(task, "u2", hist, seed=0)
    assert p1.startswith("Based on this user’s past reviews") and p1.endswith(" Answer:")
    assert p1.count(" | ") == 9  # 10 of 25 items
    assert all(len(part.split()) <= 200 + 4 for part in p1.split(" | ")[1:-1])  # 200 words + "review:" "score: n"
    assert pag_prompt("likes 5", "Q") == "likes 5\nQ" and pag_prompt("", "Q") == "Q"
