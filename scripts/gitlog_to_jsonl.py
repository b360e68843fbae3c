#!/usr/bin/env python3
"""Turn a git repository's history into a LaMP-style personal text task (JSONL).

The task: given the description (body) of a commit, write its subject line the
way its author does. The user is the commit's author (after ``.mailmap``), so a
user's history is the commits they wrote, oldest first, and the latest ones
become queries when properlm loads the file. It is LaMP-4/5 turned to commits:
the body plays the article or abstract, the subject the headline or title.

Reads either

* a git directory or work tree (``git.git``): the script runs
  ``git log`` on it (needs ``git`` on the PATH), or
* a text file holding the output of that same command, saved by hand::

      git -c mailmap.blob=HEAD:.mailmap log --no-merges --use-mailmap --no-notes \\
          --no-color --encoding=UTF-8 --date=unix --format=medium HEAD -- > git-log.txt

  (``Date:`` lines may also be ISO 8601 with an offset).

and writes one JSON object a line, properlm's ``jsonl`` layout::

    {"user_id": "u3f9c0a12de", "prompt": "Write the subject line ...", "response": "...",
     "time": "2021-03-04T05:06:07Z", "id": "1a2b3c4d5e6f"}

What it cleans, so that the prompt holds the author's own description and no more:

* trailers (``Signed-off-by:``, ``Reviewed-by:``, ``Cc:`` ...) and maintainers'
  bracketed notes (``[jc: ...]``) are dropped; any e-mail address left in the
  text becomes ``[email]``;
* merges, reverts, ``fixup!``/``squash!`` commits and commits whose cleaned body
  has fewer than ``--min-body-words`` words are skipped; a ``[PATCH ...]`` prefix
  (an artefact of e-mailed patches) is cut from the subject;
* leaks: every sentence of the body that contains the subject, its text after
  the ``area:`` prefix (3 words or more), or that text less its first word (4
  words or more, so "This fixes X" goes for "Fix X") is removed; a record whose
  prompt still contains the subject is skipped;
* the body is cut to ``--max-body-words`` words and ``--max-body-chars``
  characters (at a sentence end when one is near), so prompts stay under about
  200 tokens; subjects over ``--max-subject-chars`` are skipped.

Users are pseudonyms: ``u`` + the first 10 hex digits of SHA-256(salt + e-mail),
stable across runs; no e-mail or name is written. Record ids are the commit's
first 12 hex digits, so a record can be traced back to the public history.

Selection is deterministic: users with at least ``--min-history`` usable commits
(queries included: properlm makes each user's latest 5 records queries by default)
are eligible; ``--users`` of them are drawn with ``--seed`` (all when fewer); each
keeps their latest ``--max-history`` commits. Users are written in pseudonym
order, each user's records oldest first.

Example::

    python scripts/gitlog_to_jsonl.py git.git \\
        --out DATA/gitlog.jsonl --users 200 --min-history 25 --max-history 100 --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

PROMPT = "Write the subject line of the git commit described below, in your usual style. description: {body}"
DEFAULT_SALT = "properlm-gitlog"

GIT_LOG_ARGS = ["log", "--no-merges", "--use-mailmap", "--no-notes", "--no-color",
                "--encoding=UTF-8", "--date=unix", "--format=medium"]

_COMMIT = re.compile(r"^commit ([0-9a-f]{7,64})\b")
_AUTHOR = re.compile(r"^Author:\s*(.*?)\s*(?:<([^>]*)>)?\s*$")
# "Token: value" lines in a trailer block; "-by"/"-to" tokens count anywhere in the body.
_TRAILER = re.compile(r"^[A-Za-z][A-Za-z0-9-]*\s*:\s*\S")
_BY_TRAILER = re.compile(r"^\s*[A-Za-z][A-Za-z0-9-]*-(by|to)\s*:", re.IGNORECASE)
_KNOWN_TRAILER = re.compile(r"^\s*(cc|link|fixes|closes|bug|change-id|references|see-also|message-id)\s*:",
                            re.IGNORECASE)
_NOTE = re.compile(r"^\[[A-Za-z][A-Za-z0-9 .-]{0,15}:")  # "[jc: ...]", maintainer's note
_EMAIL = re.compile(r"<?[\w.+-]+@[\w-]+(?:\.[\w-]+)+>?")
_PATCH_PREFIX = re.compile(r"^\[PATCH[^\]]*\]\s*", re.IGNORECASE)
_SKIP_SUBJECT = re.compile(r"^(revert\b|fixup!|squash!|amend!|merge (branch|tag|remote|commit|git)\b)",
                           re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_AREA = re.compile(r"^[^\s:][^:]{0,60}:\s+(.*)$")


@dataclass
class Commit:
    sha: str
    name: str
    email: str
    time: str  # UTC, ISO 8601, "...Z"
    lines: list[str]  # the message, unindented
    merge: bool = False


@dataclass
class Record:
    user: str
    sha: str
    time: str
    prompt: str
    response: str


# ---------------------------------------------------------------- reading


def _utc(stamp: str) -> str:
    stamp = stamp.strip()
    if re.fullmatch(r"-?\d+(\s+[+-]\d{4})?", stamp):
        dt = datetime.fromtimestamp(int(stamp.split()[0]), tz=timezone.utc)
    else:
        dt = datetime.fromisoformat(stamp)
        dt = dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_log(lines: Iterable[str]) -> Iterator[Commit]:
    """Commits from ``git log --format=medium --date=unix`` text (message lines indented 4)."""
    cur: Commit | None = None
    for raw in lines:
        line = raw.rstrip("\n").rstrip("\r")
        m = _COMMIT.match(line)
        if m:
            if cur is not None:
                yield cur
            cur = Commit(m.group(1), "", "", "", [])
            continue
        if cur is None:
            continue
        if line.startswith("    "):
            cur.lines.append(line[4:])
        elif line.startswith("Author:"):
            a = _AUTHOR.match(line)
            cur.name, cur.email = (a.group(1), a.group(2) or "") if a else (line[7:].strip(), "")
        elif line.startswith("Date:"):
            cur.time = _utc(line[5:])
        elif line.startswith("Merge:"):
            cur.merge = True  # skipped below; --no-merges normally keeps them out
        elif not line.strip() and cur.lines:
            cur.lines.append("")  # a blank message line whose 4 spaces were trimmed
        # other header lines (Commit:, AuthorDate: ...) are ignored
    if cur is not None:
        yield cur


def _is_git(path: Path) -> bool:
    return path.is_dir() and ((path / "HEAD").is_file() and (path / "objects").is_dir() or (path / ".git").exists())


def read_commits(source: Path, rev: str = "HEAD") -> Iterator[Commit]:
    """Commits of a git directory / work tree (via ``git log``) or of a saved log text file."""
    if source.is_file():
        with open(source, encoding="utf-8", errors="replace") as f:
            yield from parse_log(f)
        return
    if not _is_git(source):
        raise SystemExit(f"error: {source}: neither a git directory nor a git log text file")
    where = ["--git-dir", str(source)] if (source / "objects").is_dir() else ["-C", str(source)]
    base = ["git", *where]
    has_mailmap = subprocess.run([*base, "cat-file", "-e", f"{rev}:.mailmap"],
                                 capture_output=True).returncode == 0
    cmd = [*base, *(["-c", f"mailmap.blob={rev}:.mailmap"] if has_mailmap else []), *GIT_LOG_ARGS, rev, "--"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, encoding="utf-8", errors="replace") as proc:
        assert proc.stdout is not None
        yield from parse_log(proc.stdout)
    if proc.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} exited with status {proc.returncode}")


# ---------------------------------------------------------------- cleaning


def _paragraphs(lines: list[str]) -> list[list[str]]:
    paras, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line)
        elif cur:
            paras.append(cur)
            cur = []
    if cur:
        paras.append(cur)
    return paras


def _is_trailer_block(para: list[str]) -> bool:
    """Whether every line is a trailer, its indented continuation, or part of a ``[xx: ...]`` note."""
    in_note = False
    for i, x in enumerate(para):
        if in_note or _NOTE.match(x):
            in_note = not x.rstrip().endswith("]")
        elif not (_TRAILER.match(x) or (i and x.startswith((" ", "\t")))):
            return False
    return True


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def split_message(lines: list[str]) -> tuple[str, str]:
    """(subject, cleaned body) of a commit message; the body is one line of text."""
    paras = _paragraphs(lines)
    if not paras:
        return "", ""
    subject = _PATCH_PREFIX.sub("", " ".join(x.strip() for x in paras[0]))
    body = paras[1:]
    while body and _is_trailer_block(body[-1]):  # trailer blocks at the end
        body.pop()
    kept: list[str] = []
    for para in body:
        if _NOTE.match(para[0]):  # a maintainer's note, possibly several lines
            continue
        for x in para:
            if _BY_TRAILER.match(x) or _KNOWN_TRAILER.match(x):
                continue
            kept.append(x.strip())
    text = " ".join(" ".join(kept).split())
    return subject.strip(), _EMAIL.sub("[email]", text)


def strip_leaks(subject: str, body: str) -> str:
    """The body without the sentences that give the subject away.

    A sentence goes when it contains the subject (final ``.`` aside), the subject's text
    after its ``area:`` prefix (3 words or more), or that text without its first word
    (4 words or more: "This fixes X" for a subject "Fix X")."""
    core = subject.rstrip(".!? ")
    m = _AREA.match(core)
    rest = m.group(1) if m else core
    needles = [core]
    if m and len(rest.split()) >= 3:
        needles.append(rest)
    if len(rest.split()) >= 5:
        needles.append(rest.split(None, 1)[1])
    needles = [n for n in map(_norm, needles) if n]
    sentences = _SENTENCE_END.split(body)
    return " ".join(s for s in sentences if not any(n in _norm(s) for n in needles))


def truncate(text: str, max_words: int, max_chars: int) -> str:
    """At most ``max_words`` words and ``max_chars`` characters, ending at a sentence end when one
    is in the last 40%, else at a word with `` ...``."""
    words = text.split()
    if len(words) <= max_words and len(text) <= max_chars:
        return text
    cut = " ".join(words[:max_words])
    if len(cut) > max_chars:
        cut = cut[: max_chars + 1].rsplit(" ", 1)[0] if " " in cut[: max_chars + 1] else cut[:max_chars]
    if cut.endswith((".", "!", "?")):
        return cut
    end = max(cut.rfind(". "), cut.rfind("! "), cut.rfind("? "))
    if end >= len(cut) * 0.6:
        return cut[: end + 1]
    return cut + " ..."


def to_record(c: Commit, user: str, max_body_words: int, max_body_chars: int, min_body_words: int,
              max_subject_chars: int) -> Record | None:
    """The record of one commit, or None when it is skipped."""
    if not c.time or c.merge:
        return None
    subject, body = split_message(c.lines)
    if not subject or len(subject) > max_subject_chars or _SKIP_SUBJECT.match(subject):
        return None
    body = truncate(strip_leaks(subject, body), max_body_words, max_body_chars)
    if len(body.split()) < min_body_words:
        return None
    prompt = PROMPT.format(body=body)
    if _norm(subject) in _norm(prompt) or _EMAIL.search(subject):
        return None
    return Record(user, c.sha[:12], c.time, prompt, subject)


def pseudonym(key: str, salt: str = DEFAULT_SALT) -> str:
    return "u" + hashlib.sha256((salt + key.strip().lower()).encode("utf-8")).hexdigest()[:10]


# ---------------------------------------------------------------- selection


def convert(commits: Iterable[Commit], n_users: int = 200, min_history: int = 25, max_history: int = 100,
            seed: int = 0, max_body_words: int = 100, max_body_chars: int = 500, min_body_words: int = 8,
            max_subject_chars: int = 80, salt: str = DEFAULT_SALT) -> list[Record]:
    """Records of the selected users: users in pseudonym order, each oldest first."""
    by_user: dict[str, list[Record]] = {}
    seen: set[str] = set()
    for c in commits:
        if c.sha in seen:
            continue
        seen.add(c.sha)
        user = pseudonym(c.email or c.name, salt)
        rec = to_record(c, user, max_body_words, max_body_chars, min_body_words, max_subject_chars)
        if rec is not None:
            by_user.setdefault(user, []).append(rec)
    eligible = sorted(u for u, recs in by_user.items() if len(recs) >= min_history)
    chosen = eligible if len(eligible) <= n_users else random.Random(seed).sample(eligible, n_users)
    out: list[Record] = []
    for user in sorted(chosen):
        recs = sorted(by_user[user], key=lambda r: (r.time, r.sha))
        out.extend(recs[-max_history:])
    return out


def write_jsonl(records: list[Record], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"user_id": r.user, "prompt": r.prompt, "response": r.response,
                                "time": r.time, "id": r.sha}, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="a git directory or work tree, or a saved `git log` text file")
    ap.add_argument("--out", type=Path, required=True, help="the .jsonl file to write")
    ap.add_argument("--rev", default="HEAD", help="the revision whose history is read (git sources)")
    ap.add_argument("--users", type=int, default=200, help="how many users to draw (default 200)")
    ap.add_argument("--min-history", type=int, default=25,
                    help="fewest usable commits for a user, queries included (default 25: properlm's loader "
                         "makes the latest 5 queries, leaving at least 20 history items)")
    ap.add_argument("--max-history", type=int, default=100,
                    help="latest commits kept per user, queries included (default 100)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the user draw (default 0)")
    ap.add_argument("--max-body-words", type=int, default=100, help="words of the body kept (default 100)")
    ap.add_argument("--max-body-chars", type=int, default=500, help="characters of the body kept (default 500)")
    ap.add_argument("--min-body-words", type=int, default=8, help="shorter bodies are skipped (default 8)")
    ap.add_argument("--max-subject-chars", type=int, default=80, help="longer subjects are skipped (default 80)")
    ap.add_argument("--salt", default=DEFAULT_SALT, help="salt of the user pseudonyms")
    a = ap.parse_args(argv)
    if a.min_history < 1 or a.max_history < a.min_history or a.users < 1:
        ap.error("need 1 <= --min-history <= --max-history and --users >= 1")
    records = convert(read_commits(a.source, a.rev), a.users, a.min_history, a.max_history, a.seed,
                      a.max_body_words, a.max_body_chars, a.min_body_words, a.max_subject_chars, a.salt)
    write_jsonl(records, a.out)
    n_users = len({r.user for r in records})
    print(f"wrote {len(records)} records of {n_users} users to {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
