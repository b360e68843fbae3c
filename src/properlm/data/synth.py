"""Synthetic LaMP-style tasks with planted user groups, for tests and the CPU demo.

Users fall into K latent groups; each group has its own rule, and a user may carry
a personal quirk on top. Personalization therefore matters (no single population
rule is right for every group) and is learnable from a few dozen short examples.

* ``synth-cls``: an item is a short post (about 12-18 words) about one topic word
  buried in filler; its label (love / like / dislike / hate) is the user's group's
  opinion of that topic. Group opinions are dealt so that, for each topic, the
  groups disagree as much as 4 labels allow (with K=5 the best population rule is
  right for at most 2 groups in 5). Quirk: the user holds a different opinion of
  one topic.
* ``synth-gen``: an item is a short message about a topic; the reply (at most 8
  words) follows the group's phrase pattern, e.g. ``"honestly, jazz is the best"``,
  and a quirky user ends every reply with their own signature word.

History lengths follow a truncated Pareto law (most users short, a few long).
Everything is drawn from one ``random.Random(seed)``: the same arguments give the
same dataset. The truth is kept in ``User.group``, ``User.meta["quirk"]`` and
``Dataset.meta`` (group rules, user groups, settings).
"""

from __future__ import annotations

import random
from datetime import date, timedelta

from properlm.data.schema import Dataset, Item, Query, User
from properlm.data.tasks import SYNTH_LABELS, get_task
from properlm.errors import ConfigError

TOPICS = ("jazz", "soccer", "coffee", "taxes", "robots", "hiking", "poetry", "sushi", "chess", "gardening",
          "cars", "opera")
_LEADS = ("I spent the whole afternoon reading about", "A friend sent me a long post on",
          "Yesterday the group chat was all about", "I just watched a short video about",
          "The newsletter this week was mostly about", "My neighbour would not stop talking about")
_TAILS = ("and it kept me busy for hours.", "while we waited for the train.", "before dinner with the family.",
          "during a slow day at work.", "with lots of pictures and notes.", "and I have some thoughts.")
# synth-gen group styles: opener + topic + closer; pairs stay distinct for up to 64 groups.
_OPENERS = ("honestly,", "oh wow,", "well,", "listen:", "hmm,", "yes!", "sadly,", "ha,")
_CLOSERS = ("is the best", "bores me", "sounds great", "is not for me", "makes me think", "is overrated",
            "is pure joy", "needs more work")
_QUIRK_WORDS = ("indeed", "cheers", "yo", "truly", "alas", "mate", "friend", "peace", "amen", "okay")


def _post(rng: random.Random, topic: str) -> str:
    """A short text whose only informative word is the topic."""
    return f"{rng.choice(_LEADS)} {topic} {rng.choice(_TAILS)}"


def _history_lengths(rng: random.Random, n: int, lo: int, hi: int, alpha: float) -> list[int]:
    """Pareto(alpha) scaled to start at ``lo`` and capped at ``hi``: median about lo * 2**(1/alpha)."""
    return [min(hi, int(lo * rng.paretovariate(alpha))) for _ in range(n)]


def _cls_rules(rng: random.Random, k: int, topics: tuple[str, ...]) -> list[dict[str, str]]:
    """Each group's topic -> label map; per topic, labels are dealt as evenly as possible across groups."""
    rules: list[dict[str, str]] = [{} for _ in range(k)]
    for t in topics:
        deck: list[str] = []
        while len(deck) < k:  # whole shuffled label sets, so no label repeats before all are used
            block = list(SYNTH_LABELS)
            rng.shuffle(block)
            deck += block
        deck = deck[:k]
        rng.shuffle(deck)
        for g in range(k):
            rules[g][t] = deck[g]
    return rules


