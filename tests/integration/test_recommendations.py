"""Recommendations on real worker processes: session updates show in the next request, co-viewed items
are recommended, purchased and unavailable items are excluded, every worker answers alike, a restart
serves the same, a crash mid-stream counts every co-occurrence once, and bad events go to
user-events.dlq."""
from __future__ import annotations

import pickle
import random
import signal
import threading
import time
from typing import Any, Dict, List, Tuple

from models.recommendations import UserEvent, apply_item_update, item_updates, update_session
from tests.support.kafka import consume_sync, produce_sync
from tests.support.workers import WorkerProcess, wait_for, wait_until_ready

NOW = time.time() - 900
POPULAR = [f"sku-pop-{i}" for i in range(5)]
FAST_REFIT = {"RECS_REFIT_INTERVAL": "1"}


def view(user: str, item: str, ts: float, event: str = "view") -> Tuple[str, Dict[str, Any]]:
    return user, {"user_id": user, "item_id": item, "event": event, "ts": ts}


def history() -> List[Tuple[str, Dict[str, Any]]]:
    """Other users: sku-a is followed by sku-c, sku-b by sku-d; sku-pop-* are the most viewed."""
    records = [view(f"p{number}", item, NOW + number + index) for number in range(12) for index, item in enumerate(POPULAR)]
    for number in range(12):
        user, ts = f"h{number}", NOW + number
        records += [view(user, POPULAR[number % 5], ts), view(user, POPULAR[(number + 1) % 5], ts + 1)]
        records += [view(user, "sku-a", ts + 2), view(user, "sku-c", ts + 3)] if number % 2 else [view(user, "sku-b", ts + 2), view(user, "sku-d", ts + 3)]
    return records


def send(broker, records) -> None:
    # One record per producer batch: the local broker's watermark bug otherwise (README findings).
    produce_sync(broker.bootstrap, "user-events", records, max_batch_size=1)


def recommendations(worker: WorkerProcess, user: str, k: int = 10) -> Dict[str, Any]:
    status, body = worker.get(f"/recommendations/{user}/?k={k}")
    assert status == 200, (worker.url, user, body)
    return body


def item_ids(body: Dict[str, Any]) -> List[str]:
    return [entry["item_id"] for entry in body["items"]]


def settled(worker: WorkerProcess, users: List[str], pause: float = 2.5) -> Dict[str, Dict[str, Any]]:
    """Answers for ``users`` once a model exists and two reads ``pause`` seconds apart agree."""
    def stable():
        first = {user: recommendations(worker, user) for user in users}
        if first[users[0]]["model_version"] < 1:
            return None
        time.sleep(pause)
        second = {user: recommendations(worker, user) for user in users}
        return second if first == second else None

    return wait_for(stable, timeout=90, interval=0.5, message="recommendations settled")


def test_views_change_the_next_answer_purchases_are_excluded_and_both_workers_agree(isolated_broker, start_workers):
    first, second = start_workers(isolated_broker, 2, **FAST_REFIT)
    send(isolated_broker, history())
    wait_for(lambda: recommendations(first, "h0")["strategy"] != "trending", timeout=60, message="history consumed")

    # The other worker's replica of the item table catches up with the history within moments.
    cold = wait_for(lambda: (body := recommendations(second, "newcomer")) and set(item_ids(body)[:5]) == set(POPULAR) and body,
                    timeout=30, message="trending items on the other worker")
    assert cold["strategy"] == "trending"

    send(isolated_broker, [view("newcomer", "sku-a", NOW + 100), view("newcomer", "sku-b", NOW + 101)])
    # The two views are two events: an answer between them knows only the first (sku-c, not sku-d).
    warm = wait_for(lambda: (body := recommendations(first, "newcomer"))["strategy"] != "trending"
                    and {"sku-c", "sku-d"} <= set(item_ids(body)[:2]) and body, timeout=30, message="both views used")
    assert not {"sku-a", "sku-b"} & set(item_ids(warm))

    send(isolated_broker, [view("newcomer", "sku-c", NOW + 102, event="purchase")])
    bought = wait_for(lambda: (body := recommendations(second, "newcomer")) and "sku-c" not in item_ids(body) and body, timeout=30, message="purchase excluded")
    assert "sku-d" in item_ids(bought)

    produce_sync(isolated_broker.bootstrap, "items", [("sku-d", {"item_id": "sku-d", "category": "c", "available": False})], max_batch_size=1)
    wait_for(lambda: "sku-d" not in item_ids(recommendations(first, "newcomer")), timeout=30, message="unavailable item dropped")

    users = ["newcomer", "nobody"] + [f"h{number}" for number in range(12)] + [f"p{number}" for number in range(4)]
    answers = settled(first, users)
    owners = {first.get(f"/router/recs_sessions/{user}/")[1] for user in users}
    assert owners == {first.url, second.url}, "both workers must own some users"
    for user in users:
        assert recommendations(second, user) == answers[user], user
    assert not {"sku-c", "sku-d"} & set(item_ids(answers["newcomer"]))


