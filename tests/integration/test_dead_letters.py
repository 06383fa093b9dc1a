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
            ("cart", b'{"metric": "cpu", "value": 1, "ts": 1732412345000}'),  # milliseconds, not seconds
            ("cart", {"metric": "cpu", "instance": "cart-1", "value": 0.42, "ts": 1732412345.0}),
        ],
    )

    page = wait_for(lambda: (lambda r: r[0] == 200 and r[1])(worker.get("/metrics/services/cart/")), message="good record processed")
    assert page["metrics"]["cpu"]["cart-1"] == {"value": 0.42, "ts": 1732412345.0}

    dead = consume_sync(isolated_broker.bootstrap, "metrics.dlq", 3)
    dead.sort(key=lambda record: int(dict(record.headers)["dlq.offset"]))
    assert [record.value for record in dead][:2] == [b"this is not json", bad_value]
    assert b"not a plausible event time" in dict(dead[2].headers)["dlq.reason"]
    assert all(record.key == b"cart" for record in dead)
    headers = dict(dead[1].headers)
    assert headers["dlq.topic"] == b"metrics"
    assert b"field 'value' must be a finite number" in headers["dlq.reason"]
    assert 0 <= int(headers["dlq.partition"]) < 8

    counts = wait_for(
        lambda: (lambda r: r[0] == 200 and r[1]["count"] == 3 and r[1])(worker.get("/dead-letters/metrics/")),
        message="dead letters counted",
    )
    assert counts["dlq_topic"] == "metrics.dlq"
    assert "not a plausible event time" in counts["last_reason"]
