"""LaMP metrics against values worked out by hand (arithmetic in the comments)."""

from __future__ import annotations

import math
import warnings

import pytest

from properlm.evaluate.metrics import (
    HIGHER_IS_BETTER,
    accuracy,
    macro_f1,
    mae,
    parse_rating,
    per_example_scores,
    rmse,
    rouge,
    score,
)

LABELS = ["[1]", "[2]"]
GENRES = ["comedy", "action", "drama"]


# --- classification -------------------------------------------------------


def test_accuracy_strips_and_rejects_non_labels():
    preds = ["  [1]\n", "[2]", "1", "[2]"]  # stripped -> correct; correct; not a label; wrong
    golds = ["[1]", "[2]", "[1]", "[1]"]
    # 2 correct of 4
    assert accuracy(preds, golds, LABELS) == 0.5
    assert accuracy(preds, golds) == 0.5


def test_macro_f1_binary_by_hand():
    preds = ["  [1]\n", "[2]", "1", "[2]"]
    golds = ["[1]", "[2]", "[1]", "[1]"]
    # "[1]": TP=1 (ex0), FP=0, FN=2 (ex2 not a label, ex3 predicted [2]) -> 2/(2+0+2) = 1/2
    # "[2]": TP=1 (ex1), FP=1 (ex3), FN=0                                  -> 2/(2+1+0) = 2/3
    # "1" is class -1: an FN for "[1]" but an FP for no class.
    assert macro_f1(preds, golds, LABELS) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_macro_f1_counts_labels_never_seen_as_zero():
    preds = ["comedy", "comedy", "action"]
    golds = ["comedy", "action", "action"]
    # comedy: TP=1 FP=1 FN=0 -> 2/3; action: TP=1 FP=0 FN=1 -> 2/3;
    # drama: never predicted nor gold -> 0 (sklearn's zero_division default).
    # macro = (2/3 + 2/3 + 0) / 3 = 4/9
    assert macro_f1(preds, golds, GENRES) == pytest.approx(4 / 9)
    # All correct, yet one of three labels unseen: (1 + 0 + 0)/3 for a one-label set.
    assert macro_f1(["drama"], ["drama"], GENRES) == pytest.approx(1 / 3)


def test_macro_f1_matches_sklearn_as_lamp_calls_it():
    sklearn = pytest.importorskip("sklearn.metrics")
    preds = ["comedy", "sci-fi", "drama", "action", " drama ", "comedy", "x"]
    golds = ["comedy", "action", "drama", "action", "comedy", "drama", "action"]
    index = {lab: i for i, lab in enumerate(GENRES)}
    p = [index.get(x.strip(), -1) for x in preds]
    g = [index[x] for x in golds]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = sklearn.f1_score(g, p, labels=list(range(len(GENRES))), average="macro")
    assert macro_f1(preds, golds, GENRES) == pytest.approx(expected)


def test_classification_gold_outside_labels_is_an_error():
    with pytest.raises(ValueError, match="not in the label list"):
        macro_f1(["comedy"], ["western"], GENRES)


# --- rating ---------------------------------------------------------------


def test_unparseable_rating_counts_as_farther_end():
    # gold 2: |1-2|=1, |5-2|=3 -> counts as 5, error 3
    assert parse_rating("five stars", 2.0) == 5.0
    # gold 4: |1-4|=3 > |5-4|=1 -> counts as 1, error 3
    assert parse_rating("", 4.0) == 1.0
    # gold 3: both 2 away; LaMP's strict ">" picks 5
    assert parse_rating("?", 3.0) == 5.0
    # gold 1 -> 5, gold 5 -> 1
    assert parse_rating("x", 1.0) == 5.0 and parse_rating("x", 5.0) == 1.0


def test_rating_parses_like_float_without_clamping():
    assert parse_rating(" 4 \n", 1.0) == 4.0
    assert parse_rating("3.5", 1.0) == 3.5
    assert parse_rating("7", 5.0) == 7.0  # LaMP keeps out-of-range numbers
    assert parse_rating("nan", 2.0) == 5.0  # departure: non-finite counts as unparseable
    assert parse_rating("inf", 4.0) == 1.0


