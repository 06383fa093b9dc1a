"""Change data capture: pgoutput decoding, Debezium envelopes and the one internal change form.

Pure functions only (no I/O), unit-tested without PostgreSQL or Kafka:

- ``decode_message``: PostgreSQL's built-in ``pgoutput`` logical decoding protocol, version 1
  (Begin, Commit, Relation, Insert, Update, Delete, Truncate, Type, Origin).
- ``wire_value``: a column's text form from the WAL -> the JSON value a Debezium PostgreSQL
  connector writes for it (psycopg's own loaders parse the text first).
- ``python_value``: the reverse, a JSON value -> the Python value of a column of a given SQL type.
- ``change_envelope`` / ``parse_change``: our events are Debezium envelopes; ``parse_change``
  turns either ours or a real Debezium connector's event (JSON converter, with or without
  schemas) into one ``Change``, so the apply side does not care which capture produced it.

Wire encoding of values (the Debezium connector with ``decimal.handling.mode=string``, the
defaults otherwise): numeric as a plain decimal string, ``timestamptz`` as an ISO-8601 UTC string
ending in ``Z``, ``timestamp`` as epoch microseconds, ``date`` as epoch days, ``time`` as
microseconds since midnight, json/jsonb as their JSON text, ``bytea`` as base64, arrays as JSON
arrays of their elements, bigints as exact JSON integers, a float's NaN/Infinity as the strings
``"NaN"``/``"Infinity"``/``"-Infinity"`` (Kafka Connect's JSON converter writes them so).

Change events are hostile input: ``parse_change`` reads standard JSON only (no NaN/Infinity, no
number beyond a double, integers of at most 64 bits, not nested past the parser's recursion limit,
UTF-8) and checks every field it uses; ``python_value`` raises only ``InvalidChange`` for a value
its column cannot take. Either way the event is dead-lettered with the reason.
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal, InvalidOperation
from functools import cached_property, lru_cache
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union
from uuid import UUID

import orjson
import psycopg
from psycopg.abc import Loader
from psycopg.adapt import AdaptersMap
from psycopg.pq import Format

PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)
UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
UNIX_EPOCH_NAIVE = datetime(1970, 1, 1)
EPOCH_DATE = date(1970, 1, 1)
# Debezium's placeholder for an unchanged TOASTed column that the WAL does not carry.
UNAVAILABLE = "__debezium_unavailable_value"
OPS = ("c", "u", "d", "r")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # bigint, the replica's LSN column, Elasticsearch's long
# Types whose PostgreSQL text form is already what Debezium writes (kept as text, no round trip).
TEXT_KEPT_OIDS = {114, 3802, 1700, 25, 1043, 1042, 2950, 19}  # json, jsonb, numeric, text, varchar, bpchar, uuid, name


class ProtocolError(ValueError):
    """A pgoutput message this decoder cannot read."""


class InvalidChange(ValueError):
    """An event that is not a change this job can apply (the reason goes to the DLQ)."""


# --- LSNs ----------------------------------------------------------------------------------------


def lsn_to_int(lsn: str) -> int:
    """``'0/153BB18'`` -> 22264600."""
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


def int_to_lsn(value: int) -> str:
    """22264600 -> ``'0/153BB18'``."""
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


# --- pgoutput protocol v1 ------------------------------------------------------------------------


class Unchanged:
    """An unchanged TOASTed column of an update's new tuple ('u' in the protocol)."""

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED = Unchanged()
TupleValue = Union[None, str, Unchanged]


@dataclass(frozen=True)
class Column:
    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


@dataclass(frozen=True)
class Begin:
    final_lsn: int  # LSN of the transaction's commit record
    commit_ts_ms: int
    xid: int


@dataclass(frozen=True)
class Commit:
    commit_lsn: int
    end_lsn: int
    commit_ts_ms: int


@dataclass(frozen=True)
class Relation:
    oid: int
    schema: str
    name: str
    replica_identity: str
    columns: Tuple[Column, ...]


