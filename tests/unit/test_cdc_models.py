"""models/cdc.py without PostgreSQL or Kafka: the pgoutput decoder, value conversions both ways,
Debezium envelopes (ours and a real connector's) and the batch folds."""
from __future__ import annotations

import json
import struct
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.cdc import (
    UNAVAILABLE, UNCHANGED, Begin, Change, Column, ColumnDef, Commit, Delete, Insert, InvalidChange, Origin,
    ProtocolError, Relation, Truncate, TypeInfo, Update, base_type, change_envelope, decode_message, fill_unavailable,
    int_to_lsn, key_json, latest_per_row, lsn_to_int, parse_change, python_value, row_id, wire_value,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cdc"
PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in Unix microseconds


def tuple_data(*values) -> bytes:
    out = struct.pack("!H", len(values))
    for value in values:
        if value is None:
            out += b"n"
        elif value is UNCHANGED:
            out += b"u"
        else:
            raw = value.encode()
            out += b"t" + struct.pack("!I", len(raw)) + raw
    return out


def test_lsn_text_and_integer_round_trip():
    assert lsn_to_int("0/153BB18") == 0x153BB18
    assert lsn_to_int("1/0") == 1 << 32
    assert int_to_lsn(lsn_to_int("16/B374D848")) == "16/B374D848"


def test_begin_and_commit_carry_the_commit_lsn_time_and_xid():
    commit_us = 1_000_000 * 86400  # 2000-01-02 in PostgreSQL time
    begin = decode_message(b"B" + struct.pack("!QqI", 0x153BBD8, commit_us, 727))
    assert begin == Begin(final_lsn=0x153BBD8, commit_ts_ms=(PG_EPOCH_US + commit_us) // 1000, xid=727)
    commit = decode_message(b"C" + struct.pack("!BQQq", 0, 0x153BBD8, 0x153BC08, commit_us))
    assert commit == Commit(commit_lsn=0x153BBD8, end_lsn=0x153BC08, commit_ts_ms=(PG_EPOCH_US + commit_us) // 1000)


def test_relation_lists_columns_with_types_and_key_flags():
    body = struct.pack("!I", 16390) + b"public\x00items\x00" + b"f" + struct.pack("!H", 2)
    body += struct.pack("!B", 1) + b"id\x00" + struct.pack("!Ii", 20, -1)
    body += struct.pack("!B", 0) + b"price\x00" + struct.pack("!Ii", 1700, 786438)
    relation = decode_message(b"R" + body)
    assert relation == Relation(16390, "public", "items", "f", (Column("id", 20, -1, True), Column("price", 1700, 786438, False)))


def test_insert_update_delete_tuples_with_nulls_and_unchanged_toast():
    oid = struct.pack("!I", 16390)
    assert decode_message(b"I" + oid + b"N" + tuple_data("1", None)) == Insert(16390, ("1", None))
    assert decode_message(b"U" + oid + b"N" + tuple_data("1", UNCHANGED)) == Update(16390, None, ("1", UNCHANGED))
    update = decode_message(b"U" + oid + b"O" + tuple_data("1", "a") + b"N" + tuple_data("2", "b"))
    assert update == Update(16390, ("1", "a"), ("2", "b"))
    assert decode_message(b"D" + oid + b"K" + tuple_data("1", None)) == Delete(16390, ("1", None))


def test_truncate_type_and_origin_messages():
    assert decode_message(b"T" + struct.pack("!IBII", 2, 3, 10, 11)) == Truncate((10, 11), True, True)
    assert decode_message(b"Y" + struct.pack("!I", 9000) + b"public\x00mood\x00") == TypeInfo(9000, "public", "mood")
    assert decode_message(b"O" + struct.pack("!Q", 5) + b"node\x00") == Origin(5, "node")


@pytest.mark.parametrize("data", [b"", b"Z", b"B\x00\x01", b"I\x00\x00\x00\x01X", b"I" + b"\x00" * 4 + b"N\x00\x01t\x00\x00\x00\x09ab"])
def test_malformed_messages_raise_protocol_error(data):
    with pytest.raises(ProtocolError):
        decode_message(data)


@pytest.mark.parametrize(
    "oid, text, expected",
    [
        (20, "9007199254740993", 9007199254740993),  # bigint beyond 2^53, exact
        (1700, "12.5000", "12.5000"),  # numeric: the plain decimal string
        (1184, "2024-03-01 12:15:30.1+02", "2024-03-01T10:15:30.1Z"),  # timestamptz: UTC, trailing zeros trimmed
        (1184, "2024-03-01 10:15:30+00", "2024-03-01T10:15:30Z"),
        (1184, "0099-01-01 00:00:00+00", "0099-01-01T00:00:00Z"),  # a four-digit year, which the apply side reads back
        (1114, "1970-01-01 00:00:01.5", 1_500_000),  # timestamp: epoch microseconds
        (1082, "1970-01-11", 10),  # date: epoch days
        (1083, "00:00:02", 2_000_000),  # time: microseconds since midnight
        (17, "\\x00ff10", "AP8Q"),  # bytea: base64
        (3802, '{"a": [1, 2]}', '{"a": [1, 2]}'),  # jsonb: PostgreSQL's JSON text
        (1007, "{1,NULL,3}", [1, None, 3]),
        (1009, '{a,"b c",NULL}', ["a", "b c", None]),
        (1231, "{1.50,NULL}", ["1.50", None]),
        (16, "t", True),
        (701, "0.25", 0.25),
        (99999, "happy", "happy"),  # an enum or other unknown type: its text
        (1184, "infinity", "infinity"),  # not representable: its text
    ],
)
def test_wire_values_are_what_debezium_writes(oid, text, expected):
    assert wire_value(oid, text) == expected


def test_nulls_and_unchanged_toast_on_the_wire():
    assert wire_value(25, None) is None
    assert wire_value(25, UNCHANGED) == UNAVAILABLE


@pytest.mark.parametrize(
    "wire, sql_type, expected",
    [
        ("12.5000", "numeric(14,4)", Decimal("12.5000")),
        ("2024-03-01T10:15:30.1Z", "timestamp with time zone", datetime(2024, 3, 1, 10, 15, 30, 100000, tzinfo=timezone.utc)),
        (1_500_000, "timestamp without time zone", datetime(1970, 1, 1, 0, 0, 1, 500000)),
        (10, "date", date(1970, 1, 11)),
        ("AP8Q", "bytea", b"\x00\xff\x10"),
        ('{"a": [1, 2]}', "jsonb", {"a": [1, 2]}),
        (["1.5", None], "numeric[]", [Decimal("1.5"), None]),
        (9007199254740993, "bigint", 9007199254740993),
        (None, "integer", None),
    ],
)
def test_python_values_from_the_wire_by_sql_type(wire, sql_type, expected):
    assert python_value(wire, sql_type) == expected


def test_base_type_drops_modifiers_and_array_brackets():
    assert base_type("numeric(12,2)") == "numeric"
    assert base_type("timestamp(3) with time zone") == "timestamp with time zone"
    assert base_type("character varying(20)[]") == "character varying"


def test_python_value_refuses_a_wrong_shape():
    with pytest.raises(InvalidChange):
        python_value("abc", "numeric")
    with pytest.raises(InvalidChange):
        python_value("not a list", "integer[]")


def test_our_envelope_parses_back_to_the_change():
    columns = [ColumnDef("id", "bigint", True), ColumnDef("name", "text", False)]
    envelope = change_envelope(op="u", before=None, after={"id": 7, "name": "x"}, lsn=99, tx_id=5, ts_ms=1000,
                               schema="public", table="items", db="shop", snapshot=False, now_ms=2000, columns=columns)
    change = parse_change(key_json({"id": 7}), json.dumps(envelope).encode())
    assert change == Change("public", "items", "u", {"id": 7}, None, {"id": 7, "name": "x"}, 99, 1000, False, 5, columns)
    assert envelope["source"]["snapshot"] == "false" and envelope["source"]["lsn"] == 99


def test_every_recorded_debezium_event_normalises_to_a_change():
    samples = json.loads((FIXTURES / "debezium_items.json").read_text())
    changes = [parse_change(json.dumps(s["key"]).encode(), None if s["value"] is None else json.dumps(s["value"]).encode()) for s in samples]
    assert [c and (c.op, c.key, c.lsn) for c in changes] == [
        ("r", {"id": 5}, 23400000), ("c", {"id": 1}, 23456789), ("c", {"id": 2}, 23457000), ("u", {"id": 1}, 23458000),
        ("c", {"id": 3}, 23459000), ("d", {"id": 3}, 23460000), None, ("d", {"id": 2}, 23461000), None, ("c", {"id": 4}, 23461100),
    ]
    assert changes[0].snapshot and not changes[1].snapshot
    assert changes[5].before["name"] == "gone" and changes[5].after is None  # schema-wrapped key and value
    assert changes[1].after["big"] == 9007199254740993 and changes[0].after["ratio"] == -1.5e10


@pytest.mark.parametrize(
    "key, value, reason",
    [
        (b'{"id":1}', b"not json", "not JSON"),
        (b'{"id":1}', b'{"op": "c"}', "no source block"),
        (b'{"id":1}', b'{"op": "t", "source": {"schema": "s", "table": "t", "lsn": 1}}', "only c, u, d, r"),
        (b'{"id":1}', b'{"op": "c", "after": {"id": 1}, "source": {"schema": "s", "table": "t"}}', "source.lsn"),
        (b'{"id":1}', b'{"op": "c", "after": null, "source": {"schema": "s", "table": "t", "lsn": 1}}', "after-image"),
        (b'{"id":1}', b'{"op": "c", "after": {"id": 1}, "source": {"schema": "s", "table": "t", "lsn": "x"}}', "integer"),
        (b'[1]', b'{"op": "c", "after": {"id": 1}, "source": {"schema": "s", "table": "t", "lsn": 1}}', "JSON object"),
        (None, b'{"op": "c", "after": {"id": 1}, "source": {"schema": "s", "table": "t", "lsn": 1}}', "no record key"),
    ],
)
def test_events_that_are_not_changes_are_refused_with_the_reason(key, value, reason):
    with pytest.raises(InvalidChange, match=reason):
        parse_change(key, value)


def test_tombstones_are_not_changes():
    assert parse_change(b'{"id":1}', None) is None
    assert parse_change(b'{"id":1}', b"null") is None


def change(row: int, lsn: int, op: str = "u", after=None) -> Change:
    return Change("s", "t", op, {"id": row}, None, None if op == "d" else (after or {"id": row, "v": lsn}), lsn, 0)


def test_only_the_last_change_of_each_row_of_a_batch_is_applied():
    batch = [change(1, 10), change(2, 11), change(1, 12, "d"), change(3, 13), change(2, 14)]
    assert [(c.key["id"], c.lsn) for c in latest_per_row(batch)] == [(1, 12), (3, 13), (2, 14)]


def test_a_rows_newest_change_wins_even_when_another_partition_delivered_it_first():
    # The delete (LSN 20) came from one partition before the insert (LSN 10) from another.
    batch = [change(3, 20, "d"), change(1, 15), change(3, 10, "c")]
    assert [(c.key["id"], c.op, c.lsn) for c in latest_per_row(batch)] == [(3, "d", 20), (1, "u", 15)]


def test_unchanged_toast_values_come_from_the_previous_image():
    after = {"id": 1, "body": UNAVAILABLE, "n": 2}
    assert fill_unavailable(after, {"id": 1, "body": "long text", "n": 1}) == {"id": 1, "body": "long text", "n": 2}
    with pytest.raises(InvalidChange, match="TOAST"):
        fill_unavailable(after, None)


def test_keys_and_row_ids():
    assert key_json({"id": 5}) == b'{"id":5}'
    assert row_id({"id": 5}) == "5"
    assert row_id({"a": 1, "b": "x"}) == "1:x"


# --- hostile events: refused with a reason, never an exception of another kind ----------------------

ENVELOPE = b'{"op": "c", "after": {"id": 1, "n": %s}, "source": {"schema": "s", "table": "t", "lsn": 1}}'


@pytest.mark.parametrize(
    "value, reason",
    [
        (b"[" * 20_000 + b"]" * 20_000, "nested too deeply"),  # the stdlib parser's RecursionError
        (ENVELOPE % (b"9" * 5000), "beyond 64 bits"),  # over Python's 4,300-digit limit
        (ENVELOPE % str(2**64).encode(), "beyond 64 bits"),  # no sink or state table can write it back
        (ENVELOPE % str(2**63).encode(), "beyond 64 bits"),  # orjson reads it (an unsigned 64-bit integer)
        (ENVELOPE % str(-(2**63) - 1).encode(), "beyond 64 bits"),
        (ENVELOPE % b"1e400", "beyond a double"),
        (ENVELOPE % b"NaN", "not standard JSON"),
        (ENVELOPE % b"Infinity", "not standard JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
    ],
)
def test_json_no_sink_could_write_back_is_refused(value, reason):
    with pytest.raises(InvalidChange, match=reason):
        parse_change(b'{"id":1}', value)


@pytest.mark.parametrize("key", [b"[" * 20_000 + b"]" * 20_000, b'{"id": %s}' % (b"9" * 5000), b'{"id": 1e400}', b'{"id": null}', b'{"id": 2}'])
def test_hostile_or_mismatched_record_keys_are_refused(key):
    with pytest.raises(InvalidChange):
        parse_change(key, ENVELOPE % b"1")


@pytest.mark.parametrize(
    "source",
    [
        {"lsn": -1}, {"lsn": 2**63}, {"lsn": "9" * 5000}, {"lsn": True}, {"ts_ms": 2**64}, {"txId": "1e5"},
        {"table": "a\u0000b"}, {"schema": "\ud800"},
        {"columns": [["id", "integer); DROP TABLE s.t; --", True]]},
        {"columns": [["id", 'x"; DROP TABLE t; --', True]]},
        {"columns": [["id", "integer", "yes"]]},
        {"columns": "id integer"},
    ],
)
def test_source_fields_out_of_range_or_not_names_are_refused(source):
    envelope = {"op": "c", "after": {"id": 1}, "source": {"schema": "s", "table": "t", "lsn": 1, **source}}
    with pytest.raises(InvalidChange):
        parse_change(b'{"id":1}', json.dumps(envelope).encode())


@pytest.mark.parametrize(
    "sql_type",
    ["bigint", "numeric(14,4)", "numeric(5,-2)", "timestamp(3) with time zone", "character varying(20)[]", "double precision",
     "interval day to second(3)", "public.mood", '"MyType"', '"my schema"."my type"[]', "bit varying(5)"],
)
def test_column_types_as_format_type_names_them_are_accepted(sql_type):
    envelope = {"op": "c", "after": {"id": 1}, "source": {"schema": "s", "table": "t", "lsn": 1, "columns": [["id", sql_type, True]]}}
    assert parse_change(b'{"id":1}', json.dumps(envelope).encode()).columns == [ColumnDef("id", sql_type, True)]


@pytest.mark.parametrize(
    "wire, sql_type",
    [
        (10**12, "date"),  # timedelta overflow
        (2**62, "timestamp without time zone"),
        (-(2**62), "timestamp with time zone"),
        ("0001-01-01T00:00:00+05:00", "timestamp with time zone"),  # overflows on conversion to UTC
        ("9999-12-31T23:00:00-05:00", "timestamp with time zone"),
        (-1, "time without time zone"),
        (86_400_000_000, "time without time zone"),  # a day: would wrap to midnight
        ("1e999999999", "numeric"),  # beyond PostgreSQL's numeric
        ("1e-99999", "numeric"),
        ("123456.7", "numeric(6,2)"),  # more than p - s digits before the point
        ("NaN-ish", "numeric"),
        (True, "numeric"),
        (2**31, "integer"),
        (-(2**15) - 1, "smallint"),
        ([1, 2**40], "integer[]"),
        ("!!", "bytea"),
    ],
)
def test_values_their_column_cannot_take_are_refused(wire, sql_type):
    with pytest.raises(InvalidChange):
        python_value(wire, sql_type)


def test_values_at_the_edges_of_their_columns_are_kept():
    assert python_value(2**63 - 1, "bigint") == 2**63 - 1 and python_value(-(2**31), "integer") == -(2**31)
    assert python_value("12345678.99", "numeric(10,2)") == Decimal("12345678.99")
    assert python_value("NaN", "numeric").is_nan()
    assert python_value("9999-12-31T23:59:59Z", "timestamp with time zone").year == 9999
    assert python_value("infinity", "timestamp with time zone") == "infinity"  # PostgreSQL's, passed as text
    assert python_value("-infinity", "date") == "-infinity"


def test_non_finite_floats_travel_as_the_strings_the_json_converter_writes():
    assert wire_value(701, "NaN") == "NaN" and wire_value(701, "Infinity") == "Infinity" and wire_value(700, "-Infinity") == "-Infinity"
    assert wire_value(1022, "{NaN,1.5}") == ["NaN", 1.5]
    envelope = change_envelope(op="c", before=None, after={"id": 1, "ratio": wire_value(701, "NaN")}, lsn=1, tx_id=1, ts_ms=0,
                               schema="s", table="t", db="d", snapshot=False, now_ms=0)
    assert parse_change(b'{"id":1}', json.dumps(envelope).encode()).after["ratio"] == "NaN"  # our own events parse back


def test_a_column_list_checked_before_stands_only_for_the_same_list():
    columns = [ColumnDef("id", "bigint", True), ColumnDef("name", "text", False)]

    def event(source_columns) -> bytes:
        envelope = change_envelope(op="c", before=None, after={"id": 7, "name": "x"}, lsn=99, tx_id=5, ts_ms=1000,
                                   schema="public", table="items", db="shop", snapshot=False, now_ms=2000, columns=columns)
        envelope["source"]["columns"] = source_columns
        return json.dumps(envelope).encode()

    first = parse_change(key_json({"id": 7}), event([["id", "bigint", True], ["name", "text", False]]))
    again = parse_change(key_json({"id": 7}), event([["id", "bigint", True], ["name", "text", False]]))
    assert first.columns == again.columns == columns and first.columns is not again.columns
    with pytest.raises(InvalidChange, match="source.columns"):
        parse_change(key_json({"id": 7}), event([["id", "bigint", 1], ["name", "text", False]]))  # 1 == True
    with pytest.raises(InvalidChange, match="source.columns"):
        parse_change(key_json({"id": 7}), event([["id", "bigint", True], ["name", "text", False, "extra"]]))


@given(st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=8), st.booleans(), st.none(), st.floats()), min_size=1, max_size=3))
def test_record_keys_are_the_standard_librarys_json_whatever_the_key_holds(key):
    """The key's bytes choose the partition: key_json's fast path must never change them."""
    assert key_json(key) == json.dumps(key, separators=(",", ":")).encode()


def test_types_and_column_lists_no_sink_could_take_are_refused_as_invalid_changes():
    envelope = change_envelope(op="c", before=None, after={"id": 1}, lsn=1, tx_id=1, ts_ms=0, schema="s", table="t", db="d",
                               snapshot=False, now_ms=0)
    envelope["source"]["columns"] = [["id", '"\ud800"', True]]  # a quoted type name holding a lone surrogate
    with pytest.raises(InvalidChange, match="not valid UTF-8"):
        parse_change(b'{"id":1}', json.dumps(envelope).encode())
    deep = "integer" + "[]" * 5000  # any number of [] is a type name; only the value's depth is converted
    assert python_value(None, deep) is None and python_value([[None]], deep) == [[None]]
