"""Centralized logging on real workers: the local broker, the Elasticsearch-compatible test server
driven by the official client, and the worker's own pages."""
from __future__ import annotations

import json
import signal
import time
import uuid
from collections import Counter
from typing import Any, Dict, List

from tests.support.kafka import consume_sync, produce_sync
from tests.support.workers import WorkerProcess, wait_for, wait_until_ready


def new_service(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def indexed(es_server, service: str) -> Dict[str, Dict[str, Any]]:
    """Every document of a service, over all its daily indices: {_id: _source}."""
    docs: Dict[str, Dict[str, Any]] = {}
    for index in list(es_server.indices):
        if index.startswith(f"logs-{service}-"):
            docs.update(es_server.docs(index))
    return docs


def today_index(service: str) -> str:
    return f"logs-{service}-{time.strftime('%Y.%m.%d', time.gmtime())}"


def test_json_logfmt_and_plain_lines_become_ecs_documents_stats_and_dead_letters(isolated_broker, es_server, start_workers):
    (worker,) = start_workers(isolated_broker, 1, ELASTICSEARCH_URL=es_server.url)
    service = new_service("cart")
    now = time.time()
    produce_sync(isolated_broker.bootstrap, "logs", [
        (service, {"ts": now, "level": "info", "message": "json line", "trace_id": "t-1", "host": "web-1", "order_id": 7}),
        (None, {"ts": now, "service": service, "level": "ERROR", "message": "keyless json line"}),
        (service, b'level=warn msg="logfmt line" trace_id=t-2'),
        (None, b"ERROR plain line named by headers", {"service": service, "host": "node-7"}),
        (service, [{"message": f"batched {i}", "level": "error" if i % 4 == 0 else "info"} for i in range(100)]),
        (service, b'{"message": "truncated'),
        (None, b"a line that names no service"),
        (service, {"ts": now, "message": "refused by the index", "__reject__": "failed to parse field [order_id]"}),
    ], max_batch_size=1)

    docs = wait_for(lambda: (lambda d: len(d) >= 104 and d)(indexed(es_server, service)), timeout=60, message="104 documents indexed")
    assert len(docs) == 104
    assert set(es_server.indices) >= {today_index(service)}
    by_message = {doc["message"]: doc for doc in docs.values()}
    json_doc = by_message["json line"]
    assert json_doc["service"]["name"] == service and json_doc["log"]["level"] == "info"
    assert json_doc["trace"]["id"] == "t-1" and json_doc["host"]["name"] == "web-1"
    assert json_doc["labels"] == {"order_id": "7"}
    assert json_doc["@timestamp"].endswith("Z") and json_doc["ecs"]["version"]
    assert by_message["keyless json line"]["log"]["level"] == "error"
    assert by_message["logfmt line"]["log"]["level"] == "warn" and by_message["logfmt line"]["trace"]["id"] == "t-2"
    plain = by_message["ERROR plain line named by headers"]
    assert (plain["service"]["name"], plain["host"]["name"], plain["log"]["level"]) == (service, "node-7", "error")
    assert sum(1 for doc in docs.values() if doc["message"].startswith("batched ")) == 100
    assert all(doc_id.startswith("logs-") for doc_id in docs)  # topic-partition-offset-line

    dead = consume_sync(isolated_broker.bootstrap, "logs.dlq", 3)
    reasons = sorted(dict(record.headers)["dlq.reason"].decode() for record in dead)
    assert any("does not parse" in reason for reason in reasons)
    assert any("no service" in reason for reason in reasons)
    refused = [reason for reason in reasons if "Elasticsearch refused it (400)" in reason]
    assert len(refused) == 1 and "failed to parse field [order_id]" in refused[0]
    assert {record.value for record in dead} >= {b'{"message": "truncated', b"a line that names no service"}

    # Statistics count every parsed line, the refused one too: 77 info, 27 error, 1 warn.
    stats = wait_for(
        lambda: (lambda r: r[0] == 200 and sum(w["total"] for w in r[1]["windows"]) == 105 and r[1])(worker.get(f"/logs/stats/{service}/")),
        message="105 lines counted",
    )
    totals = Counter()
    for window in stats["windows"]:
        totals.update({level: count for level, count in window["counts"].items() if count})
    assert totals == {"info": 77, "error": 27, "warn": 1}
    assert stats["current"]["total"] + stats["previous"]["total"] == 105

    status, recent = worker.get(f"/logs/recent/{service}/?level=error&limit=5")
    assert status == 200 and len(recent["lines"]) == 5
    assert all(line["level"] == "error" for line in recent["lines"])
    assert worker.get(f"/logs/recent/{service}/?limit=0")[0] == 400
    assert worker.get(f"/logs/recent/{service}/?level=loud")[0] == 400
    assert worker.get("/logs/stats/nobody-logs-here/")[0] == 404


def test_redelivered_records_overwrite_their_documents_instead_of_duplicating(isolated_broker, es_server, start_workers, tmp_path):
    (worker,) = start_workers(isolated_broker, 1, ELASTICSEARCH_URL=es_server.url)
    service = new_service("order")
    produce_sync(isolated_broker.bootstrap, "logs", [(service, {"message": f"line {i}", "level": "info"}) for i in range(200)], max_batch_size=1)
    wait_for(lambda: len(indexed(es_server, service)) == 200, timeout=60, message="200 documents indexed")

    # A second consumer group reads the same offsets again: every document is written again, none added.
    replay = WorkerProcess(isolated_broker.url, tmp_path / "replay", app_id=f"replay-{uuid.uuid4().hex[:6]}",
                           env={"ELASTICSEARCH_URL": es_server.url}).start()
    try:
        wait_until_ready([replay])
        wait_for(lambda: (lambda r: r[0] == 200 and r[1]["indexed"] >= 200)(replay.get("/logs/status/")), timeout=60, message="replayed")
    finally:
        replay.stop()
    docs = es_server.indices[today_index(service)]
    assert len(docs) == 200
    assert {entry["_version"] for entry in docs.values()} == {2}
    assert sorted(entry["_source"]["message"] for entry in docs.values()) == sorted(f"line {i}" for i in range(200))


def test_an_elasticsearch_outage_holds_offsets_back_and_ends_with_every_line_once(isolated_broker, es_server, tmp_path, app_id):
    first = WorkerProcess(isolated_broker.url, tmp_path / "worker", app_id=app_id, env={"ELASTICSEARCH_URL": es_server.url}).start()
    service = new_service("payment")
    try:
        wait_until_ready([first])
        es_server.set_unavailable(True)
        produce_sync(isolated_broker.bootstrap, "logs", [(service, {"message": f"pay {i}", "level": "info"}) for i in range(300)], max_batch_size=1)
        wait_for(lambda: (lambda r: r[0] == 200 and r[1]["es_retries"] >= 3)(first.get("/logs/status/")), message="retrying")
        assert first.get("/health/")[0] == 200  # the worker keeps running
        assert indexed(es_server, service) == {}
        # A crash during the outage: nothing was committed past the unindexed lines.
        first.stop(signal.SIGKILL)
    finally:
        es_server.set_unavailable(False)
        first.stop()
    es_server.fail_next(3, status=429)  # the cluster comes back slowly
    es_server.fail_next(2, status=503)
    second = WorkerProcess(isolated_broker.url, tmp_path / "worker", app_id=app_id, env={"ELASTICSEARCH_URL": es_server.url}).start()
    try:
        wait_until_ready([second])
        docs = wait_for(lambda: (lambda d: len(d) >= 300 and d)(indexed(es_server, service)), timeout=90, message="all lines indexed")
    finally:
        second.stop()
    messages = Counter(doc["message"] for doc in docs.values())
    assert messages == Counter({f"pay {i}": 1 for i in range(300)})


def test_closed_windows_emit_log_error_rate_samples_without_elasticsearch(isolated_broker, start_workers):
    (worker,) = start_workers(isolated_broker, 1, LOG_STATS_WINDOW="10")
    service = new_service("search")
    past = (time.time() // 10) * 10 - 60  # a window that ended a minute ago
    lines: List[Dict[str, Any]] = [
        {"ts": past + 1 + i * 0.1, "level": "error" if i < 3 else "info", "message": f"query {i}"} for i in range(10)
    ]
    # One record (a batching shipper's JSON array): the window ended a minute ago, so the first
    # counts to arrive close it; lines in separate records could straddle two batches.
    produce_sync(isolated_broker.bootstrap, "logs", [(service, lines)], max_batch_size=1)

    def error_rate_sample():
        for record in consume_sync(isolated_broker.bootstrap, "metrics", 1, timeout=5):
            sample = json.loads(record.value)
            if sample.get("metric") == "log_error_rate" and sample.get("service") == service:
                return sample
        return None

    sample = wait_for(error_rate_sample, timeout=60, message="log_error_rate sample on metrics")
    assert sample == {"service": service, "instance": "logs", "metric": "log_error_rate", "value": 0.3, "ts": past + 10}
    # The monitoring pipeline takes it like any other sample.
    page = wait_for(lambda: (lambda r: r[0] == 200 and r[1])(worker.get(f"/metrics/services/{service}/")), message="sample recorded")
    assert page["metrics"]["log_error_rate"]["logs"]["value"] == 0.3
    status, stats = worker.get(f"/logs/stats/{service}/")
    assert status == 200 and stats["windows"][0]["error_ratio"] == 0.3


def test_every_worker_answers_for_every_service_from_the_owner(isolated_broker, start_workers):
    workers = start_workers(isolated_broker, 2)
    services = [new_service(f"svc{i}") for i in range(6)]
    produce_sync(isolated_broker.bootstrap, "logs", [
        (service, {"message": f"{service} line {j}", "level": "warn" if j == 0 else "info"})
        for i, service in enumerate(services) for j in range(i + 1)
    ], max_batch_size=1)

    def totals(worker, service):
        status, body = worker.get(f"/logs/stats/{service}/")
        return status == 200 and sum(window["total"] for window in body["windows"])

    for i, service in enumerate(services):
        for worker in workers:
            assert wait_for(lambda: totals(worker, service) == i + 1, message=f"{service} on {worker.port}")
        answers = [worker.get(f"/logs/recent/{service}/?level=warn") for worker in workers]
        assert answers[0] == answers[1]
        assert answers[0][0] == 200 and [line["message"] for line in answers[0][1]["lines"]] == [f"{service} line 0"]


def test_a_burst_of_long_stack_traces_is_counted_and_kept_short_enough_for_kafka(isolated_broker, start_workers):
    """200 newest lines of 20 kB would make a 4 MB LogCounts and log_recent value, over Kafka's 1 MB
    record limit: the recent lines are cut to fit, and the statistics and the worker go on."""
    (worker,) = start_workers(isolated_broker, 1)
    service = new_service("billing")
    trace = "java.lang.IllegalStateException: ledger closed\n" + "\tat com.shop.Ledger.post(Ledger.java:42)\n" * 500
    produce_sync(isolated_broker.bootstrap, "logs", [
        (service, {"level": "error", "message": f"payment {i} failed\n{trace}"}) for i in range(250)
    ], max_batch_size=1 << 20)
    produce_sync(isolated_broker.bootstrap, "logs", [(service, {"level": "info", "message": "recovered"})])

    def counted() -> int:
        status, body = worker.get(f"/logs/stats/{service}/")
        return sum(window["total"] for window in body["windows"]) if status == 200 else 0

    assert wait_for(lambda: counted() == 251, timeout=60, message="251 lines counted")
    status, recent = worker.get(f"/logs/recent/{service}/?limit=200")
    lines = recent["lines"]
    assert status == 200 and lines[0]["message"] == "recovered"
    assert 1 < len(lines) < 200 and len(json.dumps(lines)) <= 256 * 1024
    assert lines[1]["truncated"] is True and lines[1]["message"].startswith("payment 249 failed\njava.lang.")


def test_a_refused_record_too_large_to_copy_is_dead_lettered_without_its_value(isolated_broker, start_workers):
    """A 999,950-byte record that does not parse: its DLQ copy with the headers was over the
    producer's 1,000,000-byte request limit, the send raised, and the agent died on it again after
    every restart (the record stayed held). It now goes without its value, saying where it is."""
    (worker,) = start_workers(isolated_broker, 1)
    service = new_service("upload")
    produce_sync(isolated_broker.bootstrap, "logs", [(service, b'{"message": "' + b"x" * 999_937)])
    produce_sync(isolated_broker.bootstrap, "logs", [(service, {"level": "info", "message": "next"})])

    stats = wait_for(lambda: (lambda r: r[0] == 200 and r[1])(worker.get(f"/logs/stats/{service}/")), timeout=60,
                     message="the next record counted")
    assert sum(window["total"] for window in stats["windows"]) == 1
    (dead,) = consume_sync(isolated_broker.bootstrap, "logs.dlq", 1)
    headers = dict(dead.headers)
    assert dead.value is None and dead.key == service.encode()
    assert headers["dlq.value-dropped"].startswith(b"999950 bytes") and b"does not parse" in headers["dlq.reason"]
    assert headers["dlq.topic"] == b"logs" and int(headers["dlq.offset"]) >= 0
    assert worker.process.poll() is None


def test_hostile_records_amid_good_ones_are_dead_lettered_and_the_good_ones_indexed(isolated_broker, es_server, start_workers):
    """A time valid as text but before year 1 in UTC raised OverflowError out of ship_logs: the
    agent stopped and no later line of its partitions was indexed. Each hostile record is now a
    dead letter with its reason, and a Python traceback gets its ECS error fields."""
    (worker,) = start_workers(isolated_broker, 1, ELASTICSEARCH_URL=es_server.url)
    service = new_service("shop")
    stack_trace = (
        'Traceback (most recent call last):\n  File "/srv/shop/cart.py", line 12, in charge\n'
        '    raise ValueError("card expired")\nValueError: card expired'
    )
    hostile = [
        ({"message": "x", "ts": "0001-01-01T00:00:00+01:00"}, "timestamp is out of range"),
        (b'{"message": "x", "http": ' + b'{"a": ' * 300 + b"1" + b"}" * 301, "nested deeper than 100 levels"),
        (b'{"a": ' * 20_000 + b"1" + b"}" * 20_000, "does not parse"),
        (b'{"message": "x", "order_id": ' + b"9" * 5000 + b"}", "does not parse"),
        (b'level=info msg=x ts=9999-12-31T23:59:59-01:00', "timestamp is out of range"),
        (b"\xff\xfe not UTF-8", "not UTF-8"),
    ]
    records = [(service, {"message": "before", "level": "info"})]
    records += [(service, value) for value, _ in hostile]
    records += [(service, f"2024-11-01 10:00:00,120 ERROR shop.cart payment failed\n{stack_trace}".encode()),
                (service, {"message": "after", "level": "info"})]
    produce_sync(isolated_broker.bootstrap, "logs", records, max_batch_size=1)

    docs = wait_for(lambda: (lambda d: len(d) >= 3 and d)(indexed(es_server, service)), timeout=60, message="3 documents indexed")
    by_message = {doc["message"]: doc for doc in docs.values()}
    assert set(by_message) == {"before", "after", "2024-11-01 10:00:00,120 ERROR shop.cart payment failed"}
    failed = by_message["2024-11-01 10:00:00,120 ERROR shop.cart payment failed"]
    assert failed["error"] == {"type": "ValueError", "message": "card expired", "stack_trace": stack_trace}
    assert failed["log"]["level"] == "error" and failed["@timestamp"] == "2024-11-01T10:00:00.120Z"

    dead = sorted(consume_sync(isolated_broker.bootstrap, "logs.dlq", len(hostile)), key=lambda record: int(dict(record.headers)["dlq.offset"]))
    reasons = [dict(record.headers)["dlq.reason"].decode() for record in dead]
    assert len(reasons) == len(hostile)
    assert all(expected in reason for (_, expected), reason in zip(hostile, reasons, strict=True)), reasons
    assert worker.process.poll() is None
