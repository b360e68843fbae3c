"""LaMP's metrics, reproduced without ``evaluate.load`` (which fetches from a hub).

LaMP scores its tasks in three ways (``eval/evaluation.py`` and
``LaMP/metrics/*.py`` in LaMP-Benchmark/LaMP):

* classification (LaMP-1, LaMP-2): accuracy and macro F1. Predictions and golds
  are ``str(x).strip()``-ped and looked up in the task's label list; a string that
  is not exactly a label becomes class -1, which is never correct and belongs to
  no class F1 is averaged over. Macro F1 is sklearn's ``f1_score(average="macro",
  labels=range(len(labels)))``: every label of the list counts, so a label that is
  neither predicted nor gold in the evaluated set adds an F1 of 0 (sklearn's
  ``zero_division`` default) and pulls the average down.
* rating (LaMP-3): MAE and RMSE. A prediction is parsed with ``float(x.strip())``;
  a number is taken as it is, even outside 1..5 (LaMP does not clamp); text that
  does not parse counts as whichever of 1 or 5 is farther from the gold, and 5
  when both are equally far (gold 3).
* generation (LaMP-4..7): ROUGE-1 and ROUGE-L F-measure from ``rouge_score``
  without stemming, averaged over examples. LaMP reports HF ``evaluate``'s
  bootstrap "mid" score, which equals this mean up to resampling noise.

Two deliberate departures, both only for input LaMP would mishandle:
``float`` also parses "nan" and "inf", which would turn LaMP's MAE into nan or
inf; here they count as unparseable. A gold outside the label list is a data bug
(LaMP would map it to -1 and count a -1 prediction as correct); here it raises.
"""

from __future__ import annotations

import math
from typing import Sequence

from rouge_score import rouge_scorer

TASK_KINDS = ("classification", "rating", "generation")

#: Direction of each metric ``score`` returns, for picking the best checkpoint.
HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True,
    "f1": True,
    "mae": False,
    "rmse": False,
    "rouge-1": True,
    "rouge-L": True,
}

# LaMP's rating scale; an unparseable prediction is pushed to its far end.
_RATING_MIN, _RATING_MAX = 1.0, 5.0


def _check(preds: Sequence, golds: Sequence) -> None:
    """Raise ValueError on empty or mismatched inputs (metrics of nothing are undefined)."""
    if len(preds) != len(golds):
        raise ValueError(f"got {len(preds)} predictions but {len(golds)} golds; they must pair one to one")
    if len(preds) == 0:
        raise ValueError("no predictions to score (empty input)")


# --- classification -------------------------------------------------------


def _class_indices(preds: Sequence, golds: Sequence, labels: Sequence[str]) -> tuple[list[int], list[int]]:
    """Map stripped predictions and golds to label indices; unknown predictions -> -1."""
    _check(preds, golds)
    if not labels:
        raise ValueError("classification needs a non-empty label list")
    index = {label: i for i, label in enumerate(labels)}
    p = [index.get(str(x).strip(), -1) for x in preds]
    g = []
    for j, x in enumerate(golds):
        gi = index.get(str(x).strip(), -1)
        if gi < 0:
            raise ValueError(f"gold #{j} {str(x)!r} is not in the label list {list(labels)}")
        g.append(gi)
    return p, g