def test_a_restarted_worker_serves_the_same_recommendations(isolated_broker, tmp_path, app_id):
    worker = WorkerProcess(isolated_broker.url, tmp_path / "worker", app_id=app_id, env=FAST_REFIT).start()
    wait_until_ready([worker])
    send(isolated_broker, history() + [view("returning", "sku-a", NOW + 200), view("returning", "sku-pop-1", NOW + 201)])
    users = ["returning", "nobody", "h1", "h2"]
    try:
        before = settled(worker, users)
        worker.stop(signal.SIGTERM)
        assert list((tmp_path / "worker" / "data" / "recommendations").glob("model-*.npz")), "model persisted"

        worker = WorkerProcess(isolated_broker.url, tmp_path / "worker", app_id=app_id, port=worker.port, env=FAST_REFIT).start()
        wait_until_ready([worker])
        after = {user: recommendations(worker, user) for user in users}
    finally:
        worker.stop()

    assert after == before
    assert before["returning"]["strategy"] == "blended" and "sku-c" in item_ids(before["returning"])


class CreatesFileWhenUnpickled:
    """Unpickling this calls ``open(path, "w")``: the marker file proves a worker ran it."""

    def __init__(self, path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_pickle_published_to_recs_models_never_runs_and_the_model_keeps_serving(isolated_broker, start_workers, tmp_path):
    (worker,) = start_workers(isolated_broker, 1, **FAST_REFIT)
    send(isolated_broker, history() + [view("returning", "sku-a", NOW + 200)])
    users = ["returning", "h1"]
    before = settled(worker, users)
    marker = tmp_path / "pwned"

    produce_sync(isolated_broker.bootstrap, "recs-models", [("model", pickle.dumps(CreatesFileWhenUnpickled(marker)))], max_batch_size=1)

    wait_for(lambda: marker.exists() or "refused a record of recs-models" in worker.log_path.read_text(errors="replace"),
             timeout=30, message="the worker read the hostile record")
    assert not marker.exists(), "unpickling the record ran its code"
    assert {user: recommendations(worker, user) for user in users} == before


def test_bad_events_go_to_the_dead_letter_topic_and_the_agent_goes_on(isolated_broker, start_workers):
    (worker,) = start_workers(isolated_broker, 1)
    produce_sync(isolated_broker.bootstrap, "user-events", [
        ("u1", b"not json"),
        ("u1", {"user_id": "u1", "item_id": "sku-a", "event": "like", "ts": NOW}),
        ("u1", {"user_id": "u2", "item_id": "sku-a", "event": "view", "ts": NOW}),
        ("u1", {"user_id": "u1", "event": "view", "ts": NOW}),
        ("u1", {"user_id": "u1", "item_id": "sku-a", "event": "view", "ts": "yesterday"}),
    ], max_batch_size=1)
    send(isolated_broker, [view("u1", "sku-a", NOW + 1), view("u2", "sku-b", NOW + 2)])

    dead = consume_sync(isolated_broker.bootstrap, "user-events.dlq", 5)
    reasons = [dict(record.headers)["dlq.reason"].decode() for record in dead]
    assert [record.value for record in dead][0] == b"not json"
    assert any("event" in reason and "like" in reason for reason in reasons), reasons
    assert any("does not match the record key" in reason for reason in reasons), reasons
    assert any("item_id" in reason for reason in reasons), reasons
    assert any("'ts'" in reason for reason in reasons), reasons
    assert wait_for(lambda: worker.get("/dead-letters/user-events/")[1].get("count") == 5, timeout=30, message="dead letters counted")

    # The agent is still consuming: the good event after the bad ones reached u1's session.
    session = wait_for(lambda: worker.get("/table/recs_sessions/u1/")[1].get("items"), timeout=30, message="u1's session")
    assert session[0][0] == "sku-a"


def test_hostile_records_on_each_input_topic_are_dead_letters_and_valid_ones_apply(isolated_broker, start_workers):
    (worker,) = start_workers(isolated_broker, 1)
    deep = b"[" * 100_000 + b"]" * 100_000
    produce_sync(isolated_broker.bootstrap, "user-events", [
        ("u7", deep),
        ("u7", b'{"user_id": "u7", "item_id": "\\ud800", "event": "view", "ts": %d}' % NOW),
        ("u7", b'{"user_id": "u7", "item_id": "sku-a", "event": "view", "ts": 1' + b"0" * 5000 + b"}"),
        view("u7", "sku-a", NOW + 1),
    ], max_batch_size=1)
    produce_sync(isolated_broker.bootstrap, "items", [
        ("sku-z", deep),
        ("sku-z", b'{"item_id": "sku-z", "price": NaN}'),
        ("sku-z", {"item_id": "sku-z", "category": {"nested": [1]}}),
        ("sku-z", {"item_id": "sku-z", "category": "hats", "available": False}),
    ], max_batch_size=1)
    update = {"item": "sku-q", "source": [9, 1], "ts": NOW, "weight": 1.0, "pairs": {"sku-r": 0.5}}
    produce_sync(isolated_broker.bootstrap, "recs-item-updates", [
        ("sku-q", {"item": "sku-q", "updates": [{**update, "source": [9, 2**64 - 1]}]}),
        ("sku-q", b'{"item": "sku-q", "updates": [{"item": "sku-q", "source": [9, 1], "ts": NaN, "weight": 1, "pairs": {}}]}'),
        ("sku-q", {"item": "sku-q", "updates": [update]}),
    ], max_batch_size=1)

    for topic, count in (("user-events", 3), ("items", 3), ("recs-item-updates", 2)):
        reasons = [dict(record.headers)["dlq.reason"].decode() for record in consume_sync(isolated_broker.bootstrap, f"{topic}.dlq", count)]
        assert all(reasons), (topic, reasons)
    assert wait_for(lambda: worker.get("/table/recs_sessions/u7/")[1].get("items"), timeout=30, message="u7's session")[0][0] == "sku-a"
    assert wait_for(lambda: worker.get("/table/recs_item_meta/sku-z/")[1], timeout=30, message="sku-z's metadata") == {
        "category": "hats", "price": None, "available": False}
    stats = wait_for(lambda: worker.get("/table/recs_item_stats/sku-q/")[1], timeout=30, message="sku-q's stats")
    assert stats["applied"] == {"9": 1} and stats["total"] == [1.0, NOW] and list(stats["neighbours"]) == ["sku-r"]


def test_k_is_validated(kafka_broker, start_workers):
    (worker,) = start_workers(kafka_broker, 1)
    for k in ("0", "101", "ten"):
        status, body = worker.get(f"/recommendations/anyone/?k={k}")
        assert status == 400 and "k must be an integer in 1..100" in body["error"], (k, body)
    status, body = worker.get("/recommendations/anyone/?k=100")
    assert status == 200 and body["user_id"] == "anyone" and body["strategy"] == "trending"


def expected_item_stats(records) -> Dict[str, Dict[str, Any]]:
    """What an uninterrupted run builds: the worker's pure functions over each user's events in order."""
    sessions: Dict[str, Any] = {}
    stats: Dict[str, Any] = {}
    for offset, (user, body) in enumerate(records):
        event = UserEvent(**body)
        update = update_session(sessions.get(user, {}), event, offset)
        sessions[user] = update.session
        for item, item_update in item_updates(event, update.previous_items, (0, offset)).items():
            stats[item] = apply_item_update(stats.get(item), item_update)
    return stats


def test_sigkill_mid_stream_then_restart_counts_every_co_occurrence_once(isolated_broker, tmp_path, app_id):
    rng = random.Random(5)
    items = [f"sku-{number}" for number in range(30)]
    records = []
    for number in range(120):
        user, ts = f"c{number}", NOW + number
        records += [view(user, item, ts + step) for step, item in enumerate(rng.sample(items, 5))]

    def produce_paced() -> None:
        for start in range(0, len(records), 20):
            send(isolated_broker, records[start:start + 20])
            time.sleep(0.1)

    worker = WorkerProcess(isolated_broker.url, tmp_path / "worker", app_id=app_id).start()
    wait_until_ready([worker])
    producer = threading.Thread(target=produce_paced)
    producer.start()
    wait_for(lambda: worker.get("/table/recs_sessions/c5/")[1].get("items"), timeout=60, interval=0.05, message="first sessions written")
    worker.stop(signal.SIGKILL)
    assert producer.is_alive(), "the crash must land while events are still arriving"
    producer.join()

    restarted = WorkerProcess(isolated_broker.url, tmp_path / "worker", app_id=app_id, port=worker.port).start()
    expected = expected_item_stats(records)
    try:
        wait_until_ready([restarted])

        def every_item_stored():
            stored = {item: restarted.get(f"/table/recs_item_stats/{item}/")[1] for item in expected}
            totals = {item: round(value.get("total", [0])[0], 6) for item, value in stored.items()}
            return stored if totals == {item: round(value["total"][0], 6) for item, value in expected.items()} else None

        stored = wait_for(every_item_stored, timeout=120, interval=1.0, message="every item's weight as in an uninterrupted run")
    finally:
        restarted.stop()

    for item, value in expected.items():
        neighbours = {other: round(score, 6) for other, (score, _ts) in stored[item]["neighbours"].items()}
        assert neighbours == {other: round(score, 6) for other, (score, _ts) in value["neighbours"].items()}, item