def test_mae_rmse_by_hand():
    preds = ["3", "bad", "meh", "2 ", "oops"]
    golds = ["3", "2", "4", "5", 3]
    # errors: |3-3|=0; bad->5 vs 2: 3; meh->1 vs 4: 3; |2-5|=3; oops->5 vs 3: 2
    # MAE = (0+3+3+3+2)/5 = 11/5 = 2.2
    # RMSE = sqrt((0+9+9+9+4)/5) = sqrt(31/5) = sqrt(6.2)
    assert mae(preds, golds) == pytest.approx(2.2)
    assert rmse(preds, golds) == pytest.approx(math.sqrt(6.2))
    per = per_example_scores("rating", preds, golds)
    assert per["abs_error"] == [0.0, 3.0, 3.0, 3.0, 2.0]
    assert per["squared_error"] == [0.0, 9.0, 9.0, 9.0, 4.0]


def test_rating_gold_not_a_number_is_an_error():
    with pytest.raises(ValueError, match="not a number"):
        mae(["3"], ["three"])


# --- generation -----------------------------------------------------------


def test_rouge_by_hand():
    preds = ["Mat on the cat!", "dog"]
    golds = ["the cat sat on the mat", "cat"]
    # ex0 tokens (lowercased, punctuation dropped): pred [mat on the cat] (4),
    #   gold [the cat sat on the mat] (6).
    #   ROUGE-1: clipped overlap mat,on,the,cat = 4 -> P=4/4, R=4/6, F=2*4/(4+6)=0.8
    #   ROUGE-L: LCS = 2 ("the cat" or "on the") -> F = 2*2/(4+6) = 0.4
    # ex1: no overlap -> 0 and 0.
    r = rouge(preds, golds)
    assert r["rouge-1"] == pytest.approx((0.8 + 0.0) / 2)
    assert r["rouge-L"] == pytest.approx((0.4 + 0.0) / 2)
    per = per_example_scores("generation", preds, golds)
    assert per["rouge-1"] == pytest.approx([0.8, 0.0])
    assert per["rouge-L"] == pytest.approx([0.4, 0.0])


def test_rouge_clips_repeated_words():
    # pred [the the the] vs gold [the cat]: overlap min(3,1)=1 -> P=1/3 R=1/2 F=2/(3+2)=0.4
    assert rouge(["the the the"], ["the cat"])["rouge-1"] == pytest.approx(0.4)


# --- dispatch and validation ----------------------------------------------


def test_score_dispatch_keys_and_directions():
    c = score("classification", ["[1]"], ["[1]"], LABELS)
    assert c == {"accuracy": 1.0, "f1": pytest.approx(0.5)}  # "[2]" unseen -> (1+0)/2
    assert set(score("rating", ["1"], ["1"])) == {"mae", "rmse"}
    assert set(score("generation", ["a"], ["a"])) == {"rouge-1", "rouge-L"}
    for kind, labels in [("classification", LABELS), ("rating", None), ("generation", None)]:
        assert set(score(kind, ["1"], ["[1]" if labels else "1"], labels)) <= set(HIGHER_IS_BETTER)
    assert per_example_scores("classification", [" [2]", "x"], ["[2]", "[1]"], LABELS) == {"correct": [1.0, 0.0]}


@pytest.mark.parametrize("kind", ["classification", "rating", "generation"])
def test_mismatched_and_empty_inputs_raise(kind):
    labels = LABELS if kind == "classification" else None
    with pytest.raises(ValueError, match="2 predictions but 1 golds"):
        score(kind, ["[1]", "[1]"], ["[1]"] if labels else ["1"], labels)
    with pytest.raises(ValueError, match="empty"):
        score(kind, [], [], labels)
    with pytest.raises(ValueError, match="empty"):
        per_example_scores(kind, [], [], labels)


def test_bad_kind_or_missing_labels_raise():
    with pytest.raises(ValueError, match="unknown task kind"):
        score("ranking", ["a"], ["a"])
    with pytest.raises(ValueError, match="label list"):
        score("classification", ["a"], ["a"])
