"""Decoding and validating metric samples, without Kafka."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.metrics import merge_latest
from app.topics import InvalidKey, key_text
from models.metrics import EARLIEST_TS, InvalidRecord, MetricSample, parse_record, parse_samples

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

    state = merge_latest({}, [newer], max_instances=10, expires=3600)
    state = merge_latest(state, [older], max_instances=10, expires=3600)

    assert state == {"metrics": {"cpu": {"cart-1": {"value": 0.9, "ts": 200.0}}}, "samples": 2}


def test_the_latest_view_keeps_the_latest_reporters_of_a_metric_and_forgets_silent_ones():
    samples = [MetricSample("cart", f"pod-{n}", "cpu", 0.5, 1000.0 + n) for n in range(50)]

    state = merge_latest({}, samples, max_instances=10, expires=3600)
    assert sorted(state["metrics"]["cpu"]) == sorted(f"pod-{n}" for n in range(40, 50))

    later = merge_latest(state, [MetricSample("cart", "pod-new", "mem", 0.1, 1049.0 + 3600 + 1)], max_instances=10, expires=3600)
    assert later["metrics"] == {"mem": {"pod-new": {"value": 0.1, "ts": 4650.0}}}  # cpu's reporters fell silent an hour ago


def test_a_sample_from_the_future_expires_no_instance_of_the_latest_view():
    state = merge_latest({}, [MetricSample("cart", "pod-1", "cpu", 0.5, 1000.0)], max_instances=10, expires=60)

    state = merge_latest(state, [MetricSample("cart", "pod-2", "cpu", 0.5, 5000.0)], max_instances=10, expires=60, now=1010.0)

    assert sorted(state["metrics"]["cpu"]) == ["pod-1", "pod-2"]


def test_a_record_key_that_is_not_utf8_is_refused():
    assert key_text(b"cart") == "cart" and key_text(None) is None
    with pytest.raises(InvalidKey, match="not UTF-8"):
        key_text(b"\xff\xfe")


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"[" * 20_000 + b"]" * 20_000, "nested too deeply"),
        (b'{"metric": "cpu", "value": ' + b"9" * 5000 + b"}", "not JSON"),
        (b'{"metric": "cpu", "value": 1' + b"0" * 400 + b"}", "field 'value' is beyond"),
        (b'{"metric": "cpu", "value": 1, "ts": 1' + b"0" * 400 + b"}", "field 'ts' is beyond"),
        (b'{"metric": "cpu", "value": 1, "ts": 253402300799}', "not a plausible event time"),
        (b'{"metric": "cpu\\ud800", "value": 1}', "not valid Unicode"),
        (b'{"metric": "cpu\\u001fmem", "value": 1}', "U+001F"),
        (b'{"metric": "' + b"m" * 300 + b'", "value": 1}', "longer than 256"),
    ],
)
def test_a_hostile_record_is_refused_with_a_reason_not_an_unexpected_error(raw, reason):
    with pytest.raises(InvalidRecord) as refused:
        parse_samples(raw, "cart")
    assert reason in str(refused.value)


def test_an_array_keeps_its_valid_samples_and_names_the_refused_elements():
    raw = json.dumps([{"metric": "cpu", "value": 1}, {"metric": "cpu", "value": "x"}, 7, {"metric": "mem", "value": 2}]).encode()

    record = parse_record(raw, "cart", now=NOW)

    assert [(s.metric, s.value) for s in record.samples] == [("cpu", 1.0), ("mem", 2.0)]
    assert [index for index, _ in record.refused] == [1, 2]
    with pytest.raises(InvalidRecord, match=r"2 of 4 samples refused \(indexes 1, 2\); the other 2 were applied"):
        parse_samples(raw, "cart", now=NOW)


def test_an_array_of_refused_elements_is_refused_whole():
    with pytest.raises(InvalidRecord, match=r"2 of 2 samples refused \(indexes 0, 1\): \[0\] .*; \[1\] "):
        parse_record(b'[{"value": 1}, []]', "cart")


good_sample = st.builds(
    lambda metric, value, age: {"metric": metric, "value": value, "ts": NOW - age},
    st.sampled_from(["cpu", "memory", "latency_ms"]),
    st.floats(min_value=-1e12, max_value=1e12, allow_nan=False),
    st.floats(min_value=0, max_value=86400),
)
hostile_element = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.fixed_dictionaries(
        {
            "metric": st.just("cpu"),
            "value": st.one_of(
                st.text(max_size=3),
                st.booleans(),
                st.none(),
                st.just(float("nan")),
                st.just(float("inf")),
                st.integers(min_value=10**151, max_value=10**4000),
                st.floats(min_value=1.1e150, max_value=1e308),
            ),
        }
    ),
    st.fixed_dictionaries(
        {
            "metric": st.just("cpu"),
            "value": st.just(1),
            "ts": st.one_of(
                st.integers(min_value=10**151, max_value=10**4000),
                st.floats(max_value=EARLIEST_TS - 1),
                st.floats(min_value=NOW + 4000),
            ),
        }
    ),
    st.fixed_dictionaries({"metric": st.text(alphabet="\x1f\ud800 ", max_size=4), "value": st.just(1)}),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.data()), min_size=1, max_size=20))
def test_any_array_applies_exactly_its_valid_elements_and_refuses_exactly_the_others(choices):
    elements, valid_indexes = [], []
    for index, (valid, data) in enumerate(choices):
        elements.append(data.draw(good_sample if valid else hostile_element))
        if valid:
            valid_indexes.append(index)
    raw = json.dumps(elements).encode()

    if not valid_indexes:
        with pytest.raises(InvalidRecord, match="samples refused"):
            parse_record(raw, "cart", now=NOW)
        return
    record = parse_record(raw, "cart", now=NOW)

    assert [(s.metric, s.value, s.ts) for s in record.samples] == [
        (elements[i]["metric"], float(elements[i]["value"]), elements[i]["ts"]) for i in valid_indexes
    ]
    assert [index for index, _ in record.refused] == [i for i in range(len(elements)) if i not in valid_indexes]
    assert all(reason for _, reason in record.refused)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=64),
        st.text(max_size=64).map(str.encode),
        st.recursive(
            st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
            max_leaves=20,
        ).map(lambda value: json.dumps(value).encode()),
    )
)
def test_any_bytes_give_samples_or_an_invalid_record_never_another_error(raw):
    try:
        record = parse_record(raw, "cart", now=NOW)
    except InvalidRecord as error:
        assert str(error)
    else:
        assert record.samples and all(isinstance(sample.value, float) for sample in record.samples)


def test_a_name_accepted_once_is_still_checked_in_its_padded_or_hostile_forms():
    good = b'{"service": "cart", "instance": "cart-1", "metric": "cpu", "value": 1, "ts": 1732412345}'
    assert parse_samples(good, None)[0].instance == "cart-1"
    assert parse_samples(good, None)[0].instance == "cart-1"  # the second time from the names already checked

    padded = parse_samples(b'{"service": "cart", "instance": " cart-1 ", "metric": "cpu", "value": 1, "ts": 1732412345}', None)
    assert padded[0].instance == "cart-1"
    with pytest.raises(InvalidRecord, match="'instance'"):
        parse_samples(b'{"service": "cart", "instance": ["cart-1"], "metric": "cpu", "value": 1, "ts": 1732412345}', None)
