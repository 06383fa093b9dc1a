"""Format detection and ECS normalization of log records (models/logs.py), without Kafka."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from models.logs import (
    InvalidRecord, RecordContext, document_id, guess_level, index_name, index_template_patterns, iso_timestamp,
    normalize_level, parse_logfmt, parse_record, timestamp_text, to_timestamp,
)

RECORD_TIME = datetime(2024, 11, 1, 9, 30, tzinfo=timezone.utc)


def context(service: str | None = "cart", host: str | None = None) -> RecordContext:
    return RecordContext(service, host, RECORD_TIME)


def test_json_line_maps_to_ecs_fields_and_keeps_extra_fields_as_labels():
    record = {
        "ts": 1730455200.25, "service": "order", "level": "ERROR", "message": "payment declined",
        "trace_id": "t-1", "host": "web-3", "order_id": 42, "http": {"response": {"status_code": 502}},
    }
    (doc,) = parse_record(json.dumps(record).encode(), context())
    assert doc["@timestamp"] == "2024-11-01T10:00:00.250Z"
    assert doc["log"]["level"] == "error"
    assert doc["service"]["name"] == "order"  # the line's own service wins over the record key
    assert doc["message"] == "payment declined"
    assert doc["trace"]["id"] == "t-1"
    assert doc["host"]["name"] == "web-3"
    assert doc["http"]["response"]["status_code"] == 502  # an ECS field stays where ECS puts it
    assert doc["labels"] == {"order_id": "42"}
    assert doc["event"]["dataset"] == "order.log"


def test_nested_and_dotted_ecs_spellings_normalize_alike():
    nested = parse_record(b'{"log": {"level": "warning"}, "service": {"name": "cart"}, "msg": "x"}', context(None))[0]
    dotted = parse_record(b'{"log.level": "warning", "service.name": "cart", "msg": "x"}', context(None))[0]
    assert nested["log"]["level"] == dotted["log"]["level"] == "warn"
    assert nested["service"]["name"] == dotted["service"]["name"] == "cart"


def test_logfmt_line_is_detected_and_parsed_with_quoted_values():
    line = b'ts=2024-11-01T10:00:00Z level=warn service=order msg="slow query: 3.2 s" trace_id=abc rows=12'
    (doc,) = parse_record(line, context())
    assert doc["@timestamp"] == "2024-11-01T10:00:00.000Z"
    assert (doc["log"]["level"], doc["service"]["name"], doc["message"]) == ("warn", "order", "slow query: 3.2 s")
    assert doc["trace"]["id"] == "abc"
    assert doc["labels"] == {"rows": "12"}


def test_plain_line_takes_service_from_the_record_and_guesses_the_level():
    (doc,) = parse_record(b"2024-11-01 10:00:00,120 ERROR cart.checkout failed for user 9", context("cart", "node-1"))
    assert doc["message"] == "2024-11-01 10:00:00,120 ERROR cart.checkout failed for user 9"
    assert doc["log"]["level"] == "error"
    assert doc["service"]["name"] == "cart"
    assert doc["host"]["name"] == "node-1"
    assert doc["@timestamp"] == "2024-11-01T10:00:00.120Z"  # its leading timestamp


def test_plain_line_without_a_timestamp_gets_the_record_time():
    (doc,) = parse_record(b"[warn] cache miss storm", context())
    assert doc["@timestamp"] == "2024-11-01T09:30:00.000Z"
    assert doc["log"]["level"] == "warn"


def test_a_json_array_holds_lines_of_every_form_in_order():
    record = json.dumps([
        {"msg": "one", "level": "info"},
        "level=error msg=two",
        "three: Traceback (most recent call last):",
    ]).encode()
    docs = parse_record(record, context())
    assert [doc["message"] for doc in docs] == ["one", "two", "three: Traceback (most recent call last):"]
    assert [doc["log"]["level"] for doc in docs] == ["info", "error", "error"]


@pytest.mark.parametrize("value, reason", [
    (b"", "empty record"),
    (b"   ", "empty record"),
    (b'{"msg": "truncated', "does not parse"),
    (b'[{"msg": "a"}, ', "does not parse"),
    (b"[]", "empty JSON array"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[1, 2]", "must be a JSON object or a string"),
    (b'{"msg": "x", "service": ""}', "service must be a non-empty string"),
    (b'{"msg": "x", "ts": "half past nine"}', "not a date"),
    (b'{"msg": "x", "ts": true}', "must be a time"),
])
def test_malformed_records_are_refused_with_a_reason(value, reason):
    with pytest.raises(InvalidRecord, match=reason):
        parse_record(value, context())


def test_a_line_without_any_service_is_refused():
    with pytest.raises(InvalidRecord, match="no service"):
        parse_record(b"plain line", context(None))


def test_level_spellings():
    assert [normalize_level(v) for v in ("WARNING", "Err", "critical", 3, "nonsense", True)] == [
        "warn", "error", "fatal", "error", None, None,
    ]
    assert guess_level("all good") == "info"
    assert guess_level("java.lang.IllegalStateException: boom") == "info"  # no marker, no bare 'Exception'
    assert guess_level("Exception in thread main") == "error"
    assert guess_level("[DEBUG] x") == "debug"


def test_logfmt_detection_refuses_prose():
    assert parse_logfmt("user=9 logged in") is None  # 'logged' and 'in' are not key=value
    assert parse_logfmt('a="unbalanced') is None
    assert parse_logfmt("x=1 y=2") is None  # no msg or level: not a log line we can tell apart
    assert parse_logfmt("level=info msg=ok") == {"level": "info", "msg": "ok"}


def test_index_names_and_ids_are_deterministic():
    assert index_name("logs-{service}-{date:%Y.%m.%d}", "Cart Service", "2024-11-01T23:59:59.999Z") == "logs-cart-service-2024.11.01"
    assert index_template_patterns("logs-{service}-{date:%Y.%m.%d}") == ["logs-*"]
    assert document_id("logs", 3, 1200, 7) == "logs-3-1200-7"


def test_logfmt_epoch_times_are_read_as_epoch_seconds_or_milliseconds():
    (seconds,) = parse_record(b"ts=1730455200.5 level=info msg=a", context())
    (millis,) = parse_record(b"ts=1730455200500 level=info msg=a", context())
    assert seconds["@timestamp"] == millis["@timestamp"] == "2024-11-01T10:00:00.500Z"


def test_epoch_numbers_are_formatted_exactly_as_through_a_datetime():
    import random

    rng = random.Random(7)
    values = [1730455200, 1730455200.0005, 1730455200.0015, 1730455200.9995, 1730455200.999999, 1730455200.001,
              1730455200123, 1730455200999.5, 946684800.5, 4102444799.9996]
    values += [rng.uniform(1e9, 4e9) for _ in range(20000)] + [rng.uniform(1e12, 4e12) for _ in range(5000)]
    values += [rng.randrange(10**9, 4 * 10**9) for _ in range(1000)]

    assert [timestamp_text(v) for v in values] == [iso_timestamp(to_timestamp(v)) for v in values]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1, 0, True, 1e18])
def test_epoch_numbers_that_are_not_times_are_refused(value):
    with pytest.raises(InvalidRecord):
        timestamp_text(value)