@dataclass(frozen=True)
class Insert:
    relation_oid: int
    new: Tuple[TupleValue, ...]


@dataclass(frozen=True)
class Update:
    relation_oid: int
    old: Optional[Tuple[TupleValue, ...]]  # key columns ('K') or the whole old row ('O'), if sent
    new: Tuple[TupleValue, ...]


@dataclass(frozen=True)
class Delete:
    relation_oid: int
    old: Tuple[TupleValue, ...]


@dataclass(frozen=True)
class Truncate:
    relation_oids: Tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True)
class TypeInfo:
    oid: int
    schema: str
    name: str


@dataclass(frozen=True)
class Origin:
    lsn: int
    name: str


Message = Union[Begin, Commit, Relation, Insert, Update, Delete, Truncate, TypeInfo, Origin]


class _Reader:
    """Sequential reads of the big-endian fields of one pgoutput message."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise ProtocolError(f"message truncated at byte {self.pos}")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def byte(self) -> str:
        return chr(self.take("!B"))

    def string(self) -> str:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise ProtocolError("unterminated string")
        value = self.data[self.pos : end].decode("utf-8")
        self.pos = end + 1
        return value

    def raw(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise ProtocolError(f"value of {size} bytes truncated at byte {self.pos}")
        value = self.data[self.pos : self.pos + size]
        self.pos += size
        return value

    def tuple_data(self) -> Tuple[TupleValue, ...]:
        values: List[TupleValue] = []
        for _ in range(self.take("!H")):
            kind = self.byte()
            if kind == "n":
                values.append(None)
            elif kind == "u":
                values.append(UNCHANGED)
            elif kind == "t":
                values.append(self.raw(self.take("!I")).decode("utf-8"))
            else:
                raise ProtocolError(f"unknown tuple value kind {kind!r} (binary mode is not requested)")
        return tuple(values)


def pg_timestamp_ms(microseconds: int) -> int:
    """PostgreSQL's microseconds since 2000-01-01 -> Unix epoch milliseconds."""
    return int((PG_EPOCH - UNIX_EPOCH).total_seconds() * 1000) + microseconds // 1000


def _decode_relation(reader: _Reader) -> Relation:
    oid, schema, name = reader.take("!I"), reader.string(), reader.string()
    identity = reader.byte()
    columns = []
    for _ in range(reader.take("!H")):
        flags, column_name = reader.take("!B"), reader.string()
        columns.append(Column(column_name, reader.take("!I"), reader.take("!i"), bool(flags & 1)))
    return Relation(oid, schema or "pg_catalog", name, identity, tuple(columns))


def _decode_update(reader: _Reader) -> Update:
    oid, kind, old = reader.take("!I"), reader.byte(), None
    if kind in ("K", "O"):
        old = reader.tuple_data()
        kind = reader.byte()
    if kind != "N":
        raise ProtocolError(f"update without a new tuple (got {kind!r})")
    return Update(oid, old, reader.tuple_data())


def _decode_delete(reader: _Reader) -> Delete:
    oid, kind = reader.take("!I"), reader.byte()
    if kind not in ("K", "O"):
        raise ProtocolError(f"delete without an old tuple (got {kind!r})")
    return Delete(oid, reader.tuple_data())


def _decode_insert(reader: _Reader) -> Insert:
    oid, kind = reader.take("!I"), reader.byte()
    if kind != "N":
        raise ProtocolError(f"insert without a new tuple (got {kind!r})")
    return Insert(oid, reader.tuple_data())


def _decode_truncate(reader: _Reader) -> Truncate:
    count, options = reader.take("!I"), reader.take("!B")
    return Truncate(tuple(reader.take("!I") for _ in range(count)), bool(options & 1), bool(options & 2))


