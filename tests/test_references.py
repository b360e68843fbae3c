"""The classical rating references: user mean and item mean, hand-computed."""

import pytest

from properlm.data import get_task
from properlm.data.schema import Dataset, Item, Query, User
from properlm.evaluate.references import reference_predictions

P = "What is the score of the following movie on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 without further explanation. movie: "


def _item(i, text, score):
    return Item(str(i), {"text": text, "score": str(score)})


def test_user_and_item_means():
    a = User("a", [_item(1, "Alien: Resurrection (1997) | Sci-Fi", 2), _item(2, "Heat (1995) | Action", 4)],
             [Query("qa", P + "Heat (1995) | Action", "5")])
    b = User("b", [_item(3, "Heat (1995) | Action", 5), _item(4, "Fargo (1996) | Crime", 3)],
             [Query("qb", P + "Alien: Resurrection (1997) | Sci-Fi", "1"), Query("qc", P + "Unseen (2000) | Drama", "3")])
    ds = Dataset("movielens", [a, b])
    p = reference_predictions(get_task("movielens"), ds, [a, b])
    assert float(p["user-mean"]["qa"]) == pytest.approx(3.0)        # (2 + 4) / 2
    assert float(p["user-mean"]["qb"]) == pytest.approx(4.0)        # (5 + 3) / 2
    assert float(p["item-mean"]["qa"]) == pytest.approx(4.5)        # Heat: (4 + 5) / 2
    assert float(p["item-mean"]["qb"]) == pytest.approx(2.0)        # Alien (title with a colon): 2
    assert float(p["item-mean"]["qc"]) == pytest.approx(3.5)        # unseen: global (2+4+5+3)/4


def test_only_for_rating_tasks():
    with pytest.raises(ValueError):
        reference_predictions(get_task("synth-cls"), Dataset("synth-cls", []), [])


def test_evaluate_run_scores_references_without_a_model(tmp_path):
    """`user-mean`/`item-mean` go through evaluate_run like any method (no stage needed)."""
    from pathlib import Path

    from properlm.config import save_config
    from properlm.data import load_dataset
    from properlm.evaluate.evaluate import evaluate_run
    from properlm.evaluate.metrics import score
    from properlm.io import write_json
    from properlm.run_config import DataConfig, RunConfig

    fixture = Path(__file__).parent / "fixtures" / "lamp3"
    ds = load_dataset(fixture)
    cfg = RunConfig(base_model="tiny-random", data=DataConfig(path=str(fixture), n_targets=1))
    run = tmp_path / "run"
    save_config(cfg, run / "config.yaml")
    write_json(run / "split.json", {"task": ds.task, "train": [], "target": [u.id for u in ds.users]})
    res = evaluate_run(run, methods=["user-mean", "item-mean"], progress=False)
    preds = reference_predictions(get_task(ds.task), ds, ds.users)["user-mean"]
    golds = {q.id: q.gold for u in ds.users for q in u.queries}
    want = score("rating", [preds[k] for k in golds], [golds[k] for k in golds])
    assert res["methods"]["user-mean"]["metrics"]["mae"] == pytest.approx(want["mae"])
    assert (run / "eval" / "item-mean" / "predictions.json").exists()


def test_user_bm25_answers_with_the_closest_past_answer():
    """LaMP-5: the query's abstract is closest by BM25 to one past abstract, whose title is the answer;
    another user's history is never searched; no history gives the empty answer."""
    from properlm.evaluate.references import references_for, user_bm25_predictions

    q = "Generate a title for the following abstract of a paper: "
    a = User("a", [Item("1", {"title": "Sparse routing", "abstract": "mixture of experts routing sparse gates"}),
                   Item("2", {"title": "Graph kernels", "abstract": "kernels on graphs and walks"}),
                   Item("4", {"title": "Speech", "abstract": "audio models for speech"}),
                   Item("5", {"title": "Vision", "abstract": "image models for vision"})],
             [Query("qa1", q + "we study sparse gates for experts", "x"),
              Query("qa2", q + "random walks on graphs", "y")])
    b = User("b", [Item("3", {"title": "Other user's title", "abstract": "sparse gates experts routing walks graphs"}),
                   Item("6", {"title": "Proofs", "abstract": "lemma proof theorem"}),
                   Item("7", {"title": "Games", "abstract": "players games equilibrium"})],
             [Query("qb", q + "sparse gates", "z")])
    c = User("c", [], [Query("qc", q + "anything", "w")])
    p = user_bm25_predictions(get_task("LaMP-5"), [a, b, c])
    assert p == {"qa1": "Sparse routing", "qa2": "Graph kernels", "qb": "Other user's title", "qc": ""}
    assert references_for("generation") == ("user-bm25",)
    assert set(references_for("rating")) == {"user-mean", "item-mean", "user-bm25"}
