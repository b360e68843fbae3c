"""Onboarding over HTTP with instant group routing: a new user is answered by their group as soon as their
instant embedding is stored, and by their own LoRA once the job has trained it.

Against a live server on 127.0.0.1 (the harness of test_serve.py).
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from test_serve import PROMPT, RemoteServer
from test_serve_defects import _history, _wait
from properlm.store.run import open_bank

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def instant_run(tmp_path_factory, h):
    """A tiny run with ``group.unseen=instant``; users added later train 150 steps, long enough to watch."""
    from properlm.config import save_config
    from properlm.train.run import train

    cfg = h.small_cfg(data=dict(split="oppu", synth_users=14, n_targets=3), population=dict(max_steps=2),
                      group=dict(max_steps=3, unseen="instant"), user=dict(max_steps=2))
    run = train(cfg, tmp_path_factory.mktemp("serve-instant") / "run")
    save_config(dataclasses.replace(cfg, user=dataclasses.replace(cfg.user, max_steps=150)), run / "config.yaml")
    return run


def test_an_onboarded_user_is_answered_by_their_group_before_their_lora(instant_run):
    srv = RemoteServer(instant_run)
    user = "newcomer-5d2"
    try:
        r = srv.http("POST", f"/v1/users/{user}/history", content=_history(user, 12))
        assert r.status_code == 202, r.text
        job_id = r.json()["job"]["id"]
        seen = []
        deadline = time.time() + 240
        while time.time() < deadline:
            resp = srv.http("POST", "/v1/completions",
                            json={"model": user, "prompt": PROMPT.format("jazz"), "max_tokens": 1, "temperature": 0})
            assert resp.status_code == 200, resp.text
            kind = resp.headers["x-properlm-model"]
            who = resp.json()["properlm"]
            assert who["model"] == kind and who["user"] == user
            if kind == "group":
                assert who["personalized"] and "answered by their group" in who["reason"]
            seen.append(kind)
            if kind == "user-lora":
                break
        job = _wait(srv, job_id)
        assert job["state"] == "done" and job.get("group_ready"), job
        # base (the embedding not yet stored), then group (their instant embedding), then their LoRA, in order.
        order = [k for i, k in enumerate(seen) if i == 0 or seen[i - 1] != k]
        assert order in (["base", "group", "user-lora"], ["group", "user-lora"]), order
        assert srv.http("POST", "/v1/completions", json={"model": user, "prompt": "hi", "max_tokens": 1}
                        ).headers["x-properlm-model"] == "user-lora"
        # Deleting the user removes their embedding with their LoRA.
        assert user in open_bank(instant_run, "emb") and user in open_bank(instant_run, "lora")
        assert srv.http("DELETE", f"/v1/users/{user}").status_code == 200
        assert user not in open_bank(instant_run, "emb") and user not in open_bank(instant_run, "lora")
        assert srv.http("POST", "/v1/completions", json={"model": user, "prompt": "hi", "max_tokens": 1}
                        ).status_code == 404
    finally:
        srv.stop()