def decode_message(data: bytes) -> Message:
    """Decode one pgoutput (protocol version 1) message."""
    if not data:
        raise ProtocolError("empty message")
    reader = _Reader(bytes(data))
    kind = reader.byte()
    if kind == "B":
        return Begin(reader.take("!Q"), pg_timestamp_ms(reader.take("!q")), reader.take("!I"))
    if kind == "C":
        reader.take("!B")
        return Commit(reader.take("!Q"), reader.take("!Q"), pg_timestamp_ms(reader.take("!q")))
    if kind == "R":
        return _decode_relation(reader)
    if kind == "I":
        return _decode_insert(reader)
    if kind == "U":
        return _decode_update(reader)
    if kind == "D":
        return _decode_delete(reader)
    if kind == "T":
        return _decode_truncate(reader)
    if kind == "Y":
        return TypeInfo(reader.take("!I"), reader.string(), reader.string())
    if kind == "O":
        return Origin(reader.take("!Q"), reader.string())
    raise ProtocolError(f"unknown pgoutput message type {kind!r}")


# --- values: WAL text -> Debezium JSON -----------------------------------------------------------

_ADAPTERS = AdaptersMap(psycopg.postgres.adapters)


def _trimmed_fraction(microseconds: int) -> str:
    return f".{microseconds:06d}".rstrip("0") if microseconds else ""


def debezium_json(value: Any) -> Any:
    """A Python value (as psycopg loads it) -> the JSON value Debezium writes for it."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime):
        if value.tzinfo is None:  # timestamp: MicroTimestamp
            return (value - UNIX_EPOCH_NAIVE) // timedelta(microseconds=1)
        utc = value.astimezone(timezone.utc)  # ISO 8601 with a four-digit year (strftime's %Y does not pad)
        return utc.replace(tzinfo=None, microsecond=0).isoformat() + _trimmed_fraction(utc.microsecond) + "Z"
    if isinstance(value, date):
        return (value - EPOCH_DATE).days
    if isinstance(value, time):
        if value.tzinfo is not None:
            return value.isoformat()
        return ((value.hour * 60 + value.minute) * 60 + value.second) * 1_000_000 + value.microsecond
    if isinstance(value, timedelta):
        return value // timedelta(microseconds=1)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (list, tuple)):
        return [debezium_json(item) for item in value]
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, UUID):
        return str(value)
    return str(value)


def wire_value(type_oid: int, text: TupleValue) -> Any:
    """A column value in PostgreSQL's text form (from pgoutput or ``::text``) -> Debezium JSON."""
    if text is None:
        return None
    if isinstance(text, Unchanged):
        return UNAVAILABLE
    if type_oid in TEXT_KEPT_OIDS:
        return text
    loader = _text_loader(type_oid)
    if loader is None:
        return text  # an enum, a domain of an unknown type...: its text form
    try:
        return debezium_json(loader.load(text.encode("utf-8")))
    except (psycopg.DataError, ValueError, OverflowError):
        return text  # 'infinity' timestamps and the like: Debezium's conventions differ, keep the text


@lru_cache(maxsize=4096)  # a loader per type OID, made once (loading keeps no state)
def _text_loader(type_oid: int) -> Optional[Loader]:
    loader_class = _ADAPTERS.get_loader(type_oid, Format.TEXT)
    return None if loader_class is None else loader_class(type_oid, None)


# --- values: Debezium JSON -> Python, by SQL type -------------------------------------------------


def _timestamp(value: Any) -> Any:
    if isinstance(value, int):
        return UNIX_EPOCH_NAIVE + timedelta(microseconds=value)
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def _timestamptz(value: Any) -> Any:
    if isinstance(value, int):  # a connector configured for epoch values
        return UNIX_EPOCH + timedelta(microseconds=value)
    if not isinstance(value, str):
        return value
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is not None:
        moment.astimezone(timezone.utc)  # year 1 or 9999 with an offset: OverflowError, refused
    return moment


def _date(value: Any) -> Any:
    if isinstance(value, int):
        return EPOCH_DATE + timedelta(days=value)
    return date.fromisoformat(value) if isinstance(value, str) else value


