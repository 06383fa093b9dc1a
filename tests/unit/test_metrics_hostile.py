"""The metrics agent under Faust's test_context with hostile records: each one becomes a dead letter
with a reason while the good records of its batch are applied; arrays keep their good elements;
a batch whose apply fails is applied again, never skipped; a replayed record is not counted twice."""
from __future__ import annotations

import asyncio
import json
from typing import Any, Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.metrics import alerts_topic, record_samples
from tables.metrics import latest_samples
from tests.unit.metrics_helpers import (
    DEEP,
    T0,
    FlakyAlerts,
    Letters,
    counted,
    encoded,
    pane_counts,
    sample,
    service_name,
    until,
)


@pytest.fixture
def letters(monkeypatch) -> Letters:
    recorded = Letters()
    monkeypatch.setattr("app.runtime.dead_letter", recorded)
    monkeypatch.setattr("agents.metrics.dead_letter", recorded)
    return recorded


HOSTILE_RECORDS: List[Tuple[str, bytes]] = [
    ("nested 20,000 deep", DEEP),
    ("integer of 5,000 digits", b'{"metric": "cpu", "value": ' + b"9" * 5000 + b"}"),
    ("integer beyond float range", b'{"metric": "cpu", "value": 1' + b"0" * 400 + b"}"),
    ("timestamp beyond float range", b'{"metric": "cpu", "value": 1, "ts": 1' + b"0" * 400 + b"}"),
    ("timestamp in year 9999", encoded(sample(ts=253402300799.0))),
    ("lone surrogate in a name", b'{"metric": "cpu\\ud800", "value": 1}'),
    ("key separator in a name", encoded(sample(metric="cpu\x1fmem"))),
    ("not UTF-8", b"\xff\xfe{}"),
    ("NaN value", b'{"metric": "cpu", "value": NaN}'),
    ("value not a number", encoded(sample(value={"deep": [[[1]]]}))),
    ("empty", b""),
]


async def test_each_hostile_record_is_a_dead_letter_and_the_good_records_around_it_apply(letters):
    service = service_name()
    async with record_samples.test_context() as agent:
        await agent.put(encoded(sample(value=0.1, ts=T0)), key=service.encode())
        for _, raw in HOSTILE_RECORDS:
            await agent.put(raw, key=service.encode())
        await agent.put(encoded(sample(value=0.2, ts=T0 + 1)), key=service.encode())
        await agent.put(encoded(sample(value=0.3, ts=T0 + 2)), key=b"\xff\xfe")  # key not UTF-8
        await until(lambda: counted(service) == 2 and len(letters) == len(HOSTILE_RECORDS) + 1)

    assert counted(service) == 2 and pane_counts(service) == 2
    assert latest_samples[service]["metrics"]["cpu"]["i-1"] == {"value": 0.2, "ts": T0 + 1}
    assert [offset for offset, _ in letters] == list(range(1, len(HOSTILE_RECORDS) + 1)) + [len(HOSTILE_RECORDS) + 2]
    assert all(reason for _, reason in letters)
    assert "nested too deeply" in letters[0][1] and "not UTF-8" in letters[-1][1]


async def test_an_array_keeps_its_good_elements_and_its_record_is_dead_lettered_naming_the_bad_ones(letters):
    service = service_name()
    elements = [sample(ts=T0), sample(value="high", ts=T0 + 1), sample(ts=T0 + 2), [], sample(value=1e400, ts=T0 + 3)]
    raw = json.dumps(elements).encode()  # 1e400 is written as Infinity
    async with record_samples.test_context() as agent:
        await agent.put(raw, key=service.encode())
        await until(lambda: counted(service) == 2 and letters)

    assert counted(service) == 2 and pane_counts(service) == 2
    [(offset, reason)] = letters
    assert offset == 0
    assert reason.startswith("3 of 5 samples refused (indexes 1, 3, 4); the other 2 were applied")
    assert "[1] field 'value' must be a finite number" in reason and "[3] a sample must be a JSON object" in reason


async def test_a_replayed_record_is_not_counted_twice(letters):
    service = service_name()
    records = [encoded(sample(value=float(i), ts=T0 + i)) for i in range(5)]
    async with record_samples.test_context() as agent:
        for raw in records:
            await agent.put(raw, key=service.encode())
        await until(lambda: counted(service) == 5)
        agent.sent_offset = 2  # the broker delivers offsets 2..4 again, as after a crash before the commit
        for raw in records[2:]:
            await agent.put(raw, key=service.encode())
        await agent.put(encoded(sample(value=5.0, ts=T0 + 5)), key=service.encode())
        await until(lambda: counted(service) == 6)
        await asyncio.sleep(0.3)  # a replay counted twice would land with the same batch

    assert counted(service) == 6 and pane_counts(service) == 6
    assert latest_samples[service]["metrics"]["cpu"]["i-1"] == {"value": 5.0, "ts": T0 + 5}


def cpu_spike(service: str, seconds: int = 45) -> List[bytes]:
    """CPU at 0.99 for ``seconds``: the default HighCPU rule (mean over 60 s > 0.9 for 30 s) fires."""
    return [encoded(sample(value=0.99, ts=T0 + i)) for i in range(seconds)]


