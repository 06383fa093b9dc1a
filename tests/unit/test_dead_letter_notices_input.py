"""``dead-letters`` notices are read like any input: valid notices amid hostile records are counted
per source topic, every hostile record is itself a dead letter with a reason."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.dead_letters import count_dead_letters
from models.dead_letters import DeadLetter, dead_letter_from_json
from tables.dead_letters import dead_letter_counts
from tests.unit.metrics_helpers import Letters, until

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
VALID = st.builds(
    lambda topic, partition, offset, at: {"source_topic": topic, "partition": partition, "offset": offset, "reason": "bad", "at": at},
    st.text(min_size=1, max_size=10),
    st.integers(0, 100),
    st.integers(0, 2**40),
    st.floats(0, 2e9),
)
MUTATED = VALID.flatmap(lambda valid: st.tuples(st.sampled_from(sorted(valid)), JSON).map(lambda change: {**valid, change[0]: change[1]}))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(VALID, MUTATED, JSON))
def test_a_notice_is_read_with_its_types_or_refused_with_a_reason(value: Any) -> None:
    try:
        notice = dead_letter_from_json(orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS))
    except (ValueError, orjson.JSONEncodeError) as error:
        assert str(error)
        return
    assert isinstance(notice.source_topic, str) and notice.source_topic
    assert isinstance(notice.partition, int) and isinstance(notice.offset, int) and isinstance(notice.reason, str)
    orjson.dumps(notice.asdict())  # what the counts table and its page write


async def test_hostile_notices_amid_valid_ones_are_dead_letters_and_the_valid_are_counted(monkeypatch) -> None:
    letters = Letters()
    monkeypatch.setattr("app.runtime.dead_letter", letters)
    topic = f"orders-{uuid.uuid4().hex[:8]}"
    hostile = [b"{not json", b"[1]", orjson.dumps({"source_topic": topic, "partition": "0", "offset": 1, "reason": "x", "at": 1.0})]
    async with count_dead_letters.test_context() as agent:
        for offset, bad in enumerate(hostile):
            notice = DeadLetter(source_topic=topic, partition=0, offset=offset, reason=f"reason {offset}", at=1.0)
            await agent.put(notice.dumps(), key=topic)
            await agent.put(bad, key=topic)
        await until(lambda: len(letters) == len(hostile) and dead_letter_counts[topic].count == 3)

    assert len(letters) == 3 and all(reason for _, reason in letters)
    stats = dead_letter_counts[topic]
    assert (stats.count, stats.last_reason, stats.last_offset) == (3, "reason 2", 2)
