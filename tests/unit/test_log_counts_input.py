"""``log-counts`` is internal, but its records are read like any input: valid LogCounts and hostile
records mixed go through count_log_lines (on the runtime); every valid one is folded into its
service's statistics, every hostile one is a dead letter with a reason, nothing stops the agent."""

from __future__ import annotations

import json
import uuid
from typing import Any, List, Tuple

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agents.logs
from agents.logs import count_log_lines, merge_recent
from models.logs import LogCounts, fold_counts, log_counts_from_json
from tables.logs import log_stats, recent_lines
from tests.unit.metrics_helpers import Letters, until

WINDOW = 60.0
NOW_WINDOW = 4_000_000_000.0  # far ahead: no window of the tests ends, so none is closed

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
ROW = st.one_of(
    st.tuples(st.integers(0, 10), st.floats(0, 1e10), st.sampled_from(["info", "error"]), st.integers(0, 5)).map(list),
    st.lists(st.integers(0, 1000), max_size=4, unique=True).flatmap(
        lambda offsets: st.tuples(
            st.just(NOW_WINDOW),
            st.sampled_from(["info", "error"]),
            st.just(sorted(offsets)),
            st.lists(st.integers(0, 5), min_size=len(offsets), max_size=len(offsets)),
        ).map(list)
    ),
)
VALID = st.builds(
    lambda rows, partition: {
        "service": "cart",
        "source_partition": partition,
        "counts": rows,
        "recent": [{"id": "x", "@timestamp": "2024-01-01T00:00:00Z"}],
    },
    st.lists(ROW, max_size=4),
    st.integers(-1, 7),
)
FIELD_MUTATION = st.tuples(st.sampled_from(["service", "source_partition", "counts", "recent"]), JSON)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(VALID, VALID.flatmap(lambda valid: FIELD_MUTATION.map(lambda change: {**valid, change[0]: change[1]})), JSON))
def test_a_record_is_folded_without_error_or_refused_with_a_reason(value: Any) -> None:
    raw = orjson.dumps(value)
    try:
        counts = log_counts_from_json(raw)
    except ValueError as error:  # orjson's JSONDecodeError and InvalidRecord are ValueErrors
        assert str(error)
        return
    state = fold_counts({}, counts, window=WINDOW, keep=10)
    merge_recent([], counts.recent, 10)
    json.dumps(state)  # what the table's changelog writes


def test_what_the_shipping_side_sends_is_read_back_unchanged() -> None:
    sent = LogCounts(service="cart", source_partition=3, counts=[[NOW_WINDOW, "error", [4, 9], [1, 2]]], recent=[])
    read = log_counts_from_json(sent.dumps())
    assert (read.service, read.source_partition, read.counts, read.recent) == ("cart", 3, sent.counts, [])


async def test_hostile_log_counts_amid_valid_ones_become_dead_letters_and_the_valid_are_counted(monkeypatch) -> None:
    letters = Letters()
    monkeypatch.setattr("app.runtime.dead_letter", letters)
    closed: List[Tuple[str, float]] = []

    async def record_error_rate(service: str, start: float, levels: Any) -> None:
        closed.append((service, start))

    monkeypatch.setattr(agents.logs, "send_error_rate", record_error_rate)
    service = f"svc-{uuid.uuid4().hex[:10]}"
    hostile = [
        b"{not json",
        b"[]",
        orjson.dumps({"service": service, "source_partition": 0, "counts": [[1, 2]], "recent": []}),
        orjson.dumps({"service": service, "source_partition": True, "counts": [], "recent": []}),
        orjson.dumps({"service": service, "source_partition": 0, "counts": [], "recent": [{"id": 1}]}),
        b'{"service": "' + service.encode() + b'", "source_partition": 0, "counts": [[' + b"9" * 400 + b', 1.0, "info", 1]], "recent": []}',
    ]
    async with count_log_lines.test_context() as agent:
        for offset in range(3):
            valid = LogCounts(service=service, source_partition=0, counts=[[offset, NOW_WINDOW, "error", 2]], recent=[])
            await agent.put(valid.dumps(), key=service.encode())
            await agent.put(hostile[2 * offset], key=service.encode())
            await agent.put(hostile[2 * offset + 1], key=service.encode())
        await until(lambda: len(letters) == len(hostile) and log_stats[service].get("offsets", {}).get("0") == 2)

    assert len(letters) == len(hostile) and all(reason for _, reason in letters)
    assert log_stats[service]["windows"] == {"4000000000.000": {"error": 6}}
    assert recent_lines[service] == [] and closed == []
