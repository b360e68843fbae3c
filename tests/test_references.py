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
