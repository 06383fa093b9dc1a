"""The migration agents under Faust's test_context, fuzzed with valid and hostile records mixed.

What the agents send is captured at Kafka's door (``Topic.send``): the V2 orders, the routed
commands and the dead letters (``<topic>.dlq`` copies with a ``dlq.reason`` header, sent by the
real app/dead_letters.py), so the tests see the bytes a consumer would get. Tables are in memory.
"""
from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import faust
import orjson
import pytest
from faust.types import Message
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from agents import migration
from models.migration import canary_bucket
from tables.migration import order_events, partition_state, pending_results

V2_FIELDS = {"order_id", "customer_id", "amount", "state", "created_at", "source_version", "event_id"}
ROUTED_FIELDS = {"command_id", "order_id", "action", "payload", "system", "answers", "phase", "canary_percent"}
FUZZ = hypothesis_settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# --- capture at Kafka's door ----------------------------------------------------------------------


class Sent(NamedTuple):
    topic: str
    key: Optional[bytes]
    value: Any
    headers: Dict[str, bytes]


class Kafka:
    """Every record the worker sends, in order (a sent Record is kept as the bytes Faust writes)."""

    def __init__(self) -> None:
        self.sent: List[Sent] = []
        self.failures = 0  # sends to refuse before the next ones succeed

    async def send(self, topic, *, key=None, value=None, partition=None, headers=None, **_: Any):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker away")
        if isinstance(value, faust.Record):
            value = value.dumps()
        self.sent.append(Sent(topic.get_topic_name(), key, value, dict(headers or {})))
        delivery = asyncio.get_running_loop().create_future()
        delivery.set_result(None)
        return delivery

    def to(self, topic: str) -> List[Sent]:
        return [record for record in self.sent if record.topic == topic]

    def letters(self, topic: str) -> List[Tuple[int, str]]:
        """(source offset, reason) of each dead letter from ``topic``."""
        return [(int(record.headers["dlq.offset"]), record.headers["dlq.reason"].decode())
                for record in self.to(topic + ".dlq")]


@pytest.fixture
def kafka(monkeypatch) -> Kafka:
    kafka = Kafka()

    async def send(topic, **kwargs):
        return await kafka.send(topic, **kwargs)

    async def declared(topic) -> None:
        return None

    monkeypatch.setattr(faust.Topic, "send", send)
    monkeypatch.setattr(faust.Topic, "maybe_declare", declared)
    monkeypatch.setattr(migration, "BATCH_WITHIN", 0.01, raising=False)
    monkeypatch.setattr("app.runtime.MAX_BACKOFF", 0.01)
    return kafka


def clear_tables() -> None:
    for table in (order_events, partition_state, pending_results):
        table.data.clear()


async def put(agent, value: Optional[bytes], key: Optional[bytes] = None, partition: int = 0,
              topic: Optional[str] = None) -> int:
    """Hand the agent one record (of ``topic`` for a multi-topic agent); returns its offset."""
    offset = agent.sent_offset
    message = Message(topic=topic or agent.original_channel.get_topic_name(), partition=partition, offset=offset,
                      timestamp=time.time(), timestamp_type=0, headers=None, key=key, value=value, checksum=b"",
                      serialized_key_size=0, serialized_value_size=0, generation_id=agent.app.consumer_generation_id)
    channel = agent.stream().channel
    await channel.put(await channel.decode(message))
    agent.sent_offset += 1
    return offset