def accuracy(preds: Sequence[str], golds: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """Fraction of predictions that, stripped, equal their gold exactly.

    Args:
        preds: generated answers, one per example.
        golds: gold answers, one per example.
        labels: the task's label list; when given, golds are checked against it.
            Accuracy does not otherwise depend on it: a prediction outside the
            list never equals a (valid) gold.

    Returns:
        Accuracy in [0, 1].
    """
    if labels is not None:
        p, g = _class_indices(preds, golds, labels)
        return sum(a == b for a, b in zip(p, g)) / len(g)
    _check(preds, golds)
    return sum(str(a).strip() == str(b).strip() for a, b in zip(preds, golds)) / len(golds)


def macro_f1(preds: Sequence[str], golds: Sequence[str], labels: Sequence[str]) -> float:
    """Macro F1 over the full label list, as LaMP computes it with sklearn.

    Per label, F1 = 2 TP / (2 TP + FP + FN), and 0 when that denominator is 0
    (the label was neither predicted nor gold): this is sklearn's value with its
    default ``zero_division``. A prediction outside the list is an FN for its
    gold's label and an FP for no label.

    Args:
        preds: generated answers, one per example (stripped before lookup).
        golds: gold answers, each one of ``labels``.
        labels: the task's full label list, in any order.

    Returns:
        The unweighted mean of the per-label F1 scores, in [0, 1].
    """
    p, g = _class_indices(preds, golds, labels)
    n = len(labels)
    tp, fp, fn = [0] * n, [0] * n, [0] * n
    for pi, gi in zip(p, g):
        if pi == gi:
            tp[gi] += 1
        else:
            fn[gi] += 1
            if pi >= 0:
                fp[pi] += 1
    f1s = [2 * t / (2 * t + a + b) if (2 * t + a + b) else 0.0 for t, a, b in zip(tp, fp, fn)]
    return sum(f1s) / n


# --- rating ---------------------------------------------------------------


def parse_rating(pred: str, gold: float) -> float:
    """Read a rating prediction the way LaMP does.

    Args:
        pred: the generated text.
        gold: the gold rating, used only to choose the fallback.

    Returns:
        ``float(pred.strip())`` when that is a finite number (not clamped to 1..5);
        otherwise 1.0 if 1 is farther from ``gold`` than 5 is, else 5.0.
    """
    try:
        value = float(str(pred).strip())
        if math.isfinite(value):
            return value
    except ValueError:
        pass
    return _RATING_MIN if abs(_RATING_MIN - gold) > abs(_RATING_MAX - gold) else _RATING_MAX


def _abs_errors(preds: Sequence[str], golds: Sequence) -> list[float]:
    _check(preds, golds)
    errors = []
    for j, (p, g) in enumerate(zip(preds, golds)):
        try:
            gv = float(str(g).strip())
        except ValueError:
            raise ValueError(f"gold #{j} {g!r} is not a number") from None
        errors.append(abs(parse_rating(p, gv) - gv))
    return errors


def mae(preds: Sequence[str], golds: Sequence) -> float:
    """Mean absolute error of rating predictions (see :func:`parse_rating`)."""
    errors = _abs_errors(preds, golds)
    return sum(errors) / len(errors)


def rmse(preds: Sequence[str], golds: Sequence) -> float:
    """Root mean squared error of rating predictions (see :func:`parse_rating`)."""
    errors = _abs_errors(preds, golds)
    return math.sqrt(sum(e * e for e in errors) / len(errors))


# --- generation -----------------------------------------------------------

_scorer: rouge_scorer.RougeScorer | None = None


def _rouge_per_example(preds: Sequence[str], golds: Sequence[str]) -> tuple[list[float], list[float]]:
    global _scorer
    _check(preds, golds)
    if _scorer is None:  # built once: construction loads the tokenizer
        _scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    r1, rl = [], []
    for p, g in zip(preds, golds):
        # score(target, prediction): the order matters for precision vs recall.
        s = _scorer.score(str(g).strip(), str(p).strip())
        r1.append(s["rouge1"].fmeasure)
        rl.append(s["rougeL"].fmeasure)
    return r1, rl


def rouge(preds: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """ROUGE-1 and ROUGE-L F-measure, averaged over examples.

    ``rouge_score``'s default tokenizer lowercases and splits on anything that
    is not ``[a-z0-9]``, so punctuation and non-Latin text carry no weight.

    Returns:
        ``{"rouge-1": ..., "rouge-L": ...}``, each in [0, 1].
    """
    r1, rl = _rouge_per_example(preds, golds)
    return {"rouge-1": sum(r1) / len(r1), "rouge-L": sum(rl) / len(rl)}


# --- dispatch -------------------------------------------------------------


def _check_kind(task_kind: str, labels: Sequence[str] | None) -> None:
    if task_kind not in TASK_KINDS:
        raise ValueError(f"unknown task kind {task_kind!r}; expected one of {', '.join(TASK_KINDS)}")
    if task_kind == "classification" and not labels:
        raise ValueError("classification scoring needs the task's label list (labels=...)")


def score(
    task_kind: str, preds: Sequence[str], golds: Sequence, labels: Sequence[str] | None = None
) -> dict[str, float]:
    """LaMP's metrics for one task kind.

    Args:
        task_kind: "classification", "rating" or "generation".
        preds: generated answers, one per example.
        golds: gold answers, in the same order.
        labels: the label list; required for "classification".

    Returns:
        ``{"accuracy", "f1"}``, ``{"mae", "rmse"}`` or ``{"rouge-1", "rouge-L"}``.

    Raises:
        ValueError: unknown kind, missing labels, empty or mismatched inputs.
    """
    _check_kind(task_kind, labels)
    if task_kind == "classification":
        return {"accuracy": accuracy(preds, golds, labels), "f1": macro_f1(preds, golds, labels)}
    if task_kind == "rating":
        return {"mae": mae(preds, golds), "rmse": rmse(preds, golds)}
    return rouge(preds, golds)


def per_example_scores(
    task_kind: str, preds: Sequence[str], golds: Sequence, labels: Sequence[str] | None = None
) -> dict[str, list[float]]:
    """Per-example values from which ``score``'s metrics are means, for per-user splits.

    Macro F1 has no per-example form; recompute it with :func:`score` on a
    subset instead.

    Returns:
        classification: ``{"correct": [0/1, ...]}`` (mean = accuracy);
        rating: ``{"abs_error": [...], "squared_error": [...]}`` (mean = MAE;
        sqrt of mean = RMSE); generation: ``{"rouge-1": [...], "rouge-L": [...]}``.
    """
    _check_kind(task_kind, labels)
    if task_kind == "classification":
        p, g = _class_indices(preds, golds, labels)
        return {"correct": [float(a == b) for a, b in zip(p, g)]}
    if task_kind == "rating":
        errors = _abs_errors(preds, golds)
        return {"abs_error": errors, "squared_error": [e * e for e in errors]}
    r1, rl = _rouge_per_example(preds, golds)
    return {"rouge-1": r1, "rouge-L": rl}
