"""The engineer's JSONL format: users, time order, explicit and implicit query splits."""

from pathlib import Path

from properlm.data import export_lamp, get_task, load_dataset

FIX = Path(__file__).parent / "fixtures" / "tiny.jsonl"


def test_users_time_order_and_latest_as_queries():
    ds = load_dataset(FIX, n_queries=1)
    assert ds.task == "jsonl" and [u.id for u in ds.users] == ["alice", "bob", "7"]
    alice = ds.user("alice")
    assert [it.fields["response"] for it in alice.history] == ["Meetings, all day.", "Gym first, work after."]
    assert alice.queries[0].input == "Summarize my day: beach." and alice.queries[0].gold == "Beach, sun, nap."
    bob = ds.user("bob")  # numeric times sort by value: 3 < 9 < 10
    assert [it.fields["response"] for it in bob.history] == ["sry, 10 min late!", "movie yes!!"]
    assert bob.queries[0].gold == "ya dinner sounds gr8"
    assert alice.history[0].id == "alice-3" and alice.history[0].date == "2024-03-01T08:00:00"


def test_explicit_split_wins():
    u = load_dataset(FIX, n_queries=3).user("7")
    assert [it.fields["prompt"] for it in u.history] == ["Write a haiku about rain."]
    assert [q.gold for q in u.queries] == ["Snow hushes the street"]


def test_history_pairs_are_prompt_response():
    ds = load_dataset(FIX)
    assert get_task(ds.task).history_pair(ds.user("7").history[0]) == (
        "Write a haiku about rain.", "Rain taps the window")


def test_records_without_time_keep_file_order(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"user_id": "a", "prompt": "1", "response": "r1", "time": 5}\n'
                 '{"user_id": "a", "prompt": "2", "response": "r2"}\n'
                 '{"user_id": "a", "prompt": "3", "response": "r3", "time": 1}\n')
    u = load_dataset(p, n_queries=1).users[0]
    assert [it.fields["prompt"] for it in u.history] == ["1", "2"] and u.queries[0].input == "3"


def test_query_without_response_has_no_gold(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"user_id": "a", "prompt": "1", "response": "r1"}\n'
                 '{"user_id": "a", "prompt": "2", "split": "query"}\n')
    assert load_dataset(p).users[0].queries[0].gold is None


def test_round_trip(tmp_path):
    ds = load_dataset(FIX, n_queries=1)
    export_lamp(ds, tmp_path)
    assert load_dataset(tmp_path).users == ds.users
