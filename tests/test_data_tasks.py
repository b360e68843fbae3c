"""Task registry: spellings, prompts in LaMP's wording, OPPU-style history pairs."""

import pytest

from properlm.data import TASKS, get_task
from properlm.data.schema import Item, Query
from properlm.errors import ConfigError


@pytest.mark.parametrize("name", ["LaMP-3", "LaMP_3", "lamp3", "lamp-3", "product_rating", "LAMP 3"])
def test_spellings_name_the_same_task(name):
    assert get_task(name).name == "LaMP-3"


def test_unknown_task_lists_known_names():
    with pytest.raises(ConfigError) as e:
        get_task("LaMP-9")
    assert "LaMP-9" in str(e.value) and "LaMP-2M" in str(e.value) and "movielens" in str(e.value)


def test_registry_covers_all_tasks():
    assert set(TASKS) == {"LaMP-1", "LaMP-2N", "LaMP-2M", "LaMP-3", "LaMP-4", "LaMP-5", "LaMP-6", "LaMP-7",
                          "movielens", "jsonl", "synth-cls", "synth-gen"}
    for t in TASKS.values():
        assert t.kind in ("classification", "rating", "generation")
        assert (t.labels is None) == (t.kind == "generation")
        assert t.answer_field in t.item_fields


def test_metric_names_by_kind():
    assert get_task("LaMP-2M").metric_names == ("accuracy", "f1")
    assert get_task("movielens").metric_names == ("mae", "rmse")
    assert get_task("LaMP-4").metric_names == ("rouge-1", "rouge-L")


def test_label_lists():
    assert get_task("LaMP-1").labels == ("[1]", "[2]")
    assert len(get_task("LaMP-2M").labels) == 15 and "true story" in get_task("LaMP-2M").labels
    assert len(get_task("LaMP-2N").labels) == 15 and "food & drink" in get_task("LaMP-2N").labels
    assert get_task("LaMP-3").labels == ("1", "2", "3", "4", "5")


def test_history_pairs_follow_oppu():
    p, a = get_task("LaMP-3").history_pair(Item("1", {"text": "Great pan.", "score": "5.0"}))
    assert p == ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, "
                 "4, or 5 without further explanation. review: Great pan.") and a == "5"
    p, a = get_task("LaMP-2M").history_pair(Item("1", {"description": "Robots.", "tag": "sci-fi"}))
    assert p.startswith("Which tag does this movie relate to") and "true story]" in p
    assert p.endswith("description: Robots.") and a == "sci-fi"
    # LaMP-7 as OPPU trains it: the user's tweet after a bare "tweet:", never a prompt holding its own answer
    p, a = get_task("LaMP-7").history_pair(Item("1", {"text": "so tired lol"}))
    assert p == "tweet:" and a == "so tired lol"
    assert get_task("LaMP-4").history_pair(Item("1", {"text": "Body.", "title": "Head"})) == (
        "Generate a headline for the following article: Body.", "Head")
    assert get_task("LaMP-5").history_pair(Item("1", {"abstract": "We show.", "title": "T"}))[1] == "T"
    assert get_task("LaMP-1").history_pair(Item("1", {"abstract": "We show.", "title": "T"})) == (
        "Generate a title for the following abstract of a paper: We show.", "T")
    assert get_task("LaMP-2N").history_pair(Item("1", {"text": "Vote!", "category": "politics"}))[1] == "politics"
    assert get_task("jsonl").history_pair(Item("1", {"prompt": "hi", "response": "yo"})) == ("hi", "yo")
    p, a = get_task("movielens").history_pair(Item("1", {"text": "Heat (1995) | Action", "score": "4"}))
    assert p.endswith("movie: Heat (1995) | Action") and a == "4"


def test_query_prompt_is_the_input():
    q = Query("9", "Generate a headline for the following article: x", "h")
    assert get_task("LaMP-4").query_prompt(q) == q.input


def test_synthetic_prompts_are_short():
    for name in ("synth-cls", "synth-gen"):
        t = get_task(name)
        assert len(t.prompt_template.split()) <= 14
