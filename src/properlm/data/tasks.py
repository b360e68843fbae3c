"""Task registry: what each task's items hold, how they become training pairs, how they are scored.

A :class:`Task` knows the profile fields its history items must carry and turns
one history item into a (prompt, answer) pair the way OPPU does, so that a
user's history is training data for that user's adapter. Queries need no
template: LaMP's question ``input`` is already the full prompt.

The history prompts reuse the wording of the task's LaMP query, so that what a
model learns from history is asked for in the same words at test time:

* LaMP-1 (citation choice): ``abstract -> title`` with LaMP-5's phrasing. LaMP-1
  profiles hold an author's own papers (title, abstract) and no citation
  choices, so no pair in the query's own form can be built; learning to title
  the author's abstracts teaches their research vocabulary, which is what the
  query's choice between two references turns on.
* LaMP-2N: ``article text -> category`` with LaMP-2N's query phrasing.
* LaMP-2M: ``description -> tag`` with LaMP-2M's query phrasing (OPPU).
* LaMP-3: ``review text -> score`` with LaMP-3's query phrasing (OPPU).
* LaMP-4: ``article -> headline``; LaMP-5: ``abstract -> title`` (OPPU).
* LaMP-6: ``email text -> subject`` in the spirit of LaMP-4.
* LaMP-7: ``tweet: -> the user's tweet``, as OPPU's released code trains
  (``prompt/prompt.json``: ``OPPU_input`` is the bare ``tweet:``). LaMP-7's
  profiles hold only the user's tweets, with no source text to paraphrase, so
  the pair models the user's own tweets: their wording. (Until 2026-12-06 the
  prompt was LaMP-7's paraphrase query *of that same tweet*, so every pair's
  answer was a copy of its input and user LoRAs learned to copy.)

Task names are looked up loosely: ``LaMP-3``, ``LaMP_3``, ``lamp3`` and OPPU's
directory names (``product_rating``) all name the same task.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from properlm.data.schema import Item, Query
from properlm.errors import ConfigError

TAGS_2M = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy", "classic",
    "psychology", "fantasy", "romance", "thought-provoking", "social commentary", "violence", "true story",
)
CATEGORIES_2N = (
    "food & drink", "sports", "education", "parents", "religion", "travel", "business", "crime",
    "science & technology", "culture & arts", "entertainment", "politics", "women", "style & beauty",
    "healthy living",
)
# LaMP-2N's query lists the categories in this (different) order; the prompt must match it verbatim.
_CATEGORIES_2N_PROMPT_ORDER = (
    "travel, education, parents, style & beauty, entertainment, food & drink, science & technology, "
    "business, sports, healthy living, women, politics, crime, culture & arts, religion"
)
RATINGS = ("1", "2", "3", "4", "5")
SYNTH_LABELS = ("love", "like", "dislike", "hate")

_METRICS = {
    "classification": ("accuracy", "f1"),
    "rating": ("mae", "rmse"),
    "generation": ("rouge-1", "rouge-L"),
}


@dataclass(frozen=True)
class Task:
    """A personalization task.

    Attributes:
        name: the canonical name, e.g. ``LaMP-3`` (what ``Dataset.task`` holds).
        kind: ``classification``, ``rating`` or ``generation`` (selects the metrics).
        labels: the full label list for classification, ``("1",..,"5")`` for rating,
            ``None`` for generation.
        item_fields: the profile fields every history item must have.
        prompt_template: ``str.format`` template over an item's fields giving the prompt.
        answer_field: the item field that is the answer.
        lamp_id: the task id LaMP writes in gold files (``LaMP_3``), or the name itself
            for tasks outside LaMP.
        aliases: other accepted names (OPPU's directory names).
    """

    name: str
    kind: str
    labels: tuple[str, ...] | None
    item_fields: tuple[str, ...]
    prompt_template: str
    answer_field: str
    lamp_id: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The metrics LaMP reports for this task kind, e.g. ``("mae", "rmse")``."""
        return _METRICS[self.kind]

    def history_pair(self, item: Item) -> tuple[str, str]:
        """Turn a history item into a (prompt, answer) training pair.

        Args:
            item: a history item carrying at least ``self.item_fields``.

        Returns:
            The prompt (in the task's query wording) and the answer text.
        """
        prompt = self.prompt_template.format(**item.fields)
        answer = item.fields[self.answer_field]
        if self.kind == "rating":
            answer = normalize_rating(answer)
        return prompt, answer

    def query_prompt(self, query: Query) -> str:
        """The prompt of a query: LaMP's ``input`` already is the full prompt."""
        return query.input


def normalize_rating(value: str) -> str:
    """``"4.0"`` -> ``"4"``: LaMP's golds are integer strings; some profiles store floats."""
    try:
        number = float(value)
    except ValueError:
        return value.strip()
    return str(int(number)) if number.is_integer() else value.strip()


def _task(name: str, kind: str, labels, fields, prompt, answer, lamp_id: str = "", aliases=()) -> Task:
    return Task(name, kind, labels, tuple(fields), prompt, answer, lamp_id or name, tuple(aliases))


_LAMP3_PROMPT = (
    "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
    "without further explanation. review: {text}"
)
MOVIELENS_PROMPT = (
    "What is the score of the following movie on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
    "without further explanation. movie: {text}"
)
# Synthetic prompts stay under ~40 tokens with their item text: they train on a CPU.
SYNTH_CLS_PROMPT = "Does the user love, like, dislike or hate this post? post: {text}"
SYNTH_GEN_PROMPT = "Reply to this message in a few words. message: {text}"

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        _task("LaMP-1", "classification", ("[1]", "[2]"), ("title", "abstract"),
              "Generate a title for the following abstract of a paper: {abstract}", "title", "LaMP_1",
              ("citation",)),
        _task("LaMP-2N", "classification", CATEGORIES_2N, ("text", "category"),
              "Which category does this article relate to among the following categories? Just answer with "
              f"the category name without further explanation. categories: [{_CATEGORIES_2N_PROMPT_ORDER}] "
              "article: {text}", "category", "LaMP_2N", ("news_categorize",)),
        _task("LaMP-2M", "classification", TAGS_2M, ("description", "tag"),
              "Which tag does this movie relate to among the following tags? Just answer with the tag name "
              f"without further explanation. tags: [{', '.join(TAGS_2M)}] description: {{description}}",
              "tag", "LaMP_2M", ("movie_tagging",)),
        _task("LaMP-3", "rating", RATINGS, ("text", "score"), _LAMP3_PROMPT, "score", "LaMP_3",
              ("product_rating",)),
        _task("LaMP-4", "generation", None, ("text", "title"),
              "Generate a headline for the following article: {text}", "title", "LaMP_4", ("news_headline",)),
        _task("LaMP-5", "generation", None, ("title", "abstract"),
              "Generate a title for the following abstract of a paper: {abstract}", "title", "LaMP_5",
              ("scholarly_title",)),
        _task("LaMP-6", "generation", None, ("text", "title"),
              "Generate a subject for the following email: {text}", "title", "LaMP_6", ("email_subject",)),
        _task("LaMP-7", "generation", None, ("text",),
              "tweet:", "text", "LaMP_7", ("tweet_paraphrase",)),
        _task("movielens", "rating", RATINGS, ("text", "score"), MOVIELENS_PROMPT, "score"),
        _task("jsonl", "generation", None, ("prompt", "response"), "{prompt}", "response"),
        _task("synth-cls", "classification", SYNTH_LABELS, ("text", "label"), SYNTH_CLS_PROMPT, "label"),
        _task("synth-gen", "generation", None, ("text", "reply"), SYNTH_GEN_PROMPT, "reply"),
    )
}


def _key(name: str) -> str:
    """Spelling-insensitive key: ``LaMP_2M`` -> ``lamp2m``."""
    return re.sub(r"[\s_\-]", "", name).lower()


_LOOKUP: dict[str, Task] = {}
for _t in TASKS.values():
    for _n in (_t.name, _t.lamp_id, *_t.aliases):
        _LOOKUP[_key(_n)] = _t


def get_task(name: str) -> Task:
    """Look a task up by any of its spellings.

    Args:
        name: e.g. ``"LaMP-3"``, ``"LaMP_3"``, ``"lamp3"``, ``"product_rating"``, ``"movielens"``.

    Returns:
        The :class:`Task`.

    Raises:
        ConfigError: the name is not known; the message lists the known names.
    """
    task = _LOOKUP.get(_key(str(name)))
    if task is None:
        raise ConfigError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    return task


def is_known_task(name: str) -> bool:
    """Whether ``get_task(name)`` would succeed."""
    return _key(str(name)) in _LOOKUP
