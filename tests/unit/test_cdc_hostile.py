"""Hostile records on a ``cdc.*`` topic: every one is refused with a reason (a dead letter), every
valid change around it is stored as each sink would store it, and the newest change of each row
wins. First fuzzed on the decode step and the sinks' encoders (fast), then through the apply agent."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Dict, Iterator, List, Optional, Tuple

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.cdc import ElasticsearchSink, RedisSink, ReplicaSink, apply_change_stream, change_of_record, redis_write
from agents.cdc import apply as cdc  # the module whose SINKS and dead_letter the agent uses
from app import app, runtime
from models.cdc import Change, ColumnDef, InvalidChange, change_envelope, key_json, latest_per_row
from tables.cdc import cdc_rows

SCHEMA, TABLE = "fuzz", "items"
TOPIC = f"cdc.{SCHEMA}.{TABLE}"  # the topic a change of fuzz.items must come from (CDC_TOPIC_PREFIX "cdc")
COLUMNS = [
    ColumnDef("id", "bigint", True), ColumnDef("name", "text", False), ColumnDef("price", "numeric(12,2)", False),
    ColumnDef("qty", "integer", False), ColumnDef("day", "date", False), ColumnDef("at", "timestamp with time zone", False),
    ColumnDef("doc", "jsonb", False), ColumnDef("tags", "text[]", False), ColumnDef("ratio", "double precision", False),
]
TYPES = {column.name: column.sql_type for column in COLUMNS}
RAW = "@raw@"  # a value replaced by raw JSON text after encoding (1e400, a 5,000-digit integer...)


# --- valid change events ---------------------------------------------------------------------------

texts = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=8,
)
rows = st.fixed_dictionaries({
    "name": st.none() | texts,
    "price": st.none() | st.decimals(min_value=-(10**10) + 1, max_value=10**10 - 1, places=2).map(lambda d: format(d, "f")),
    "qty": st.none() | st.integers(-(2**31), 2**31 - 1),
    "day": st.none() | st.integers((date(1, 1, 1) - date(1970, 1, 1)).days, (date(9999, 12, 31) - date(1970, 1, 1)).days),
    "at": st.none() | st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)).map(lambda d: d.isoformat() + "Z"),
    "doc": st.none() | json_values.map(json.dumps),  # jsonb travels as its JSON text
    "tags": st.none() | st.lists(st.none() | texts, max_size=3),
    "ratio": st.none() | st.floats(allow_nan=False, allow_infinity=False),
})


@dataclass
class Record:
    """One record of the topic; ``row``/``op``/``lsn`` say what a valid one changes, ``hostile`` what is wrong."""

    key: Optional[bytes]
    value: Optional[bytes]
    row_id: int = 0
    op: str = ""
    lsn: int = 0
    after: Optional[Dict[str, Any]] = None
    hostile: str = ""


def envelope(row_id: int, op: str, lsn: int, row: Dict[str, Any], with_columns: bool = True) -> Dict[str, Any]:
    after = None if op == "d" else {"id": row_id, **row}
    return change_envelope(op=op, before={"id": row_id} if op == "d" else None, after=after, lsn=lsn, tx_id=lsn // 7,
                           ts_ms=1_700_000_000_000, schema=SCHEMA, table=TABLE, db="shop", snapshot=op == "r",
                           now_ms=1_700_000_000_001, columns=COLUMNS if with_columns else None)


def encoded(document: Any, raw: bytes = b"") -> bytes:
    return json.dumps(document).replace(json.dumps(RAW), raw.decode()).encode()


FEW_ROWS = st.integers(0, 5)  # rows collide: the newest change of each must win


@st.composite
def valid_records(draw, row_ids=FEW_ROWS) -> Record:
    row_id, op, lsn = draw(row_ids), draw(st.sampled_from("cudr")), draw(st.integers(0, 2**40))
    if draw(st.integers(0, 9)) == 0:
        return Record(key_json({"id": row_id}), None, row_id, "tombstone", lsn)  # the record after a delete
    document = envelope(row_id, op, lsn, draw(rows), with_columns=draw(st.booleans()))  # with or without (Debezium)
    if draw(st.booleans()):
        document = {"schema": {"type": "struct"}, "payload": document}  # a JSON converter with schemas.enable=true
    return Record(key_json({"id": row_id}), encoded(document), row_id, op, lsn, document.get("payload", document)["after"])


# --- hostile change events: each takes a valid event and breaks it --------------------------------


def with_after(**values: Any):
    def mutate(document: Dict[str, Any]) -> None:
        document["after"].update(values)
    return mutate


def with_source(**values: Any):
    def mutate(document: Dict[str, Any]) -> None:
        document["source"].update(values)
    return mutate


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


HOSTILE = {
    # name: (mutation of a valid upsert's envelope, raw JSON for RAW, key override, raw value override)
    "JSON nested 50,000 deep": (None, b"", None, b"[" * 50_000 + b"]" * 50_000),
    "a row value nested 300 deep": (with_after(doc=nested(300)), b"", None, None),
    "a 5,000-digit integer": (with_after(qty=RAW), b"9" * 5000, None, None),
    "an integer over 64 bits": (with_after(qty=RAW), str(2**64 + 1).encode(), None, None),
    "a number beyond a double": (with_after(ratio=RAW), b"1e400", None, None),
    "NaN": (with_after(ratio=RAW), b"NaN", None, None),
    "-Infinity": (with_after(ratio=RAW), b"-Infinity", None, None),
    "a decimal beyond numeric(12,2)": (with_after(price="1e999999999"), b"", None, None),
    "a date beyond year 9999": (with_after(day=10**12), b"", None, None),
    "a timestamp overflowing on conversion to UTC": (with_after(at="0001-01-01T00:00:00+05:00"), b"", None, None),
    "another timestamp overflowing to UTC": (with_after(at="9999-12-31T23:00:00-05:00"), b"", None, None),
    "an integer beyond its integer column": (with_after(qty=2**31), b"", None, None),
    "text with NUL": (with_after(name="a\x00b"), b"", None, None),
    "a lone surrogate": (with_after(name=RAW), b'"\\ud800"', None, None),
    "bytes that are not UTF-8": (None, b"", None, b'{"op": "c", "after": "\xff\xfe"}'),
    "not JSON": (None, b"", None, b"{not json"),
    "SQL in a column type": (with_source(columns=[["id", "bigint); DROP TABLE fuzz.items; --", True]]), b"", None, None),
    "another table's change": (with_source(table="other"), b"", None, None),
    "a negative LSN": (with_source(lsn=-1), b"", None, None),
    "an LSN over 63 bits": (with_source(lsn=2**63), b"", None, None),
    "a 5,000-digit LSN string": (with_source(lsn="9" * 5000), b"", None, None),
    "an LSN that is not a number": (with_source(lsn="x"), b"", None, None),
    "a truncate": (lambda document: document.update(op="t"), b"", None, None),
    "an after-image that is a list": (lambda document: document.update(after=[1, 2]), b"", None, None),
    "a key that is not an object": (None, b"", b"[1]", None),
    "a key naming another row": (None, b"", b'{"id": -1}', None),
    "a key nested 50,000 deep": (None, b"", b"[" * 50_000 + b"]" * 50_000, None),
}


@st.composite
def hostile_records(draw) -> Record:
    name = draw(st.sampled_from(sorted(HOSTILE)))
    mutate, raw, key, value = HOSTILE[name]
    row_id = draw(FEW_ROWS)
    document = envelope(row_id, "c", draw(st.integers(0, 2**40)), draw(rows))
    if mutate is not None:
        mutate(document)
    return Record(key if key is not None else key_json({"id": row_id}), value if value is not None else encoded(document, raw), hostile=name)


# --- what each sink stores ---------------------------------------------------------------------------


def fuzz_sinks() -> Tuple[ReplicaSink, RedisSink, ElasticsearchSink]:
    """The three sinks as configured, never connected; the replica knows the table (as after its first write)."""
    replica = ReplicaSink("postgresql://unused/none")
    replica.tables[f"{SCHEMA}.{TABLE}"] = (TYPES, ["id"])
    return replica, RedisSink("redis://unused:1/0"), ElasticsearchSink("http://unused:1")


def replica_column(value: Any, name: str) -> Any:
    """The parameter the replica gets for a valid value (the oracle of models.cdc.python_value)."""
    if value is None or name in ("id", "name", "qty", "doc", "tags", "ratio"):
        return value
    if name == "price":
        return Decimal(value)
    if name == "day":
        return date(1970, 1, 1) + timedelta(days=value)
    return datetime.fromisoformat(value).astimezone(timezone.utc)  # "at"


def assert_stored_as_written(record: Record, change: Change, sinks: Tuple[ReplicaSink, RedisSink, ElasticsearchSink]) -> None:
    replica, _, index = sinks
    row_key = f"{SCHEMA}.{TABLE}:{record.row_id}".encode()
    keys, args = redis_write(change)
    assert keys == [row_key, b"_cdc_lsn:" + row_key] and args[:2] == [f"{record.lsn:020d}".encode(), b"delete" if record.op == "d" else b"upsert"]
    meta = {"_index": f"{SCHEMA}.{TABLE}", "_id": str(record.row_id), "version": record.lsn, "version_type": "external_gte"}
    guard = [f"{SCHEMA}.{TABLE}", str(record.row_id), record.lsn]
    if record.op == "d":
        assert args[2:] == [b"[]"] and index.actions([change]) == [({"delete": meta}, None)]
        assert replica.parameters(change) == guard + [record.row_id]
        return
    fields = orjson.loads(args[2])
    assert dict(zip(fields[::2], fields[1::2], strict=True)) == {name: orjson.dumps(value).decode() for name, value in record.after.items()}
    assert index.actions([change]) == [({"index": meta}, record.after)]
    assert replica.parameters(change) == guard + [replica_column(value, name) for name, value in record.after.items()]


def newest_per_row(records: List[Record]) -> Dict[int, Tuple[int, str, Optional[Dict[str, Any]]]]:
    """The model of the LSN guard: a row's change replaces the state unless the state is newer."""
    state: Dict[int, Tuple[int, str, Optional[Dict[str, Any]]]] = {}
    for record in records:
        if not record.hostile and record.op != "tombstone" and (record.row_id not in state or state[record.row_id][0] <= record.lsn):
            state[record.row_id] = (record.lsn, record.op, record.after)
    return state


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.one_of(valid_records(), hostile_records()), min_size=1, max_size=25))
def test_each_hostile_record_is_refused_and_each_valid_change_stored_as_written(records: List[Record]) -> None:
    sinks = fuzz_sinks()
    applied: List[Change] = []
    for record in records:
        if record.hostile:
            with pytest.raises(InvalidChange) as refused:
                change_of_record(TOPIC, record.key, record.value, sinks)
            assert str(refused.value), record.hostile  # the dead letter's reason
            continue
        change = change_of_record(TOPIC, record.key, record.value, sinks)
        if record.op == "tombstone":
            assert change is None
            continue
        assert (change.op, change.key, change.lsn, change.after) == (record.op, {"id": record.row_id}, record.lsn, record.after)
        assert_stored_as_written(record, change, sinks)
        applied.append(change)
    folded = {change.key["id"]: (change.lsn, change.op, change.after) for change in latest_per_row(applied)}
    assert folded == newest_per_row(records)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_every_kind_of_hostile_record_is_refused_with_a_reason(name: str) -> None:
    """Each kind at least once, whatever the fuzzer draws."""
    mutate, raw, key, value = HOSTILE[name]
    document = envelope(1, "u", 10, {"name": "x", "qty": 1, "price": "1.00"})
    if mutate is not None:
        mutate(document)
    with pytest.raises(InvalidChange, match=".+"):
        change_of_record(TOPIC, key if key is not None else key_json({"id": 1}), value if value is not None else encoded(document, raw), fuzz_sinks())


