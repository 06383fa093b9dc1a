"""Decoding and validating metric samples, without Kafka."""
from __future__ import annotations

import json

import pytest

from agents.metrics import merge_latest
from models.metrics import key_text
from models.metrics import InvalidRecord, MetricSample, parse_samples


NOW = 1732412400.0


def test_a_single_sample_is_decoded_with_its_event_time():
    raw = json.dumps({"service": "cart", "instance": "cart-1", "metric": "cpu", "value": 0.93, "ts": 1732412345.12}).encode()

    assert parse_samples(raw, "cart") == [MetricSample("cart", "cart-1", "cpu", 0.93, 1732412345.12)]


def test_a_batch_of_samples_is_first_class():
    raw = json.dumps([{"metric": "cpu", "value": 1}, {"metric": "memory", "value": 2, "instance": "cart-2"}]).encode()

    samples = parse_samples(raw, "cart", now=NOW)

    assert [(s.service, s.instance, s.metric, s.value, s.ts) for s in samples] == [
        ("cart", "cart", "cpu", 1.0, NOW),
        ("cart", "cart-2", "memory", 2.0, NOW),
    ]


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"", "empty record"),
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "empty sample array"),
        (b"42", "must be a JSON object"),
        (b'{"metric": "cpu", "value": "high"}', "field 'value' must be a finite number"),
        (b'{"metric": "cpu", "value": true}', "field 'value' must be a finite number"),
        (b'{"metric": "cpu", "value": NaN}', "field 'value' must be a finite number"),
        (b'{"value": 1}', "field 'metric' must be a non-empty string"),
        (b'{"service": "order", "metric": "cpu", "value": 1}', "does not match the record key 'cart'"),
        (b'{"metric": "cpu", "value": 1, "ts": 1732412345000}', "not a plausible event time"),
        (b'{"metric": "cpu", "value": 1, "ts": 12.5}', "not a plausible event time"),
        (b'{"metric": "cpu", "value": 1e308}', "field 'value' is beyond"),
    ],
)
def test_a_bad_record_is_refused_with_a_reason(raw, reason):
    with pytest.raises(InvalidRecord) as refused:
        parse_samples(raw, "cart")
    assert reason in str(refused.value)


def test_a_keyless_record_names_its_service_in_the_body():
    assert parse_samples(b'{"service": "order", "metric": "cpu", "value": 1, "ts": 1732412345}', None)[0].service == "order"
    with pytest.raises(InvalidRecord, match="'service'"):
        parse_samples(b'{"metric": "cpu", "value": 1}', None)


def test_an_older_sample_never_overwrites_a_newer_one():
    newer = MetricSample("cart", "cart-1", "cpu", 0.9, 200.0)
    older = MetricSample("cart", "cart-1", "cpu", 0.1, 100.0)  # merge_latest orders by ts alone

    state = merge_latest({}, [newer])
    state = merge_latest(state, [older])

    assert state == {"metrics": {"cpu": {"cart-1": {"value": 0.9, "ts": 200.0}}}, "samples": 2}


def test_a_record_key_that_is_not_utf8_is_refused():
    assert key_text(b"cart") == "cart" and key_text(None) is None
    with pytest.raises(InvalidRecord, match="not UTF-8"):
        key_text(b"\xff\xfe")