def _time(value: Any) -> Any:
    if isinstance(value, int):
        if not 0 <= value < MICROSECONDS_PER_DAY:
            raise ValueError("microseconds since midnight out of range")
        return (datetime.min + timedelta(microseconds=value)).time()
    return time.fromisoformat(value) if isinstance(value, str) else value


def _numeric(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InvalidChange(f"not a decimal: {value!r}")
    try:
        return Decimal(value if isinstance(value, str) else str(value))
    except InvalidOperation:
        raise InvalidChange(f"not a decimal: {value!r}") from None


def _bytea(value: Any) -> Any:
    return base64.b64decode(value, validate=True) if isinstance(value, str) else value  # junk is refused, not skipped


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


_SCALAR_DECODERS = {
    "timestamp without time zone": _timestamp,
    "timestamp with time zone": _timestamptz,
    "date": _date,
    "time without time zone": _time,
    "numeric": _numeric,
    "bytea": _bytea,
    "json": _json,
    "jsonb": _json,
}


MICROSECONDS_PER_DAY = 86_400_000_000
INFINITE_TIMES = ("infinity", "-infinity")  # PostgreSQL's, kept as text by capture: the replica takes them
TIME_TYPES = ("timestamp without time zone", "timestamp with time zone", "date")
INTEGER_BITS = {"smallint": 16, "integer": 32, "bigint": 64}
NUMERIC_MAX_INTEGER_DIGITS, NUMERIC_MAX_SCALE = 131072, 16383  # PostgreSQL's numeric without (p, s)
_NUMERIC_MODIFIERS = re.compile(r"numeric\((\d+)(?:,\s*(-?\d+))?\)")


def _check_range(value: Any, sql_type: str) -> None:
    """Raise ValueError for a converted value PostgreSQL would refuse for its size."""
    base = base_type(sql_type)
    if base in INTEGER_BITS and isinstance(value, int) and not isinstance(value, bool):
        limit = 2 ** (INTEGER_BITS[base] - 1)
        if not -limit <= value < limit:
            raise ValueError(f"out of range for {base}")
    elif isinstance(value, Decimal) and value.is_finite():
        _check_numeric_digits(value, sql_type)


def _check_numeric_digits(value: Decimal, sql_type: str) -> None:
    integer_digits = max(value.adjusted() + 1, 0)
    before_point = _digits_before_point(sql_type)
    if before_point is not None:
        if integer_digits > before_point:
            raise ValueError(f"more than {before_point} digits before the decimal point")
    elif integer_digits > NUMERIC_MAX_INTEGER_DIGITS or _digits_after_point(value) > NUMERIC_MAX_SCALE:
        raise ValueError("beyond PostgreSQL's numeric range")


@lru_cache(maxsize=4096)  # a handful of types, looked up for every numeric value
def _digits_before_point(sql_type: str) -> Optional[int]:
    """numeric(p, s) takes at most p - s digits before the point; None without (p, s)."""
    modifiers = _NUMERIC_MODIFIERS.search(sql_type)
    return int(modifiers.group(1)) - int(modifiers.group(2) or 0) if modifiers else None


def _digits_after_point(value: Decimal) -> int:
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)  # a finite value's (the only kind checked); NaN's is "n"
    return -exponent


@lru_cache(maxsize=4096)  # a handful of types, looked up for every value
def base_type(sql_type: str) -> str:
    """``'numeric(12,2)'`` -> ``'numeric'``, ``'timestamp(3) with time zone'`` -> the same without (3)."""
    name = sql_type.removesuffix("[]")
    if "(" in name:
        head, _, rest = name.partition("(")
        name = (head + rest.partition(")")[2]).strip()
    return name


def python_value(value: Any, sql_type: str) -> Any:
    """A Debezium JSON value of a column of ``sql_type`` (as ``format_type`` names it) -> Python.
    Raises InvalidChange (only) for a value the column cannot take."""
    return value_converter(sql_type)(value)