def generate(
    task: str = "synth-cls",
    n_users: int = 60,
    n_groups: int = 5,
    seed: int = 0,
    min_history: int = 4,
    max_history: int = 60,
    n_queries: int = 3,
    quirk_rate: float = 0.3,
    n_topics: int = 6,
    history_alpha: float = 1.2,
) -> Dataset:
    """Generate a synthetic personalization dataset with planted groups.

    Args:
        task: ``"synth-cls"`` (4-way opinion labels) or ``"synth-gen"`` (short styled replies).
        n_users: number of users; groups are filled round-robin, then users shuffled.
        n_groups: number of latent groups K (at most 64 for ``synth-gen``).
        seed: the random seed; same arguments, same dataset.
        min_history: shortest history.
        max_history: longest history (the Pareto tail is capped here).
        n_queries: queries per user (held-out items with golds).
        quirk_rate: probability that a user has a personal quirk.
        n_topics: number of topic words in use (at most 12).
        history_alpha: Pareto shape; smaller means a heavier tail of long histories.

    Returns:
        A :class:`Dataset` whose users carry their true group in ``User.group``.

    Raises:
        ConfigError: an unknown task or out-of-range settings.
    """
    kind = get_task(task).name
    if kind not in ("synth-cls", "synth-gen"):
        raise ConfigError(f"generate() makes synth-cls or synth-gen, not {task!r}")
    if n_users < 1 or n_groups < 1 or n_queries < 0 or not 1 <= min_history <= max_history:
        raise ConfigError("need n_users >= 1, n_groups >= 1, n_queries >= 0, 1 <= min_history <= max_history")
    if not 0.0 <= quirk_rate <= 1.0 or not 1 <= n_topics <= len(TOPICS):
        raise ConfigError(f"need 0 <= quirk_rate <= 1 and 1 <= n_topics <= {len(TOPICS)}")
    if kind == "synth-gen" and n_groups > len(_OPENERS) * len(_CLOSERS):
        raise ConfigError(f"synth-gen supports at most {len(_OPENERS) * len(_CLOSERS)} groups")
    rng = random.Random(seed)
    topics = TOPICS[:n_topics]
    if kind == "synth-cls":
        rules: list = _cls_rules(rng, n_groups, topics)
    else:
        n = len(_OPENERS)
        rules = [f"{_OPENERS[g % n]} {{topic}} {_CLOSERS[(g + g // n) % n]}" for g in range(n_groups)]
    groups = [i % n_groups for i in range(n_users)]
    rng.shuffle(groups)
    lengths = _history_lengths(rng, n_users, min_history, max_history, history_alpha)

    users = []
    for i, (g, n_hist) in enumerate(zip(groups, lengths)):
        uid = f"u{i:03d}"
        user = User(id=uid, group=g)
        if kind == "synth-cls":
            rule = dict(rules[g])
            if rng.random() < quirk_rate:
                t = rng.choice(topics)
                rule[t] = rng.choice([lab for lab in SYNTH_LABELS if lab != rule[t]])
                user.meta["quirk"] = f"{t}={rule[t]}"

            def answer(topic: str) -> str:
                return rule[topic]
        else:
            word = rng.choice(_QUIRK_WORDS) if rng.random() < quirk_rate else ""
            if word:
                user.meta["quirk"] = word

            def answer(topic: str) -> str:
                reply = rules[g].format(topic=topic)
                return f"{reply} {word}" if word else reply
        start = date(2024, 1, 1) + timedelta(days=rng.randrange(365))
        field = "label" if kind == "synth-cls" else "reply"
        template = get_task(kind).prompt_template
        for j in range(n_hist + n_queries):
            topic = rng.choice(topics)
            text = _post(rng, topic)
            if j < n_hist:
                day = (start + timedelta(days=j)).isoformat()
                user.history.append(Item(id=f"{uid}-h{j}", fields={"text": text, field: answer(topic)}, date=day))
            else:
                user.queries.append(Query(id=f"{uid}-q{j - n_hist}", input=template.format(text=text),
                                          gold=answer(topic)))
        users.append(user)

    meta = {
        "generator": "properlm.data.synth", "task": kind, "seed": seed, "n_users": n_users,
        "n_groups": n_groups, "min_history": min_history, "max_history": max_history, "n_queries": n_queries,
        "quirk_rate": quirk_rate, "n_topics": n_topics, "history_alpha": history_alpha,
        "topics": list(topics), "group_rules": {str(g): r for g, r in enumerate(rules)},
        "user_groups": {u.id: u.group for u in users},
    }
    return Dataset(task=kind, users=users, source=f"synth:{kind}:seed={seed}", meta=meta)
