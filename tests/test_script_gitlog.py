"""scripts/gitlog_to_jsonl.py: a git history -> properlm's JSONL (subject lines in the author's style).

Runs on a hand-written ``git log`` text in tests/fixtures/gitlog/ (invented people and
commits), and on a throwaway git repository built here when ``git`` is installed.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from properlm.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "gitlog" / "git-log.txt"

_spec = importlib.util.spec_from_file_location("gitlog_to_jsonl", ROOT / "scripts" / "gitlog_to_jsonl.py")
gitlog = importlib.util.module_from_spec(_spec)
sys.modules.setdefault(_spec.name, gitlog)  # dataclasses look their module up there
_spec.loader.exec_module(gitlog)

SMALL = ["--min-history", "3", "--max-history", "10", "--min-body-words", "5"]
ALMA, BRAM = gitlog.pseudonym("alma@example.org"), gitlog.pseudonym("bram@example.com")


def convert(tmp_path, *args, source=FIX, name="out.jsonl"):
    out = tmp_path / name
    assert gitlog.main([str(source), "--out", str(out), *args]) == 0
    return out


def test_loads_grouped_by_author_in_time_order(tmp_path):
    out = convert(tmp_path, *SMALL)
    ds = load_dataset(out, n_queries=1)
    assert ds.task == "jsonl"
    # Cato has 2 usable commits (< --min-history 3); the merge and the revert are skipped,
    # and so is Bram's body-less "Document ..." commit.
    assert sorted(u.id for u in ds.users) == sorted([ALMA, BRAM])
    alma = ds.user(ALMA)
    assert [it.fields["response"] for it in alma.history] == [
        "t/frob: cover patterns with a trailing slash", "docs/frob: describe the exit codes",
        "frob: stop leaking the pattern buffer"]
    assert alma.queries[0].gold == "frob: teach `frob --dry-run` to list the files it would touch"
    time = {json.loads(x)["id"]: json.loads(x)["time"] for x in out.read_text().splitlines()}
    for u in ds.users:  # history oldest first, the query the latest commit
        dates = [it.date for it in u.history] + [time[q.id] for q in u.queries]
        assert dates == sorted(dates) and all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", d) for d in dates)
    # The ISO date with a +02:00 offset is stored in UTC; "[PATCH] " is cut from the subject.
    bram = ds.user(BRAM)
    assert bram.queries[0].gold == "Make the widget cache thread-safe."
    assert time[bram.queries[0].id] == "2024-05-20T07:30:00Z"


def test_no_prompt_contains_its_answer_and_nothing_personal_leaks(tmp_path):
    out = convert(tmp_path, *SMALL)
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert records and all(set(r) == {"user_id", "prompt", "response", "time", "id"} for r in records)
    for r in records:
        assert r["response"].lower().rstrip(".") not in r["prompt"].lower()
        assert r["prompt"].startswith("Write the subject line of the git commit described below")
    text = out.read_text(encoding="utf-8")
    assert "@" not in text and "Signed-off-by" not in text and "Helped-by" not in text
    assert "Alma" not in text and "Quill" not in text and "[mk:" not in text
    by_id = {r["id"]: r for r in records}
    assert "In short" not in by_id["2e3f4a5b6c7d"]["prompt"]  # repeated the subject verbatim
    assert "This fixes" not in by_id["9f0a1b2c3d4e"]["prompt"]  # "This fixes X" for "Fix X."
    assert "mail questions to [email] or the list" in by_id["6c7d8e9f0a1b"]["prompt"]
    assert all(re.fullmatch(r"u[0-9a-f]{10}", r["user_id"]) for r in records)


def test_deterministic_and_options(tmp_path):
    a = convert(tmp_path, *SMALL, name="a.jsonl").read_bytes()
    assert convert(tmp_path, *SMALL, name="b.jsonl").read_bytes() == a
    one = [json.loads(x) for x in convert(tmp_path, *SMALL, "--users", "1", "--seed", "3",
                                          name="c.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in convert(tmp_path, *SMALL, "--users", "1", "--seed", "3",
                                            name="d.jsonl").read_text().splitlines()]
    assert one == again and len({r["user_id"] for r in one}) == 1
    capped = [json.loads(x) for x in convert(tmp_path, *SMALL[:2], "--max-history", "3", "--min-body-words", "5",
                                             name="e.jsonl").read_text().splitlines()]
    alma = [r["id"] for r in capped if r["user_id"] == ALMA]
    assert alma == ["6c7d8e9f0a1b", "2e3f4a5b6c7d", "0c1e2d3f4a5b"]  # the latest 3, oldest first
    salted = convert(tmp_path, *SMALL, "--salt", "other", name="f.jsonl").read_text()
    assert ALMA not in salted


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_reads_a_git_repository_with_its_mailmap(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args, env=None):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=env)

    git("init", "-q")
    (repo / ".mailmap").write_text("Dana Reed <dana@example.org> <dana@old.example.org>\n")
    git("add", ".mailmap")
    base = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_COMMITTER_NAME": "Keeper", "GIT_COMMITTER_EMAIL": "keeper@example.org"}
    for i, (email, subject) in enumerate([("dana@old.example.org", "parser: accept tabs"),
                                          ("dana@example.org", "parser: reject empty keys")]):
        env = {**base, "GIT_AUTHOR_NAME": "Dana Reed", "GIT_AUTHOR_EMAIL": email,
               "GIT_AUTHOR_DATE": f"{1700000000 + i * 100} +0000", "GIT_COMMITTER_DATE": f"{1700000000 + i * 100} +0000"}
        git("commit", "-q", "--allow-empty", "-m", subject, "-m",
            f"Body number {i} explains the change in enough words to keep it.",
            "-m", f"Signed-off-by: Dana Reed <{email}>", env=env)
    out = convert(tmp_path, "--min-history", "2", "--min-body-words", "5", source=repo)
    ds = load_dataset(out, n_queries=1)
    assert [u.id for u in ds.users] == [gitlog.pseudonym("dana@example.org")]  # both e-mails, one user
    u = ds.users[0]
    assert [it.fields["response"] for it in u.history] == ["parser: accept tabs"]
    assert u.queries[0].gold == "parser: reject empty keys"
    # the bare git directory form (what `fetch` brings) reads the same
    assert convert(tmp_path, "--min-history", "2", "--min-body-words", "5", source=repo / ".git",
                   name="bare.jsonl").read_bytes() == out.read_bytes()