@lru_cache(maxsize=4096)  # a handful of types, one converter each, called for every value
def value_converter(sql_type: str) -> Callable[[Any], Any]:
    """``python_value`` for one SQL type, with what depends only on the type worked out once."""
    if sql_type.endswith("[]"):
        item_type = sql_type[:-2]

        def array(value: Any) -> Any:
            if value is None:
                return None
            if not isinstance(value, list):
                raise InvalidChange(f"array column of type {sql_type} holds {_shown(value)}")
            convert_item = value_converter(item_type)  # here, not above: a type may have any number of []
            return [convert_item(item) for item in value]

        return array
    base = base_type(sql_type)
    decoder = _SCALAR_DECODERS.get(base)
    keeps_infinity = base in TIME_TYPES
    limit = 2 ** (INTEGER_BITS[base] - 1) if base in INTEGER_BITS else None

    def scalar(value: Any) -> Any:
        if value is None:
            return None
        if limit is not None and type(value) is int and -limit <= value < limit:
            return value  # an integer column's usual value, without the checks below
        if keeps_infinity and value in INFINITE_TIMES:
            return value
        try:
            converted = decoder(value) if decoder else value
            _check_range(converted, sql_type)
            return converted
        except InvalidChange:
            raise
        except (ValueError, TypeError, ArithmeticError, RecursionError) as error:  # OverflowError is arithmetic
            raise InvalidChange(f"{_shown(value)} is not a {sql_type}: {error}") from None

    return scalar


