"""A malformed record goes to <topic>.dlq with its original bytes and the reason, is counted, and
processing goes on with the next record."""
from __future__ import annotations

from tests.support.kafka import consume_sync, produce_sync
from tests.support.workers import wait_for


def test_bad_records_are_dead_lettered_counted_and_do_not_block_the_partition(isolated_broker, start_workers):
    (worker,) = start_workers(isolated_broker, 1)
    bad_value = b'{"metric": "cpu", "value": "not a number"}'
    produce_sync(
        isolated_broker.bootstrap,
        "metrics",
        [
            ("cart", b"this is not json"),
            ("cart", bad_value),
            ("cart", {"metric": "cpu", "instance": "cart-1", "value": 0.42, "ts": 5.0}),
        ],
    )

    page = wait_for(lambda: (lambda r: r[0] == 200 and r[1])(worker.get("/metrics/services/cart/")), message="good record processed")
    assert page["metrics"]["cpu"]["cart-1"] == {"value": 0.42, "ts": 5.0}

    dead = consume_sync(isolated_broker.bootstrap, "metrics.dlq", 2)
    dead.sort(key=lambda record: int(dict(record.headers)["dlq.offset"]))
    assert [record.value for record in dead] == [b"this is not json", bad_value]
    assert all(record.key == b"cart" for record in dead)
    headers = dict(dead[1].headers)
    assert headers["dlq.topic"] == b"metrics"
    assert b"field 'value' must be a finite number" in headers["dlq.reason"]
    assert 0 <= int(headers["dlq.partition"]) < 8

    counts = wait_for(
        lambda: (lambda r: r[0] == 200 and r[1]["count"] == 2 and r[1])(worker.get("/dead-letters/metrics/")),
        message="dead letters counted",
    )
    assert counts["dlq_topic"] == "metrics.dlq"
    assert "finite number" in counts["last_reason"]