async def settled(done: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until the agent has handled what was put (``done``), at most ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not done() and loop.time() < deadline:
        await asyncio.sleep(0.01)


def counters(kind: str) -> Dict[str, Any]:
    total: Dict[str, Any] = {}
    for key, stats in partition_state.items():
        if key.decode().startswith(kind + ":"):
            migration.add_counters(total, stats)
    return total


def json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


# --- hostile records seen on these topics ---------------------------------------------------------

DEEP = b"[" * 10_000 + b"]" * 10_000
NOT_UTF8 = b'{"id": "\xff\xfe"}'
HUGE_DIGITS = "9" * 5000  # over Python's 4,300-digit limit for int(str)
BEYOND_FLOAT = "1" + "0" * 400  # an integer float() cannot hold


def with_raw(template: Dict[str, Any], field: str, raw: str) -> bytes:
    """``template`` as JSON with ``field`` set to raw JSON text (numbers Python cannot print)."""
    text = json.dumps({**template, field: "@@RAW@@"})
    return text.replace('"@@RAW@@"', raw).encode()


def nested_in(template: Dict[str, Any], field: str, depth: int) -> bytes:
    return with_raw(template, field, "[" * depth + "]" * depth)


# --- orders.v1 -> the bridge ----------------------------------------------------------------------

STATES = {"NEW": "created", "PAID": "paid", "SHIPPED": "shipped", "DELIVERED": "delivered",
          "CANCELLED": "cancelled", "REFUNDED": "refunded"}


class V1Case(NamedTuple):
    key: bytes
    value: bytes
    expected: Optional[Dict[str, Any]]  # the V2 event, or None for a record that must be refused


@st.composite
def valid_v1(draw, i: int) -> V1Case:
    """A valid V1 event of schema 1 or 2 and its V2 event, computed here independently."""
    order_id = f"o-{i}-{draw(st.sampled_from(['a', 'é', '注文']))}"
    status = draw(st.sampled_from(sorted(STATES)))
    cents = draw(st.one_of(st.integers(0, 10**6), st.integers(10**18, 10**24)))  # past 64 bits too
    utc = draw(st.datetimes(datetime(1900, 1, 2), datetime(2100, 1, 1))).replace(microsecond=0)
    offset = timedelta(minutes=draw(st.integers(-12 * 60, 14 * 60)))
    local = (utc + offset).replace(tzinfo=timezone(offset))
    amount = f"{cents // 100}.{cents % 100:02d}"
    if draw(st.booleans()):
        event: Dict[str, Any] = {"id": order_id, "customer": f"c-{i}", "total_cents": cents, "status": status,
                                 "created": utc.strftime("%Y-%m-%d %H:%M:%S"), "event_id": f"e-{i}"}
        currency, version = "USD", 1
    else:
        currency, version = draw(st.sampled_from(["EUR", "usd", "JPY"])), 2
        event = {"schema_version": 2, "event_id": f"e-{i}", "id": order_id, "customer": f"c-{i}", "total": amount,
                 "currency": currency, "status": status.lower(), "created_at": local.isoformat()}
    expected = {"order_id": order_id, "customer_id": f"c-{i}", "amount": {"value": amount, "currency": currency.upper()},
                "state": STATES[status], "created_at": utc.strftime("%Y-%m-%dT%H:%M:%SZ"), "source_version": version,
                "event_id": f"e-{i}"}
    return V1Case(order_id.encode(), json_bytes(event), expected)


V1_TEMPLATE = {"id": "o-bad", "customer": "c", "total_cents": 100, "status": "NEW", "created": "2024-11-01 10:00:00"}
V1_SCHEMA_2 = {"schema_version": 2, "id": "o-bad", "customer": "c", "total": "1.00", "currency": "EUR", "status": "NEW",
               "created_at": "2024-11-01T10:00:00Z"}
HOSTILE_V1 = {
    "nested 10,000 deep": DEEP,
    "a field nested 10,000 deep": nested_in(V1_TEMPLATE, "note", 10_000),
    "a 5,000-digit integer": with_raw(V1_TEMPLATE, "total_cents", HUGE_DIGITS),
    "an amount too large to quantize": json_bytes({**V1_TEMPLATE, "total_cents": 10**40}),
    "a total beyond float range": with_raw(V1_SCHEMA_2, "total", BEYOND_FLOAT),
    "a total of 1e999999": json_bytes({**V1_SCHEMA_2, "total": "1e999999"}),
    "a number literal that is infinite": with_raw(V1_SCHEMA_2, "total", "1e400"),
    "NaN": with_raw(V1_SCHEMA_2, "total", "NaN"),
    "year 1 east of UTC": json_bytes({**V1_SCHEMA_2, "created_at": "0001-01-01T00:30:00+01:00"}),
    "year 9999 west of UTC": json_bytes({**V1_SCHEMA_2, "created_at": "9999-12-31T23:30:00-01:00"}),
    "an event id orjson cannot write": json_bytes({**V1_TEMPLATE, "event_id": "\ud800"}),
    "an order id orjson cannot write": json_bytes({**V1_TEMPLATE, "id": "\udfff"}),
    "not UTF-8": NOT_UTF8,
    "a status of the wrong type": json_bytes({**V1_TEMPLATE, "status": 5}),
    "not an object": b"[1, 2]",
    "no value": None,
}


@st.composite
def v1_records(draw) -> List[V1Case]:
    kinds = draw(st.lists(st.one_of(st.none(), st.sampled_from(sorted(HOSTILE_V1))), min_size=1, max_size=14))
    cases = []
    for i, kind in enumerate(kinds):
        if kind is None:
            cases.append(draw(valid_v1(i)))
        else:
            cases.append(V1Case(b"o-bad", HOSTILE_V1[kind], None))
    if draw(st.booleans()):
        cases.append(V1Case(b"o-1", json_bytes({**V1_TEMPLATE, "id": "o-2"}), None))  # keyed by another order
    return cases


@FUZZ
@given(cases=v1_records(), partitions=st.lists(st.integers(0, 2), min_size=20, max_size=20))
async def test_the_bridge_translates_every_valid_v1_event_and_dead_letters_every_hostile_one(kafka, cases, partitions):
    kafka.sent.clear()
    clear_tables()
    valid = [case for case in cases if case.expected is not None]
    async with migration.translate_v1_orders.test_context() as agent:
        offsets = [await put(agent, case.value, case.key, partitions[i % 20]) for i, case in enumerate(cases)]
        await settled(lambda: counters("bridge").get("translated", 0) + counters("bridge").get("dead_lettered", 0) == len(cases))

    v2 = kafka.to("orders.v2")
    assert [orjson.loads(record.value) for record in v2] == [case.expected for case in valid]
    assert all(set(orjson.loads(record.value)) == V2_FIELDS for record in v2)  # no "__faust" metadata
    assert [record.key for record in v2] == [case.key for case in valid]
    refused = [offset for offset, case in zip(offsets, cases, strict=True) if case.expected is None]
    letters = kafka.letters("orders.v1")
    assert [offset for offset, _ in letters] == refused and all(reason for _, reason in letters)
    assert {k: counters("bridge").get(k, 0) for k in ("translated", "dead_lettered", "duplicates")} == {
        "translated": len(valid), "dead_lettered": len(refused), "duplicates": 0}
    for case in valid:  # each id remembered (idempotency) and waiting for its V2 copy (reconciliation)
        assert case.expected["event_id"] in order_events[case.key]["ids"]
        assert case.expected["event_id"] in order_events[case.key]["v1"]


async def test_a_batch_whose_send_fails_is_sent_again_not_acknowledged(kafka):
    clear_tables()
    kafka.sent.clear()
    kafka.failures = 2  # the broker refuses the first two sends: the batch body is applied again
    valid = [V1Case(f"o-{i}".encode(), json_bytes({**V1_TEMPLATE, "id": f"o-{i}", "event_id": f"e-{i}"}), None) for i in range(3)]
    async with migration.translate_v1_orders.test_context() as agent:
        for case in valid:
            await put(agent, case.value, case.key)
        await settled(lambda: counters("bridge").get("translated", 0) == 3)
    assert [orjson.loads(record.value)["event_id"] for record in kafka.to("orders.v2")] == ["e-0", "e-1", "e-2"]
    assert (counters("bridge")["translated"], counters("bridge").get("duplicates", 0)) == (3, 0)
    assert all(order_events[case.key]["ids"] == [f"e-{i}"] for i, case in enumerate(valid))


async def test_a_replayed_v1_event_is_translated_once(kafka):
    clear_tables()
    kafka.sent.clear()
    event = json_bytes({**V1_TEMPLATE, "id": "o-7", "event_id": "e-7"})
    async with migration.translate_v1_orders.test_context() as agent:
        for _ in range(3):
            await put(agent, event, b"o-7")
        await settled(lambda: counters("bridge").get("translated", 0) + counters("bridge").get("duplicates", 0) == 3)
    assert len(kafka.to("orders.v2")) == 1
    assert (counters("bridge")["translated"], counters("bridge")["duplicates"]) == (1, 2)


# --- orders.v2 -> reconciliation -------------------------------------------------------------------

V2_TEMPLATE = {"order_id": "o-bad", "customer_id": "c", "amount": {"value": "1.00", "currency": "EUR"},
               "state": "created", "created_at": "2024-11-01T10:00:00Z", "source_version": 2, "event_id": "e-bad"}
HOSTILE_V2 = {
    "nested 10,000 deep": (b"o-bad", DEEP),
    "a field nested 10,000 deep": (b"o-bad", nested_in(V2_TEMPLATE, "note", 10_000)),
    "a 5,000-digit integer": (b"o-bad", with_raw(V2_TEMPLATE, "source_version", HUGE_DIGITS)),
    "NaN": (b"o-bad", with_raw(V2_TEMPLATE, "source_version", "NaN")),
    "not UTF-8": (b"o-bad", NOT_UTF8),
    "an event id orjson cannot write": (b"o-bad", json_bytes({**V2_TEMPLATE, "event_id": "\ud800"})),
    "an event id of 1,000 characters": (b"o-bad", json_bytes({**V2_TEMPLATE, "event_id": "e" * 1000})),
    "no event id": (b"o-bad", json_bytes({k: v for k, v in V2_TEMPLATE.items() if k != "event_id"})),
    "keyed by another order": (b"o-other", json_bytes(V2_TEMPLATE)),
    "no key": (None, json_bytes(V2_TEMPLATE)),
    "not an object": (b"o-bad", b'"text"'),
}


@FUZZ
@given(kinds=st.lists(st.one_of(st.none(), st.sampled_from(sorted(HOSTILE_V2))), min_size=1, max_size=14))
async def test_reconciliation_notes_every_valid_v2_event_and_dead_letters_every_hostile_one(kafka, kinds):
    kafka.sent.clear()
    clear_tables()
    records = [(f"o-{i % 4}".encode(), json_bytes({**V2_TEMPLATE, "order_id": f"o-{i % 4}", "event_id": f"e-{i}"}))
               if kind is None else HOSTILE_V2[kind] for i, kind in enumerate(kinds)]
    valid = {i for i, kind in enumerate(kinds) if kind is None}
    async with migration.reconcile_v2_orders.test_context() as agent:
        offsets = [await put(agent, value, key) for key, value in records]
        await settled(lambda: sum(len(order_events[f"o-{k}".encode()].get("v2", {})) for k in range(4)) + len(kafka.letters("orders.v2")) == len(records))

    waiting = {event_id for k in range(4) for event_id in order_events[f"o-{k}".encode()].get("v2", {})}
    assert waiting == {f"e-{i}" for i in valid}
    assert all(f"e-{i}" in order_events[f"o-{i % 4}".encode()]["v2"] for i in valid)
    letters = kafka.letters("orders.v2")
    assert [offset for offset, _ in letters] == [offsets[i] for i in range(len(records)) if i not in valid]
    assert all(reason for _, reason in letters)


# --- orders.commands -> the router ----------------------------------------------------------------

COMMAND = {"command_id": "c-bad", "order_id": "o-bad", "action": "pay", "payload": {}}
MARKER = {"phase": "cutover", "canary_percent": 0, "change_id": "ch-bad", "changed_at": 1.0}
HOSTILE_COMMANDS = {
    "nested 10,000 deep": DEEP,
    "a payload nested 10,000 deep": nested_in(COMMAND, "payload", 10_000),
    "a 5,000-digit integer": with_raw(COMMAND, "payload", '{"n": %s}' % HUGE_DIGITS),
    "a payload integer orjson cannot write": json_bytes({**COMMAND, "payload": {"n": 2**64}}),
    "NaN": with_raw(COMMAND, "payload", '{"n": NaN}'),
    "not UTF-8": NOT_UTF8,
    "an order id orjson cannot write": json_bytes({**COMMAND, "order_id": "\ud800"}),
    "no command id": json_bytes({k: v for k, v in COMMAND.items() if k != "command_id"}),
    "a payload that is a list": json_bytes({**COMMAND, "payload": [1]}),
    "a marker of an unknown phase": json_bytes({"phase_marker": {**MARKER, "phase": "live"}}),
    "a marker dated beyond float range": b'{"phase_marker": %s}' % with_raw(MARKER, "changed_at", BEYOND_FLOAT),
    "a canary marker of 0 %": json_bytes({"phase_marker": {**MARKER, "phase": "canary", "canary_percent": 0}}),
    "a marker that is not an object": json_bytes({"phase_marker": [MARKER]}),
    "not an object": b"null",
}


@st.composite
def commands_records(draw) -> List[Tuple[str, Any, int]]:
    """(kind, content, partition): kind "command" (content: the command), "marker" (phase,
    percent) or the name of a hostile record."""
    records = []
    for i in range(draw(st.integers(1, 16))):
        partition = draw(st.integers(0, 1))
        kind = draw(st.sampled_from(["command", "command", "marker", "hostile"]))
        if kind == "command":
            payload = draw(st.dictionaries(st.text(max_size=3), st.one_of(st.integers(-2**63, 2**63 - 1), st.text(max_size=5)), max_size=2))
            records.append(("command", {"command_id": f"c-{i}", "order_id": f"o-{i % 5}", "action": "pay", "payload": payload}, partition))
        elif kind == "marker":
            phase = draw(st.sampled_from(["shadow", "canary", "cutover", "rollback"]))
            records.append(("marker", (phase, draw(st.integers(1, 99)) if phase == "canary" else 0), partition))
        else:
            records.append((draw(st.sampled_from(sorted(HOSTILE_COMMANDS))), None, partition))
    return records


def marker_rows() -> int:
    return sum(len(partition_state[f"phase:{partition}".encode()].get("history", [])) for partition in (0, 1))


def expected_routing(records: List[Tuple[str, Any, int]]) -> List[Dict[str, Any]]:
    """The routed copies of the valid commands: phase of the last valid marker before each in its partition."""
    phase = {0: ("shadow", 0), 1: ("shadow", 0)}
    routed = []
    for kind, content, partition in records:
        if kind == "marker":
            phase[partition] = content
        elif kind == "command":
            current, percent = phase[partition]
            answering = "v2" if current == "cutover" or (current == "canary" and canary_bucket(content["order_id"]) < percent) else "v1"
            for system in ("v1", "v2"):
                routed.append({**content, "system": system, "answers": system == answering, "phase": current,
                               "canary_percent": percent})
    return routed


@FUZZ
@given(records=commands_records())
async def test_the_router_routes_every_valid_command_by_its_partitions_phase_and_dead_letters_every_hostile_one(kafka, records):
    kafka.sent.clear()
    clear_tables()
    async with migration.route_commands.test_context() as agent:
        offsets = []
        for i, (kind, content, partition) in enumerate(records):
            if kind == "command":
                value = json_bytes(content)
            elif kind == "marker":
                value = json_bytes({"phase_marker": {"phase": content[0], "canary_percent": content[1], "change_id": f"ch-{i}", "changed_at": 1.5}})
            else:
                value = HOSTILE_COMMANDS[kind]
            offsets.append(await put(agent, value, partition=partition))
        commands = sum(kind == "command" for kind, _, _ in records)
        markers = sum(kind == "marker" for kind, _, _ in records)
        await settled(lambda: counters("router").get("routed", 0) == commands and marker_rows() == markers
                      and len(kafka.letters("orders.commands")) == sum(kind not in ("command", "marker") for kind, _, _ in records))

    routed = [record for record in kafka.sent if record.topic in ("orders.v1.in", "orders.v2.in")]
    assert [orjson.loads(record.value) for record in routed] == expected_routing(records)
    assert all(set(orjson.loads(record.value)) == ROUTED_FIELDS for record in routed)  # no "__faust" metadata
    assert [record.topic for record in routed] == [f"orders.{json.loads(record.value)['system']}.in" for record in routed]
    letters = kafka.letters("orders.commands")
    assert [offset for offset, _ in letters] == [o for o, (kind, _, _) in zip(offsets, records, strict=True) if kind not in ("command", "marker")]
    assert all(reason for _, reason in letters)
    router = counters("router")
    assert (router.get("routed", 0), router.get("dead_lettered", 0)) == (commands, len(letters))
    for partition in (0, 1):
        markers = [[o, *content] for o, (kind, content, p) in zip(offsets, records, strict=True) if kind == "marker" and p == partition]
        history = partition_state[f"phase:{partition}".encode()].get("history", [])
        assert [row[:3] for row in history] == markers


# --- migration.v1.results + migration.v2.results -> the comparison ---------------------------------


class ResultCase(NamedTuple):
    v1: bytes
    v2: bytes
    mismatched: Optional[str]  # the field V2 got wrong, or None


@st.composite
def result_pairs(draw, i: int) -> ResultCase:
    cents = draw(st.integers(0, 10**8))
    v1 = {"id": f"o-{i}", "customer": f"c-{i}", "total_cents": cents, "status": "PAID", "created": "2024-11-01 10:00:00"}
    v2 = {"order_id": f"o-{i}", "customer_id": f"C-{i} ", "amount": {"value": f"{cents / 100 + 0.004:.3f}", "currency": "usd"},
          "state": "paid", "created_at": "2024-11-01T10:00:00Z", "source_version": 2, "event_id": "x"}
    mismatched = draw(st.sampled_from([None, "state", "amount.value"]))
    if mismatched == "state":
        v2["state"] = "shipped"
    elif mismatched == "amount.value":
        v2["amount"] = {**v2["amount"], "value": f"{cents / 100 + 0.02:.2f}"}
    return ResultCase(json_bytes(v1), json_bytes(v2), mismatched)


HOSTILE_RESULTS = {
    "nested 10,000 deep": (b"bad", DEEP),
    "a field nested 10,000 deep": (b"bad", nested_in({"a": 1}, "deep", 10_000)),
    "a 5,000-digit integer": (b"bad", with_raw({"a": 1}, "n", HUGE_DIGITS)),
    "an integer orjson cannot write": (b"bad", json_bytes({"n": 2**64})),
    "an integer beyond float range": (b"bad", with_raw({"a": 1}, "n", BEYOND_FLOAT)),
    "a V1 order too large to quantize": (b"bad", json_bytes({**V1_TEMPLATE, "total_cents": 10**40, "n": 2**70})),
    "a V1 order dated out of range in UTC": (b"bad", json_bytes({**V1_SCHEMA_2, "created_at": "0001-01-01T00:30:00+01:00", "n": 2**70})),
    "NaN": (b"bad", b'{"n": NaN}'),
    "not UTF-8": (b"bad", NOT_UTF8),
    "a key orjson cannot write": (b"bad", json_bytes({"\ud800": 1})),
    "not an object": (b"bad", b"[]"),
    "no key": (None, b'{"a": 1}'),
}


@FUZZ
@given(data=st.data())
async def test_the_comparison_counts_every_valid_pair_and_dead_letters_every_hostile_result(kafka, data):
    kafka.sent.clear()
    clear_tables()
    pairs = [data.draw(result_pairs(i)) for i in range(data.draw(st.integers(0, 8)))]
    hostile = data.draw(st.lists(st.tuples(st.sampled_from(sorted(HOSTILE_RESULTS)), st.sampled_from(["v1", "v2"])), max_size=8))
    records = [(f"r-{i}".encode(), side, getattr(pair, side)) for i, pair in enumerate(pairs) for side in ("v1", "v2")]
    records += [(HOSTILE_RESULTS[kind][0], side, HOSTILE_RESULTS[kind][1]) for kind, side in hostile]
    records = data.draw(st.permutations(records))
    async with migration.compare_results_of_both_systems.test_context() as agent:
        offsets = [await put(agent, value, key, topic=f"migration.{side}.results") for key, side, value in records]
        await settled(lambda: counters("compare").get("compared", 0) == len(pairs)
                      and counters("compare").get("dead_lettered", 0) == len(hostile))

    compare = counters("compare")
    expected_mismatches = [pair.mismatched for pair in pairs if pair.mismatched]
    assert (compare.get("compared", 0), compare.get("matched", 0), compare.get("mismatched", 0)) == (
        len(pairs), len(pairs) - len(expected_mismatches), len(expected_mismatches))
    assert compare.get("field_mismatches", {}) == {field: expected_mismatches.count(field) for field in set(expected_mismatches)}
    assert compare.get("dead_lettered", 0) == len(hostile)
    letters = sorted(kafka.letters("migration.v1.results") + kafka.letters("migration.v2.results"))
    assert [offset for offset, _ in letters] == [o for o, (key, _, _) in zip(offsets, records, strict=True) if not (key or b"").startswith(b"r-")]
    assert all(reason for _, reason in letters)
    assert all(pending_results[f"r-{i}".encode()].get("done") for i in range(len(pairs)))


async def test_a_mismatch_sample_shows_long_values_cut(kafka):
    clear_tables()
    async with migration.compare_results_of_both_systems.test_context() as agent:
        await put(agent, json_bytes({"note": "a" * 10_000}), b"r-1", topic="migration.v1.results")
        await put(agent, json_bytes({"note": "b"}), b"r-1", topic="migration.v2.results")
        await settled(lambda: counters("compare").get("compared", 0) == 1)
    (sample,) = counters("compare")["samples"]
    assert sample["diff"]["note"]["v2"] == "b"
    assert sample["diff"]["note"]["v1"].endswith("... (10002 bytes)") and len(sample["diff"]["note"]["v1"]) < 300


# --- phase changes: one in flight at a time ---------------------------------------------------------


def test_a_phase_change_is_unread_until_every_partition_has_read_its_marker():
    every = {str(p): ["ch-0", "ch-1"] for p in range(8)}
    assert migration.unread_changes(["ch-1"], every) == []
    assert migration.unread_changes(["ch-2"], every) == ["ch-2"]  # written, read nowhere yet
    assert migration.unread_changes(["ch-1"], {**every, "3": ["ch-0"]}) == ["ch-1"]  # partition 3 has not read it
    assert migration.unread_changes(["ch-1"], {p: ids for p, ids in every.items() if p != "7"}) == ["ch-1"]


def test_a_worker_holds_one_phase_change_until_it_is_read():
    in_flight = migration.PhaseChangeInFlight()
    change = in_flight.reserve()
    assert change and in_flight.reserve() is None  # a second change waits (409)
    in_flight.forget_if_read([change])
    assert in_flight.change_id == change  # still unread somewhere
    in_flight.forget_if_read([])
    assert in_flight.change_id is None and in_flight.reserve() is not None


def test_the_status_shows_a_pending_change_of_any_worker():
    local = {"totals": {}, "unreconciled": {"v1": [], "v2": []}, "reconciled": 0}
    read_everywhere = {str(p): ["ch-1"] for p in range(8)}
    parts = [{**local, "phases": {}, "changes": read_everywhere, "pending_change": None},
             {**local, "phases": {}, "changes": {}, "pending_change": "ch-2"}]
    assert migration.merge_status(parts)["pending_changes"] == ["ch-2"]
    parts[1]["pending_change"] = "ch-1"
    assert migration.merge_status(parts)["pending_changes"] == []


async def test_a_result_whose_counterpart_never_came_is_counted_missing_once_then_forgotten(kafka, monkeypatch):
    clear_tables()
    window = 0.2
    monkeypatch.setattr("agents.migration.settings", migration.settings.model_copy(update={"migration_compare_window": window}))
    monkeypatch.setattr(migration, "expiry_index", migration.ExpiryIndex())
    async with migration.compare_results_of_both_systems.test_context() as agent:
        await put(agent, json_bytes({"a": 1}), b"r-1", partition=0, topic="migration.v1.results")
        await put(agent, json_bytes({"a": 1}), b"r-2", partition=1, topic="migration.v2.results")
        await put(agent, json_bytes({"a": 1}), b"r-3", partition=1, topic="migration.v1.results")
        await put(agent, json_bytes({"a": 1}), b"r-3", partition=1, topic="migration.v2.results")
        await settled(lambda: counters("compare").get("compared", 0) == 1)
    written = time.time()
    assert migration.expiry_index.overdue_partitions(written) == []

    async def expire(now: float) -> List[int]:
        due = migration.expiry_index.overdue_partitions(now)
        async with migration.expire_unpaired_results.test_context() as expiry:
            for partition in due:
                await put(expiry, b"tick", partition=partition)
            await asyncio.sleep(0.1)
        return due

    await asyncio.sleep(window + 0.05)
    assert await expire(time.time()) == [0, 1]  # r-1 and r-2 overdue; r-3's 'compared' marker not yet
    assert (counters("compare").get("missing_in_v2"), counters("compare").get("missing_in_v1")) == (1, 1)
    assert await expire(time.time()) == []  # counted once
    rebuilt = migration.ExpiryIndex()  # a new assignment: rebuilt from the table
    assert rebuilt.overdue_partitions(time.time() + 2 * window + 0.1) == [0, 1]
    await asyncio.sleep(2 * window + 0.05)
    assert await expire(time.time()) == [0, 1]
    assert list(pending_results.keys()) == [] and counters("compare")["missing_in_v2"] == 1


async def test_results_a_recovery_wrote_are_expired_once_it_has_ended(kafka, monkeypatch):
    clear_tables()
    monkeypatch.setattr("agents.migration.settings", migration.settings.model_copy(update={"migration_compare_window": 0.1}))
    monkeypatch.setattr(migration, "expiry_index", migration.ExpiryIndex())
    later = time.time() + 1
    assert migration.expiry_index.overdue_partitions(later) == []  # built from the empty table
    pending_results.data[b"r-9"] = {"side": "v2", "fields": {}, "at": time.time(), "partition": 2}  # as recovery writes it
    assert migration.expiry_index.overdue_partitions(later) == []
    await migration.rebuild_expiry_index()  # the table's on_recover callback
    assert migration.expiry_index.overdue_partitions(later) == [2]
