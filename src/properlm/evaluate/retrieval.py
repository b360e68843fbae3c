"""Retrieval-augmented prompts (RAG) and profile-augmented prompts (PAG), the way LaMP and OPPU build them.

RAG (LaMP's ``prompts/prompts.py`` and ``rank_profiles.py``): the user's own
history is the corpus, ``rank_bm25.BM25Okapi`` over whitespace tokens ranks it
against a query extracted from the question (the review text for LaMP-3, the
abstract for LaMP-5, the two candidate titles for LaMP-1, ...) and the top-k
items are written in front of the question in the task's own phrasing, e.g. for
LaMP-3::

    5 is the score for "great phone, fast shipping" . What is the score of ...

Items are cut with the tokenizer so that the whole prompt fits ``max_length``
tokens, with LaMP's budget: the question keeps at most 60% of it and the items
share the rest, an item that needs less leaving its unused tokens to the next.

Tasks outside LaMP (synthetic, MovieLens, JSONL logs) use the same scheme with a
phrasing built from the task's fields: the query is the question after the
literal prefix of the task's prompt template (``"... post: {text}"``), and an
item reads ``the label for "..." is "love"`` (classification, rating) or
``"..." is the reply for "..."`` (generation).

PAG (OPPU's ``gen_profile.py``, ``prompt/prompt_profile.json``): the base LLM
summarises up to 10 history items (drawn with a seed per user, each field cut to
200 words) into a profile; the profile is prepended to the RAG prompt. OPPU
formats the Python list of items into its prompt (a bug); here they are joined
with `` | `` as its code intended.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Callable

from rank_bm25 import BM25Okapi

from properlm.data.schema import Item
from properlm.data.tasks import Task

PROFILE_ITEMS = 10          # OPPU's K for profile generation
PROFILE_WORDS_PER_FIELD = 200


# --- LaMP's query extraction (LaMP/prompts/utils.py) -------------------------------------------


def _after(marker: str) -> Callable[[str], str | None]:
    def extract(text: str) -> str | None:
        i = text.find(marker)
        return None if i < 0 else text[i + len(marker):].strip()
    return extract


def strings_between_quotes(text: str) -> list[str]:
    """The substrings between successive pairs of double quotes (LaMP-1's titles)."""
    out, inside, cur = [], False, ""
    for ch in text:
        if ch == '"':
            if inside:
                out.append(cur)
                cur = ""
            inside = not inside
        elif inside:
            cur += ch
    return out


def _citation_query(text: str) -> str | None:
    quoted = strings_between_quotes(text)
    return f"{quoted[1]} {quoted[2]}" if len(quoted) >= 3 else None


def add_after_title(question: str, addition: str) -> str:
    """LaMP-1: insert ``, and <titles>`` right after the word "title" of the question."""
    i = question.find("title")
    return question if i < 0 else question[:i + 5] + ", and " + addition + question[i + 5:]


@dataclass(frozen=True)
class RagStyle:
    """How one task retrieves and writes history items.

    Attributes:
        corpus: item fields -> the text BM25 indexes.
        query: question -> the text BM25 is queried with (None: use the whole question).
        text_field: the item field cut to fit the token budget.
        item: (item fields, cut text) -> the item as written in the prompt.
        join: (written items, question) -> the final prompt.
        overhead: text whose length is reserved besides the items (LaMP's "Following the given patterns").
    """

    corpus: Callable[[dict[str, str]], str]
    query: Callable[[str], str | None]
    text_field: str
    item: Callable[[dict[str, str], str], str]
    join: Callable[[list[str], str], str]
    overhead: str = ""


def _dot(items: list[str], q: str) -> str:
    return f'{", and ".join(items)}. {q}'


LAMP_STYLES: dict[str, RagStyle] = {
    "LaMP-1": RagStyle(lambda f: f'{f["title"]} {f["abstract"]}', _citation_query, "title",
                       lambda f, t: f'"{t}"', lambda items, q: add_after_title(q, ", and ".join(items))),
    "LaMP-2N": RagStyle(lambda f: f'{f.get("title", "")} {f["text"]}', _after("article:"), "text",
                        lambda f, t: f'the category for the article: "{t}" is "{f["category"]}" ', _dot),
    "LaMP-2M": RagStyle(lambda f: f["description"], _after("description:"), "description",
                        lambda f, t: f'the tag for the movie: "{t}" is "{f["tag"]}" ', _dot),
    "LaMP-3": RagStyle(lambda f: f["text"], _after("review:"), "text",
                       lambda f, t: f'{f["score"]} is the score for "{t}" ', _dot),
    "LaMP-4": RagStyle(lambda f: f'{f["title"]} {f["text"]}', _after("article:"), "text",
                       lambda f, t: f'"{f["title"]}" is the title for "{t}" ', _dot),
    "LaMP-5": RagStyle(lambda f: f'{f["title"]} {f["abstract"]}', _after("paper:"), "abstract",
                       lambda f, t: f'"{f["title"]}" is a title for "{t}" ',
                       lambda items, q: f'{", and ".join(items)}. Following the given patterns {q}',
                       "Following the given patterns"),
    "LaMP-6": RagStyle(lambda f: f["text"], _after(":"), "text",
                       lambda f, t: f'"{f["title"]}" is the title for "{t}" ', _dot),
    "LaMP-7": RagStyle(lambda f: f["text"], _after(":"), "text", lambda f, t: f'"{t}" ',
                       lambda items, q: f'{", and ".join(items)} are written by a person. Following the given patterns {q}',
                       "are written by user. Following the given patterns"),
}


def rag_style(task: Task) -> RagStyle:
    """LaMP's style for LaMP tasks; one derived from the task's fields and template otherwise."""
    if task.name in LAMP_STYLES:
        return LAMP_STYLES[task.name]
    inputs = [f for f in task.item_fields if f != task.answer_field] or [task.answer_field]
    text_field, ans = inputs[0], task.answer_field
    prefix = task.prompt_template.split("{", 1)[0]

    def query(q: str) -> str | None:
        return q[len(prefix):].strip() if prefix and q.startswith(prefix) else None

    if task.kind == "generation":
        def item(f: dict[str, str], t: str) -> str:
            return f'"{f[ans]}" is the {ans} for "{t}" '
    else:
        def item(f: dict[str, str], t: str) -> str:
            return f'the {ans} for "{t}" is "{f[ans]}" '
    return RagStyle(lambda f: " ".join(f.get(k, "") for k in inputs), query, text_field, item, _dot)


# --- retrieval and prompt assembly -----------------------------------------------------------


def bm25_top_k(corpus: list[str], items: list[Item], query: str, k: int = 1) -> list[Item]:
    """LaMP's ``retrieve_top_k_with_bm25``: BM25Okapi on whitespace tokens, ``get_top_n``.

    Args:
        corpus: one text per item.
        items: the items, in the same order.
        query: the query text.
        k: how many to return.

    Returns:
        The k best items, best first (fewer when the history is shorter).
    """
    if not items or k < 1:
        return []
    tokenized = [doc.split() for doc in corpus]
    if not any(tokenized):  # BM25Okapi divides by the mean document length
        return items[:k]
    return BM25Okapi(tokenized).get_top_n(query.split(), items, n=min(k, len(items)))


def _ntok(tok, text: str) -> int:
    return len(tok(text)["input_ids"])


def _cut(tok, text: str, max_tokens: int) -> str:
    """Text cut to ``max_tokens`` tokens (special tokens counted, as LaMP's truncation does)."""
    ids = tok(text, max_length=max(max_tokens, 1), truncation=True)["input_ids"]
    return tok.decode(ids, skip_special_tokens=True)


def rag_prompt(task: Task, question: str, history: list[Item], k: int = 1, tok=None,
               max_length: int = 512) -> str:
    """The question with its user's top-k BM25 history items in front, in the task's phrasing.

    Args:
        task: the task (selects the phrasing, see :func:`rag_style`).
        question: the query's full prompt (LaMP's ``input``).
        history: the user's history items (the retrieval corpus).
        k: items to retrieve (the paper: 1).
        tok: a tokenizer to cut long items to the token budget; None: no cutting.
        max_length: token budget of the whole prompt (LaMP: 512).

    Returns:
        The augmented prompt; the question unchanged when the history is empty.
    """
    style = rag_style(task)
    query = style.query(question)
    query = question if query is None else query
    chosen = bm25_top_k([style.corpus(it.fields) for it in history], history, query, k)
    if not chosen:
        return question
    written = []
    if tok is None:
        written = [style.item(it.fields, it.fields.get(style.text_field, "")) for it in chosen]
        return style.join(written, question)
    # LaMP's budget: the question takes at most 60% of max_length; the items share the rest.
    budget = max_length - min(_ntok(tok, question), int(0.6 * max_length))
    per_item = (budget - 1 - 2 * (len(chosen) - 1) - (_ntok(tok, style.overhead) if style.overhead else 0)) // len(chosen)
    saved = 0
    for it in chosen:
        needed = _ntok(tok, style.item(it.fields, " "))
        text = _cut(tok, it.fields.get(style.text_field, ""), per_item + saved - needed)
        saved += per_item - _ntok(tok, text) - needed
        written.append(style.item(it.fields, text))
    return style.join(written, question)


# --- PAG: profiles written by the base LLM ---------------------------------------------------

_PROFILE_PROMPTS = {  # OPPU's prompt/prompt_profile.json, by LaMP task
    "LaMP-1": ("Write a summary, in English, of the research interests and topics of a researcher who has "
               "published the following papers. Only generate the summary, no other text.", "paper title: {title}"),
    "LaMP-2M": ("Look at the following past movies this user has watched and determine the most popular tag they "
                "labeled. Answer in the following form: most popular tag: <tag>.", "description: {description} tag: {tag}"),
    "LaMP-2N": ("Look at the following past articles this journalist has written and determine the most popular "
                "category they write in. Answer in the following form: most popular category: <category>.",
                "article: {text} category: {category}"),
    "LaMP-3": ("Based on this user’s past reviews, what are the most common scores they give for positive and "
               "negative reviews? Answer in the following form: most common positive score: <most common positive "
               "score>, most common negative score: <most common negative score>.", "review: {text} score: {score}"),
    "LaMP-4": ("Given this author’s previous articles, try to describe a template for their headlines. I want to be "
               "able to accurately predict the headline gives one of their articles. Be specific about their style "
               "and wording, don’t tell me anything generic.", "article: {text} headline: {title}"),
    "LaMP-5": ("Given this author’s previous publications, try to describe a template for their titles. I want to "
               "be able to accurately predict the title of one of the papers from the abstract. Only generate the "
               "template description, nothing else.", "abstract: {abstract} title: {title}"),
    "LaMP-7": ("Given this person’s previous tweets, try to describe a template for their tweets. I want to take a "
               "generic sentence and rephrase it to sound like one of their tweets, with the same style/punctuation/"
               "capitalization/wording/tone/etc. as them. Only give me the template description, nothing else.",
               "tweet: {text}"),
}


def _profile_template(task: Task) -> tuple[str, Callable[[dict[str, str]], str]]:
    if task.name in _PROFILE_PROMPTS:
        instruction, item = _PROFILE_PROMPTS[task.name]
        return instruction, lambda f: item.format_map(_Missing(f))
    ans = task.answer_field
    if task.kind == "generation":
        instruction = (f"Given this user's previous {ans}s, describe a template for their {ans}s: their style and "
                       f"wording. Only give the template description, nothing else.")
    else:
        instruction = (f"Look at the following past items of this user and determine the {ans} they give most "
                       f"often. Answer in the following form: most common {ans}: <{ans}>.")
    return instruction, lambda f: " ".join(f"{k}: {v}" for k, v in f.items())


class _Missing(dict):
    """``format_map`` mapping that leaves absent fields empty (LaMP-6 has no OPPU profile prompt)."""

    def __missing__(self, key: str) -> str:
        return ""


def profile_prompt(task: Task, user_id: str, history: list[Item], seed: int = 0,
                   n_items: int = PROFILE_ITEMS, words_per_field: int = PROFILE_WORDS_PER_FIELD) -> str:
    """OPPU's profile-writing prompt for one user.

    Args:
        task: the task (selects OPPU's instruction and item phrasing).
        user_id: the user (seeds the choice of items, so a profile is reproducible).
        history: the user's history items.
        seed: the run's seed.
        n_items: items shown (OPPU: a random 10 when there are more).
        words_per_field: each field is cut to this many whitespace words (OPPU: 200).

    Returns:
        ``"<instruction> User History: item | item | ... Answer:"``.
    """
    items = list(history)
    if len(items) > n_items:
        items = random.Random(seed * 1000003 + zlib.crc32(user_id.encode())).sample(items, n_items)
    instruction, write = _profile_template(task)
    shown = [write({k: " ".join(v.split()[:words_per_field]) for k, v in it.fields.items()}) for it in items]
    return f"{instruction} User History: {' | '.join(shown)} Answer:"


def pag_prompt(profile: str, rag: str) -> str:
    """OPPU's PAG input: the profile, a newline, the retrieval-augmented question."""
    return f"{profile}\n{rag}" if profile else rag
