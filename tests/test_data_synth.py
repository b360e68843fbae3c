"""Synthetic tasks: deterministic, planted groups that a population rule cannot serve but histories reveal."""

from collections import Counter
from statistics import median

import pytest

from properlm.data import generate, get_task
from properlm.data.synth import TOPICS
from properlm.errors import ConfigError


def topic_of(text: str) -> str:
    return next(t for t in TOPICS if f" {t} " in f" {text} ")


def test_deterministic_for_a_seed():
    assert generate(seed=3) == generate(seed=3)
    assert generate(seed=3).users != generate(seed=4).users
    assert generate("synth-gen", seed=3) == generate("synth-gen", seed=3)


def test_defaults_sized_for_a_cpu_demo():
    ds = generate(seed=1)
    lengths = [len(u.history) for u in ds.users]
    assert len(ds.users) == 60 and min(lengths) >= 4 and max(lengths) <= 60
    assert median(lengths) <= 12 and sum(n >= 30 for n in lengths) >= 3  # most short, a few long
    assert all(len(u.queries) == 3 and all(q.gold for q in u.queries) for u in ds.users)
    assert Counter(u.group for u in ds.users) == {g: 12 for g in range(5)}
    assert ds.meta["user_groups"] == {u.id: u.group for u in ds.users} and ds.meta["n_groups"] == 5


def test_cls_labels_follow_group_rule_except_the_quirk():
    ds = generate("synth-cls", seed=2, quirk_rate=0.5)
    rules = ds.meta["group_rules"]
    quirky = 0
    for u in ds.users:
        rule = dict(rules[str(u.group)])
        if "quirk" in u.meta:
            quirky += 1
            topic, label = u.meta["quirk"].split("=")
            assert rule[topic] != label
            rule[topic] = label
        for it in u.history:
            assert it.fields["label"] == rule[topic_of(it.fields["text"])]
        for q in u.queries:
            assert q.gold == rule[topic_of(q.input)]
    assert 15 <= quirky <= 45


def test_no_population_rule_fits_every_group():
    ds = generate("synth-cls", seed=0, n_groups=5)
    rules = ds.meta["group_rules"]
    for topic in ds.meta["topics"]:
        votes = Counter(rules[g][topic] for g in rules)
        assert max(votes.values()) <= 2  # 4 labels dealt over 5 groups


def test_history_reveals_the_group():
    """A user's history picks out their group's rule, which beats the best population rule."""
    ds = generate("synth-cls", seed=5, n_users=100)
    rules = ds.meta["group_rules"]
    population = {t: Counter(r[t] for r in rules.values()).most_common(1)[0][0] for t in ds.meta["topics"]}
    personal = pop = total = 0
    for u in ds.users:
        def agreement(g):
            return sum(rules[g][topic_of(it.fields["text"])] == it.fields["label"] for it in u.history)
        guess = max(rules, key=agreement)
        for q in u.queries:
            t = topic_of(q.input)
            personal += rules[guess][t] == q.gold
            pop += population[t] == q.gold
            total += 1
    assert personal / total > 0.75 and pop / total < 0.5


def test_gen_replies_short_group_styled_with_quirk_word():
    ds = generate("synth-gen", seed=1, quirk_rate=0.5)
    for u in ds.users:
        pattern = ds.meta["group_rules"][str(u.group)]
        for it in u.history:
            reply = it.fields["reply"]
            assert len(reply.split()) <= 8
            expected = pattern.format(topic=topic_of(it.fields["text"]))
            assert reply == (f"{expected} {u.meta['quirk']}" if "quirk" in u.meta else expected)
    assert len(set(ds.meta["group_rules"].values())) == 5


def test_prompts_are_short():
    for task in ("synth-cls", "synth-gen"):
        ds = generate(task, seed=0)
        t = get_task(task)
        for u in ds.users:
            assert all(len(t.history_pair(it)[0].split()) <= 30 for it in u.history)
            assert all(len(q.input.split()) <= 30 for q in u.queries)


@pytest.mark.parametrize("kwargs", [{"task": "LaMP-3"}, {"n_users": 0}, {"min_history": 5, "max_history": 4},
                                    {"quirk_rate": 1.5}, {"n_topics": 99}, {"task": "synth-gen", "n_groups": 65}])
def test_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        generate(**kwargs)