def _shown(value: Any, limit: int = 80) -> str:
    """A value in a reason, cut: a dead letter's reason must not be the whole hostile value."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # repr of a 5,000-digit int or a very deep list
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


# --- envelopes and the internal change form -----------------------------------------------------


@dataclass(frozen=True)
class ColumnDef:
    """A source column as the replica needs it to create the table."""

    name: str
    sql_type: str
    is_key: bool


@dataclass
class Change:
    """One row change, whichever capture produced it."""

    schema: str
    table: str
    op: str  # c, u, d, r
    key: Dict[str, Any]
    before: Optional[Dict[str, Any]]
    after: Optional[Dict[str, Any]]
    lsn: int  # the guard: an older LSN never overwrites a newer one
    ts_ms: int  # source commit time (snapshot: read time)
    snapshot: bool = False
    tx_id: Optional[int] = None
    columns: Optional[List[ColumnDef]] = None
    origin: Any = field(default=None, compare=False)  # the Kafka event it came from
    # The replica's parameters, converted when the change was checked: (types, after image, values).
    replica_values: Any = field(default=None, compare=False, repr=False)

    @cached_property
    def table_name(self) -> str:
        return f"{self.schema}.{self.table}"  # schema and table never change once parsed

    @cached_property
    def row_id(self) -> str:
        return row_id(self.key)  # the key never changes once parsed

    @property
    def is_delete(self) -> bool:
        return self.op == "d"

    @property
    def after_image(self) -> Dict[str, Any]:
        """The row after a create, update or read (parse_change refuses those without one)."""
        assert self.after is not None, f"a change of op {self.op!r} without an after-image"
        return self.after


def key_json(key: Mapping[str, Any]) -> bytes:
    """The Kafka record key: the primary key as compact JSON, in key-column order (as Debezium),
    as the standard library writes it (its bytes choose the partition, so they never change).
    orjson writes the same bytes for integers and printable ASCII text, and five times faster."""
    if all(_printable_ascii(name) and (type(value) is int or _printable_ascii(value)) for name, value in key.items()):
        with suppress(orjson.JSONEncodeError):  # an integer past 64 bits
            return orjson.dumps(dict(key))
    return json.dumps(dict(key), separators=(",", ":")).encode()


def _printable_ascii(value: Any) -> bool:
    """Text neither encoder escapes differently (the standard library escapes DEL and non-ASCII)."""
    return type(value) is str and value.isascii() and value.isprintable()


def row_id(key: Mapping[str, Any]) -> str:
    """A row's id in Redis keys and Elasticsearch ``_id``: the key values, ``:``-joined, each a
    string as is, anything else as JSON (an int's JSON is its ``str``, without the encoder)."""
    return ":".join(value if type(value) is str else str(value) if type(value) is int else json.dumps(value) for value in key.values())


def change_envelope(
    *,
    op: str,
    before: Optional[Dict[str, Any]],
    after: Optional[Dict[str, Any]],
    lsn: int,
    tx_id: Optional[int],
    ts_ms: int,
    schema: str,
    table: str,
    db: str,
    snapshot: Union[bool, str],
    now_ms: int,
    columns: Optional[Sequence[ColumnDef]] = None,
) -> Dict[str, Any]:
    """A Debezium change event value; ``source.columns`` (not Debezium's) lets a replica create the table."""
    source: Dict[str, Any] = {
        "version": "streamspine",
        "connector": "postgresql",
        "name": "streamspine",
        "db": db,
        "schema": schema,
        "table": table,
        "txId": tx_id,
        "lsn": lsn,
        "ts_ms": ts_ms,
        "snapshot": snapshot if isinstance(snapshot, str) else ("true" if snapshot else "false"),
    }
    if columns is not None:
        source["columns"] = [[column.name, column.sql_type, column.is_key] for column in columns]
    return {"before": before, "after": after, "source": source, "op": op, "ts_ms": now_ms}


def _json_integer(text: str) -> int:
    if len(text.lstrip("-")) > 19:  # before int(): Python refuses over 4,300 digits with a ValueError
        raise InvalidChange("an integer beyond 64 bits")
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidChange("an integer beyond 64 bits")
    return value


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidChange(f"a number beyond a double ({text[:40]})")
    return value


def _json_constant(name: str) -> Any:
    raise InvalidChange(f"{name}, which is not standard JSON")


_STRICT_DECODER = json.JSONDecoder(parse_int=_json_integer, parse_float=_json_float, parse_constant=_json_constant)


# orjson reads a value as the strict decoder does unless it holds an integer literal of 19 digits
# or more (orjson reads up to 2**64 - 1 exactly and makes longer ones floats; the strict decoder
# refuses whatever is past int64) or nests deeper than the standard library can (orjson: 1,024).
# A run of 19 digits shows as 19 zeros once every digit is a zero (bytes.translate and a substring
# search: ten times faster than the regex \d{19} over a change event).
DIGITS_AS_ZEROS = bytes.maketrans(b"123456789", b"000000000")
LONG_DIGIT_RUN = b"0" * 19
SHALLOW_BRACKETS = 500  # fewer [ and { than this in all: nested less deeply than that


def strict_json(raw: bytes, what: str) -> Any:
    """``raw`` as standard JSON whose integers fit 64 bits and numbers a double; anything else
    (not UTF-8, NaN, 1e400, a 5,000-digit integer, nesting past the recursion limit) is refused.
    orjson reads it when it is sure to read it as the strict standard-library decoder would."""
    raw = bytes(raw)
    if raw.count(b"[") + raw.count(b"{") < SHALLOW_BRACKETS and LONG_DIGIT_RUN not in raw.translate(DIGITS_AS_ZEROS):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # the standard library tells why
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidChange(f"{what} is not UTF-8") from None
    try:
        return _STRICT_DECODER.decode(text)
    except InvalidChange as error:
        raise InvalidChange(f"{what} holds {error}") from None
    except RecursionError:
        raise InvalidChange(f"{what} is nested too deeply") from None
    except ValueError:
        raise InvalidChange(f"{what} is not JSON") from None


# Column types as format_type names them ("numeric(12,2)", "timestamp(3) with time zone",
# "character varying(20)[]", "public.mood", '"MyType"'): the replica puts them into CREATE TABLE.
_NAME = r'(?:[A-Za-z_][A-Za-z0-9_$]*|"[^"\x00]+")'
SQL_TYPE = re.compile(rf"{_NAME}(?:\.{_NAME})?(?: [A-Za-z]+)*(?:\(-?\d{{1,6}}(?:, ?-?\d{{1,6}})?\))?(?: [A-Za-z]+)*(?:\[\])*")


@lru_cache(maxsize=4096)  # every event of a table carries the same types
def is_type_name(sql_type: str) -> bool:
    return SQL_TYPE.fullmatch(sql_type) is not None


# Names and column lists already checked: every event of a table repeats them (bounded caches).
_CHECKED_NAMES: Set[str] = set()
_CHECKED_COLUMNS: Dict[bytes, List[ColumnDef]] = {}  # by the JSON of source.columns
CHECKED_MAX = 4096


def _identifier(value: Any, what: str) -> str:
    """A schema, table or column name: a non-empty UTF-8 string without NUL (psycopg refuses NUL)."""
    if type(value) is str and value in _CHECKED_NAMES:
        return value
    if not isinstance(value, str) or not value or "\x00" in value:
        raise InvalidChange(f"{what} must be a non-empty name without NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidChange(f"{what} is not valid UTF-8 text") from None
    if len(_CHECKED_NAMES) < CHECKED_MAX:
        _CHECKED_NAMES.add(value)
    return value


def _unwrap(document: Any) -> Any:
    """A JSON-converter document with ``schemas.enable=true`` -> its payload."""
    if isinstance(document, dict) and len(document) == 2 and "schema" in document and "payload" in document:
        return document["payload"]
    return document


def _row(value: Any, name: str) -> Optional[Dict[str, Any]]:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidChange(f"{name} must be an object or null")
    for column in value:
        if column not in _CHECKED_NAMES:  # JSON object keys are strings
            _identifier(column, f"a column name of {name}")
    return value


def _snapshot_flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return value in ("true", "first", "last", "first_in_data_collection", "last_in_data_collection", "incremental")


def _columns(source: Dict[str, Any]) -> Optional[List[ColumnDef]]:
    raw = source.get("columns")
    if raw is None:
        return None
    known = _checked_columns(raw)
    if known is not None:
        return list(known)
    shape = "source.columns must be [[name, sql_type, is_key], ...]"
    if not isinstance(raw, list) or not raw:
        raise InvalidChange(shape)
    columns = []
    for column in raw:
        if not isinstance(column, list) or len(column) != 3 or not isinstance(column[2], bool):
            raise InvalidChange(shape)
        name, sql_type, is_key = column
        if not isinstance(sql_type, str) or not is_type_name(sql_type):
            raise InvalidChange(f"source.columns: {_shown(sql_type)} is not a column type")
        columns.append(ColumnDef(_identifier(name, "a column name of source.columns"), sql_type, is_key))
    try:
        cache_key = orjson.dumps(raw)
    except orjson.JSONEncodeError:  # a lone surrogate, which no sink could write either
        raise InvalidChange("source.columns: a name or type that is not valid UTF-8") from None
    if len(_CHECKED_COLUMNS) < CHECKED_MAX:
        _CHECKED_COLUMNS[cache_key] = columns
    return list(columns)


def _checked_columns(raw: Any) -> Optional[List[ColumnDef]]:
    """The ColumnDefs of a ``source.columns`` list checked before, or None (check it). Keyed by
    its JSON, which tells ``true`` from ``1`` (equal, and equally hashed, in Python)."""
    try:
        return _CHECKED_COLUMNS.get(orjson.dumps(raw))
    except (TypeError, orjson.JSONEncodeError):  # nothing checked before could fail to encode
        return None


def _integer(value: Any, name: str, minimum: int = INT64_MIN) -> int:
    """A 64-bit integer, as a JSON number or a decimal string (a Debezium ``txId`` may be either)."""
    if type(value) is int and minimum <= value <= INT64_MAX:
        return value
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,19}", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= INT64_MAX:
        raise InvalidChange(f"{name} must be an integer from {minimum} to {INT64_MAX}, got {_shown(value)}")
    return value


def _key(raw_key: Optional[bytes], row: Optional[Dict[str, Any]], columns: Optional[List[ColumnDef]]) -> Dict[str, Any]:
    """The primary key: the record key, or (none sent) the key columns of the row image."""
    if raw_key is None:
        key_names = [column.name for column in columns or [] if column.is_key]
        if row and key_names and all(name in row for name in key_names):
            return {name: row[name] for name in key_names}
        raise InvalidChange("no record key and no primary key columns to derive it from")
    key = _unwrap(strict_json(raw_key, "record key"))
    if not isinstance(key, dict) or not key:
        raise InvalidChange("record key must be a JSON object naming the primary key columns")
    for name, value in key.items():
        _identifier(name, "a record key column")
        if value is None or isinstance(value, (dict, list)):
            raise InvalidChange(f"record key column {name!r} must hold a primary key value")
        if row is not None and name in row and row[name] != value:
            raise InvalidChange(f"record key column {name!r} differs from the row's value")
    return key


def parse_change(raw_key: Optional[bytes], raw_value: Optional[bytes]) -> Optional[Change]:
    """A CDC topic record (ours or a Debezium connector's) -> a Change; None for a tombstone.
    Raises InvalidChange with the reason for anything else."""
    if raw_value is None:
        return None
    envelope = _unwrap(strict_json(raw_value, "value"))
    if envelope is None:
        return None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("source"), dict):
        raise InvalidChange("value is not a Debezium change event (no source block)")
    op, source = envelope.get("op"), envelope["source"]
    if op not in OPS:
        raise InvalidChange(f"op {_shown(op)} is not applied (only c, u, d, r)")
    if not all(isinstance(source.get(part), str) and source[part] for part in ("schema", "table")):
        raise InvalidChange("source.schema and source.table must name the table")
    schema, table = _identifier(source["schema"], "source.schema"), _identifier(source["table"], "source.table")
    if source.get("lsn") is None:
        raise InvalidChange("source.lsn is missing: it orders the changes of a row")
    before, after = _row(envelope.get("before"), "before"), _row(envelope.get("after"), "after")
    if (after is None) != (op == "d"):
        raise InvalidChange(f"op {op!r} with {'no' if after is None else 'an'} after-image")
    columns = _columns(source)
    tx_id = source.get("txId")
    return Change(
        schema=schema,
        table=table,
        op=op,
        key=_key(raw_key, after if after is not None else before, columns),
        before=before,
        after=after,
        lsn=_integer(source["lsn"], "source.lsn", minimum=0),
        ts_ms=_integer(source.get("ts_ms", envelope.get("ts_ms", 0)), "source.ts_ms"),
        snapshot=_snapshot_flag(source.get("snapshot", False)),
        tx_id=None if tx_id is None else _integer(tx_id, "source.txId"),
        columns=columns,
    )


# --- folding the changes of a batch --------------------------------------------------------------


def fill_unavailable(after: Dict[str, Any], previous: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Replace Debezium's unchanged-TOAST placeholders with the previous row image's values."""
    missing = [name for name, value in after.items() if value == UNAVAILABLE]
    if not missing:
        return after
    if previous is None or any(name not in previous for name in missing):
        raise InvalidChange(f"unchanged TOAST columns {missing} and no earlier row image to take them from")
    return {name: previous[name] if value == UNAVAILABLE else value for name, value in after.items()}


def latest_per_row(changes: Sequence[Change]) -> List[Change]:
    """The newest change of each row of a batch (highest LSN; of equal LSNs, one transaction's, the
    later in the batch), in batch order. A row's changes may come from two partitions (a Debezium
    key converter that wrapped one key in a schema envelope), so batch order is not LSN order."""
    latest: Dict[Tuple[str, str], Change] = {}
    for change in changes:
        ident = (change.table_name, change.row_id)
        kept = latest.get(ident)
        if kept is None or kept.lsn <= change.lsn:
            latest.pop(ident, None)
            latest[ident] = change
    return list(latest.values())