# --- through the apply agent ---------------------------------------------------------------------

probe_topic = app.topic(TOPIC, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")


@app.agent(probe_topic)
async def apply_probe_changes(stream) -> None:
    await apply_change_stream(stream)


class MemorySink:
    """A sink that keeps what it is given in memory, LSN-guarded like the real ones. Its first write
    fails (an outage: retried, never skipped); it refuses a row named "refused by the sink" (a value
    it cannot store: a dead letter). Its decode-time checks are the replica's."""

    name = "memory"
    REFUSED_NAME = "refused by the sink"

    def __init__(self) -> None:
        self.rows: Dict[int, Tuple[int, str, Optional[Dict[str, Any]]]] = {}  # row id -> (lsn, op, after)
        self.writes = 0
        self.replica = fuzz_sinks()[0]

    def refusal(self, change: Change) -> Optional[str]:
        return self.replica.refusal(change)

    async def apply(self, changes: List[Change]) -> List[Tuple[Change, str]]:
        self.writes += 1
        if self.writes == 1:
            raise ConnectionError("the sink is away")
        rejected = []
        for change in changes:
            if change.after is not None and change.after.get("name") == self.REFUSED_NAME:
                rejected.append((change, "cannot store it"))
            elif change.key["id"] not in self.rows or self.rows[change.key["id"]][0] <= change.lsn:
                self.rows[change.key["id"]] = (change.lsn, change.op, change.after)
        return rejected


@contextlib.contextmanager
def dead_letters_recorded() -> Iterator[Dict[int, str]]:
    """Dead letters by offset (the sender is not under test), for both places that send them."""
    letters: Dict[int, str] = {}

    async def record_letter(reason: str, event=None) -> None:
        letters[event.message.offset] = reason

    saved = cdc.dead_letter, runtime.dead_letter
    cdc.dead_letter = runtime.dead_letter = record_letter
    try:
        yield letters
    finally:
        cdc.dead_letter, runtime.dead_letter = saved


@contextlib.contextmanager
def sinks(*configured: Any) -> Iterator[None]:
    saved = cdc.SINKS
    cdc.SINKS = list(configured)
    try:
        yield
    finally:
        cdc.SINKS = saved


async def settled(done, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not done() and loop.time() < deadline:
        await asyncio.sleep(0.02)


ROW_BASES = itertools.count(1_000_000, 1000)  # each example its own rows: cdc_rows outlives examples


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.one_of(valid_records(st.integers(0, 3)), hostile_records()), min_size=1, max_size=12), st.integers(0, 12))
async def test_the_agent_dead_letters_hostile_records_and_applies_the_good_ones_around_them(records: List[Record], refused_at: int) -> None:
    base = next(ROW_BASES)
    records = [rebased(record, base) for record in records]
    refused = Record(key_json({"id": base + 999}), encoded(envelope(base + 999, "c", 1, {"name": MemorySink.REFUSED_NAME})),
                     base + 999, "c", 1, hostile="refused by the sink at write time")
    records.insert(min(refused_at, len(records)), refused)
    sink = MemorySink()
    expected_rows = newest_per_row(records)
    expected_letters = {offset for offset, record in enumerate(records) if record.hostile}
    with sinks(sink), dead_letters_recorded() as letters:
        async with apply_probe_changes.test_context() as agent:
            for record in records:
                await agent.put(record.value, key=record.key)
            await settled(lambda: set(letters) == expected_letters and sink.rows == expected_rows)
    assert set(letters) == expected_letters and all(letters.values())
    assert letters[records.index(refused)] == "memory: cannot store it"
    assert sink.rows == expected_rows
    for row_id, (lsn, op, after) in expected_rows.items():
        state = cdc_rows[key_json({"id": row_id})][f"{SCHEMA}.{TABLE}"]
        assert (state["lsn"], state["op"], state["row"]) == (lsn, op, after)


def rebased(record: Record, base: int) -> Record:
    """The record about row ``base + row_id`` instead of ``row_id``."""
    if record.hostile:
        return record  # refused whatever its row
    value = None
    if record.value is not None:
        document = json.loads(record.value)
        inner = document.get("payload", document)
        for image in (inner["before"], inner["after"]):
            if image is not None:
                image["id"] += base
        value = json.dumps(document).encode()
    after = None if record.after is None else {**record.after, "id": record.after["id"] + base}
    return Record(key_json({"id": record.row_id + base}), value, record.row_id + base, record.op, record.lsn, after)