async def test_a_batch_whose_apply_fails_is_applied_again_and_counted_once(letters, monkeypatch):
    alerts = FlakyAlerts(failures=2)
    monkeypatch.setattr(alerts_topic, "send", alerts.send)
    service = service_name()
    async with record_samples.test_context() as agent:
        for raw in cpu_spike(service):
            await agent.put(raw, key=service.encode())
        await until(lambda: alerts.sent and counted(service) == 45)
        await asyncio.sleep(0.3)

    assert [(alert.rule, alert.service, alert.status) for alert in alerts.sent] == [("HighCPU", service, "firing")]
    assert counted(service) == 45 and pane_counts(service) == 45
    assert letters == []


# --- property: any mix of valid and hostile records ------------------------------------------------

valid_sample = st.builds(
    lambda metric, value: {"metric": metric, "instance": "i-1", "value": value},
    st.sampled_from(["cpu", "memory"]),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
)
bad_element = st.one_of(
    st.sampled_from([
        {"metric": "cpu", "instance": "i-1", "value": "high"},
        {"metric": "cpu", "instance": "i-1", "value": True},
        {"metric": "", "instance": "i-1", "value": 1},
        {"instance": "i-1", "value": 1},
        {"metric": "cpu", "instance": "i-1", "value": 1, "service": "someone-else"},
        {"metric": "cpu", "instance": "i-1", "value": 1, "ts": 12.5},
        {"metric": "x" * 300, "instance": "i-1", "value": 1},
        [], 7, None, "text",
    ]),
    st.integers(min_value=10**151, max_value=10**4000).map(lambda n: {"metric": "cpu", "instance": "i-1", "value": n}),
    st.integers(min_value=10**151, max_value=10**4000).map(lambda n: {"metric": "cpu", "instance": "i-1", "value": 1, "ts": n}),
)
hostile_raw = st.one_of(
    st.just(DEEP),
    st.just(b'{"metric": "cpu", "value": ' + b"7" * 4400 + b"}"),
    st.binary(max_size=40).map(lambda b: b"\xff" + b),  # never UTF-8
    st.just(b"[]"),
    st.just(b""),
)
# A record: ("sample", sample) | ("array", [("ok", sample) | ("bad", element)]) | ("raw", bytes)
record = st.one_of(
    st.tuples(st.just("sample"), valid_sample),
    st.tuples(st.just("array"), st.lists(st.one_of(st.tuples(st.just("ok"), valid_sample), st.tuples(st.just("bad"), bad_element)), min_size=1, max_size=6)),
    st.tuples(st.just("raw"), hostile_raw),
    st.tuples(st.just("bad"), bad_element),
)


def expected_outcome(records) -> Tuple[List[bytes], List[Dict[str, Any]], Dict[int, Optional[List[int]]]]:
    """The encoded records, the valid samples in order (ts T0, T0 + 1, ... by position), and per
    dead-lettered offset the refused indexes of its array (None: the whole record)."""
    raws, valid, letters = [], [], {}
    for offset, (kind, body) in enumerate(records):
        if kind == "sample":
            body = {**body, "ts": T0 + len(valid)}
            valid.append(body)
            raws.append(encoded(body))
        elif kind == "array":
            elements, bad = [], []
            for index, (quality, element) in enumerate(body):
                if quality == "ok":
                    element = {**element, "ts": T0 + len(valid)}
                    valid.append(element)
                else:
                    bad.append(index)
                elements.append(element)
            raws.append(encoded(elements))
            if bad:
                letters[offset] = bad if len(bad) < len(body) else None
        else:
            raws.append(body if kind == "raw" else encoded(body))
            letters[offset] = None
    return raws, valid, letters


def latest_of(samples: List[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    latest: Dict[str, Dict[str, Dict[str, float]]] = {}
    for body in samples:
        latest[body["metric"]] = {"i-1": {"value": float(body["value"]), "ts": body["ts"]}}
    return latest


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(records=st.lists(record, min_size=1, max_size=12))
async def test_any_mix_of_valid_and_hostile_records_applies_every_valid_sample_and_dead_letters_the_rest(letters, records):
    letters.clear()
    service = service_name()
    raws, valid, expected_letters = expected_outcome(records)
    async with record_samples.test_context() as agent:
        for raw in raws:
            await agent.put(raw, key=service.encode())
        await until(lambda: counted(service) == len(valid) and len(letters) == len(expected_letters))
        await asyncio.sleep(0.25)  # anything extra would arrive with the last batch

    assert counted(service) == len(valid)
    assert sum(pane_counts(service, metric) for metric in ("cpu", "memory")) == len(valid)
    if valid:
        assert latest_samples[service]["metrics"] == latest_of(valid)
    assert sorted(offset for offset, _ in letters) == sorted(expected_letters)
    for offset, reason in letters:
        bad = expected_letters[offset]
        if bad is not None:
            assert f"(indexes {', '.join(map(str, bad))})" in reason
        assert reason
