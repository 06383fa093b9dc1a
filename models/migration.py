"""Zero-downtime migration of the orders system V1 -> V2: the messages, the declared V1 -> V2
mapping with its upcasters, the parallel-run comparison and the routing rule of each phase.

Everything here is pure and unit-tested without Kafka; agents/migration.py wires it to topics.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import faust
import orjson

from models.metrics import InvalidRecord, parsed_json

# --- messages --------------------------------------------------------------------------------------
# include_metadata=False: the records carry exactly their documented fields, no Faust "__faust"
# namespace (strict consumers of orders.v2 and orders.*.in refuse unknown fields).


class OrderV2(faust.Record, serializer="json", include_metadata=False):
    """An order event in the V2 format, produced by the bridge to ``orders.v2``."""

    order_id: str
    customer_id: str
    amount: Dict[str, str]
    state: str
    created_at: str
    source_version: int
    event_id: str


class RoutedCommand(faust.Record, serializer="json", include_metadata=False):
    """A command as the router hands it to one system: ``answers`` says whether this system's
    answer is the one the caller gets (the other system receives a copy)."""

    command_id: str
    order_id: str
    action: str
    payload: Dict[str, Any]
    system: str
    answers: bool
    phase: str
    canary_percent: int


class PhaseMarker(faust.Record, serializer="json", include_metadata=False):
    """A phase change, written into every partition of ``orders.commands``: commands before it in
    a partition are routed by the old phase, commands after it by the new one, also on replay."""

    phase: str
    canary_percent: int
    change_id: str
    changed_at: float


def message_bytes(record: faust.Record) -> bytes:
    """A message as it goes on a topic: the JSON object of its documented fields, nothing else."""
    return orjson.dumps(record.asdict())


# --- the V1 -> V2 mapping ----------------------------------------------------------------------------

CURRENT_V1_SCHEMA = 2
STATE_OF_V1_STATUS = {
    "NEW": "created",
    "PAID": "paid",
    "SHIPPED": "shipped",
    "DELIVERED": "delivered",
    "CANCELLED": "cancelled",
    "REFUNDED": "refunded",
}
# V1 (latest schema) field -> V2 field: used by the bridge and by the comparison of results.
KEY_RENAMES = {"id": "order_id", "customer": "customer_id", "status": "state", "created_at": "created_at"}


MAX_DEPTH = 64  # nesting levels a record may have: deeper ones are refused before any recursion
MAX_ID_CHARS = 256  # an event or change id is remembered per order/partition, so it must stay short
CENTS = Decimal("0.01")


def _text(data: Mapping[str, Any], name: str, max_chars: Optional[int] = None) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value.strip():
        raise InvalidRecord(f"field {name!r} must be a non-empty string, got {_shown(value)}")
    if max_chars is not None and len(value) > max_chars:
        raise InvalidRecord(f"field {name!r} is {len(value)} characters long, more than {max_chars}")
    return value.strip()


def _shown(value: Any) -> str:
    """A value for a reason: its repr cut to 80 characters (a hostile value may be huge)."""
    try:
        text = repr(value)
    except ValueError:  # an integer over Python's digit limit has no repr
        return f"an integer of about {value.bit_length() * 0.30103:.0f} digits" if isinstance(value, int) else type(value).__name__
    return text if len(text) <= 80 else f"{text[:80]}... ({len(text)} characters)"


def _utc_iso(value: Any, name: str) -> str:
    """``"2024-11-01 10:00:00"`` (V1: naive, UTC) or ISO 8601 -> ``"2024-11-01T10:00:00Z"``."""
    if not isinstance(value, str):
        raise InvalidRecord(f"field {name!r} must be a date-time string, got {_shown(value)}")
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        moment = moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)
    except ValueError:
        raise InvalidRecord(f"field {name!r} is not a date-time: {_shown(value)}") from None
    except OverflowError:  # year 1 or 9999 with an offset: the UTC moment is out of datetime's range
        raise InvalidRecord(f"field {name!r} is out of range in UTC: {_shown(value)}") from None
    return f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}Z"


def _cents_amount(amount: Decimal, name: str) -> str:
    """An amount with two decimals; refused when it has more digits than the decimal context holds."""
    try:
        return str(amount.quantize(CENTS))
    except InvalidOperation:
        raise InvalidRecord(f"field {name!r} is too large an amount: {_shown(amount)}") from None


def upcast_1_to_2(event: Dict[str, Any]) -> Dict[str, Any]:
    """Schema 1 ``{"total_cents": 1250, "created": "2024-11-01 10:00:00"}`` -> schema 2
    ``{"total": "12.50", "currency": "USD", "created_at": "2024-11-01T10:00:00Z"}``."""
    cents = event.get("total_cents")
    if isinstance(cents, bool) or not isinstance(cents, int) or cents < 0:
        raise InvalidRecord(f"field 'total_cents' must be a non-negative integer, got {_shown(cents)}")
    upcast = {key: value for key, value in event.items() if key not in ("total_cents", "created")}
    upcast.update(
        total=_cents_amount(Decimal(cents).scaleb(-2), "total_cents"),
        currency=event.get("currency", "USD"),
        created_at=_utc_iso(event.get("created"), "created"),
        schema_version=2,
    )
    return upcast


# Each V1 schema version's upcaster to the next; add one here when V1 changes its format.
UPCASTERS: Dict[int, Callable[[Dict[str, Any]], Dict[str, Any]]] = {1: upcast_1_to_2}


def upcast(event: Dict[str, Any]) -> Tuple[Dict[str, Any], int]:
    """The event in the current V1 schema, and the schema version it arrived in."""
    version = event.get("schema_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= CURRENT_V1_SCHEMA:
        raise InvalidRecord(f"unknown V1 schema_version {_shown(version)} (known: 1..{CURRENT_V1_SCHEMA})")
    source_version = version
    while version < CURRENT_V1_SCHEMA:
        event = UPCASTERS[version](event)
        version = event["schema_version"]
    return event, source_version


def v1_event_id(event: Mapping[str, Any]) -> str:
    """The V1 event's ``event_id``, or a digest of its canonical JSON: the same event replayed has
    the same id, so the bridge translates it once."""
    given = event.get("event_id")
    if isinstance(given, str) and given:
        if len(given) > MAX_ID_CHARS:
            raise InvalidRecord(f"field 'event_id' is {len(given)} characters long, more than {MAX_ID_CHARS}")
        return given
    canonical = json.dumps(event, sort_keys=True, separators=(",", ":"), default=str)
    return "v1-" + hashlib.blake2b(canonical.encode(), digest_size=12).hexdigest()


def _amount(value: Any) -> Decimal:
    """The schema 2 ``total``: a non-negative finite decimal (a string or a JSON number)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InvalidRecord(f"field 'total' is not a decimal amount: {_shown(value)}")
    try:
        total = Decimal(str(value).strip())
    except InvalidOperation:
        raise InvalidRecord(f"field 'total' is not a decimal amount: {_shown(value)}") from None
    if not total.is_finite() or total < 0:
        raise InvalidRecord(f"field 'total' must be a non-negative amount, got {_shown(value)}")
    return total


def translate(event: Any) -> OrderV2:
    """A V1 order event (any known schema) as a V2 event; InvalidRecord says why it cannot be."""
    return OrderV2(**translated(event))


def translated(event: Any) -> Dict[str, Any]:
    """The fields of ``translate(event)`` (the comparison needs no record)."""
    if not isinstance(event, dict):
        raise InvalidRecord(f"a V1 event must be a JSON object, got {type(event).__name__}")
    event_id = v1_event_id(event)
    current, source_version = upcast(event)
    status = _text(current, "status").upper()
    if status not in STATE_OF_V1_STATUS:
        raise InvalidRecord(f"unknown V1 status {_shown(status)} (known: {', '.join(STATE_OF_V1_STATUS)})")
    total = _amount(current.get("total"))
    currency = current.get("currency")
    if not isinstance(currency, str) or len(currency) != 3 or not (currency.isascii() and currency.isalpha()):
        raise InvalidRecord(f"field 'currency' must be an ISO 4217 code, got {_shown(currency)}")
    return {
        "order_id": _text(current, "id"),
        "customer_id": _text(current, "customer"),
        "amount": {"value": _cents_amount(total, "total"), "currency": currency.upper()},
        "state": STATE_OF_V1_STATUS[status],
        "created_at": _utc_iso(current.get("created_at"), "created_at"),
        "source_version": source_version,
        "event_id": event_id,
    }


def _refuse_constant(name: str) -> Any:
    raise InvalidRecord(f"value is not JSON: {name} is not a number")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # 1e400 parses as infinity
        raise InvalidRecord(f"value is not JSON: {_shown(text)} is out of a number's range")
    return number


def decode_json(value: Optional[bytes]) -> Any:
    """A record's JSON value: NaN, Infinity, out-of-range numbers, integers over Python's digit
    limit, invalid UTF-8 and nesting deeper than MAX_DEPTH are refused with a reason."""
    if value is None:
        raise InvalidRecord("record has no value")
    try:
        data, depth = parsed_json(value, parse_constant=_refuse_constant, parse_float=_finite_float)
    except InvalidRecord:
        raise
    except (UnicodeDecodeError, ValueError) as error:
        raise InvalidRecord(f"value is not JSON: {error}") from None
    except RecursionError:  # the stdlib parser recurses per level: 10,000 levels exhaust the stack
        raise InvalidRecord(f"value nests deeper than {MAX_DEPTH} levels") from None
    if depth > MAX_DEPTH:
        raise InvalidRecord(f"value nests deeper than {MAX_DEPTH} levels")
    return data


def parse_v2_order(data: Any) -> Tuple[str, str]:
    """An ``orders.v2`` record's ``(order_id, event_id)``, all reconciliation needs of it."""
    if not isinstance(data, dict):
        raise InvalidRecord(f"a V2 event must be a JSON object, got {type(data).__name__}")
    return _text(data, "order_id"), _text(data, "event_id", MAX_ID_CHARS)


# --- parallel-run comparison ---------------------------------------------------------------------


@dataclass(frozen=True)
class CompareRules:
    """How results are normalised before they are compared."""

    ignore: frozenset = frozenset({"source_version", "event_id", "processed_at"})
    tolerance: Decimal = Decimal("0.005")


def flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"amount": {"value": "1"}}`` -> ``{"amount.value": "1"}`` (an empty object adds no field)."""
    if not isinstance(value, dict):
        return {prefix[:-1]: value}
    flat: Dict[str, Any] = {}
    flatten_into(flat, value, prefix)
    return flat


def flatten_into(flat: Dict[str, Any], value: Dict[str, Any], prefix: str) -> None:
    for key, inner in value.items():
        if isinstance(inner, dict):
            flatten_into(flat, inner, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = inner


def as_v2_shape(result: Mapping[str, Any]) -> Dict[str, Any]:
    """A V1 result in V2 field names and formats, through the bridge's own mapping when it is an
    order; otherwise field names renamed by KEY_RENAMES."""
    try:
        return translated(dict(result))
    except InvalidRecord:
        return {KEY_RENAMES.get(key, key): value for key, value in result.items()}


def normalized_result(side: str, result: Mapping[str, Any]) -> Dict[str, Any]:
    """A result as it is compared: in V2 shape (a V1 result through the bridge's mapping) and
    flattened. Computed once per result, when its record is decoded."""
    return flatten(as_v2_shape(result) if side == "v1" else dict(result))


def _numeric(value: Any) -> Optional[Decimal]:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def equal(v1: Any, v2: Any, rules: CompareRules) -> bool:
    """Whether two field values count as the same: equal, numbers within the tolerance, or strings
    equal ignoring case and surrounding space. Never raises, whatever the values."""
    if v1 == v2:
        return True
    a, b = _numeric(v1), _numeric(v2)
    if a is not None and b is not None:
        try:
            return abs(a - b) <= rules.tolerance
        except ArithmeticError:  # 9e999999 - -9e999999 overflows: certainly not within the tolerance
            return False
    if isinstance(v1, str) and isinstance(v2, str):
        return v1.strip().lower() == v2.strip().lower()
    return False


def compare_fields(left: Mapping[str, Any], right: Mapping[str, Any], rules: CompareRules) -> Dict[str, Tuple[Any, Any]]:
    """Field by field differences ``{field: (v1 value, v2 value)}`` of two normalised results."""
    diffs: Dict[str, Tuple[Any, Any]] = {}
    for field in sorted(set(left) | set(right)):
        if field in rules.ignore or field.split(".", 1)[0] in rules.ignore:
            continue
        if not equal(left.get(field), right.get(field), rules):
            diffs[field] = (left.get(field), right.get(field))
    return diffs


def compare_results(v1_result: Mapping[str, Any], v2_result: Mapping[str, Any], rules: CompareRules) -> Dict[str, Tuple[Any, Any]]:
    """Field by field differences ``{field: (v1 value, v2 value)}`` after normalisation."""
    return compare_fields(normalized_result("v1", v1_result), normalized_result("v2", v2_result), rules)


# --- phases and routing --------------------------------------------------------------------------

PHASES = ("shadow", "canary", "cutover", "rollback")
NEXT_PHASES = {
    "shadow": {"shadow", "canary", "rollback"},
    "canary": {"shadow", "canary", "cutover", "rollback"},
    "cutover": {"rollback"},
    "rollback": {"shadow", "rollback"},
}


def check_phase_change(current: str, phase: Any, canary_percent: Any) -> int:
    """Validate a requested change; returns the canary percentage to use (0 unless canary)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}")
    if phase not in NEXT_PHASES[current]:
        raise ValueError(f"cannot go from {current} to {phase} (allowed: {', '.join(sorted(NEXT_PHASES[current]))})")
    if phase != "canary":
        return 0
    if isinstance(canary_percent, bool) or not isinstance(canary_percent, int) or not 1 <= canary_percent <= 99:
        raise ValueError("canary_percent must be an integer from 1 to 99")
    return canary_percent


def canary_bucket(key: str) -> int:
    """A stable bucket 0..99 of a routing key: the same key lands in the same bucket on every
    worker and across restarts (Python's hash() is salted per process, so not that)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 100


def answering_system(phase: str, canary_percent: int, key: str) -> str:
    """Which system answers a command in a phase; the other one gets a copy."""
    if phase == "cutover":
        return "v2"
    if phase == "canary" and canary_bucket(key) < canary_percent:
        return "v2"
    return "v1"


def phase_at(history: List[List[Any]], offset: int) -> Tuple[str, int]:
    """The phase in force at ``offset`` of a commands partition: the last marker at or before it.
    ``history`` rows are ``[marker offset, phase, canary_percent, change_id]`` in offset order
    (rows written before change ids were kept have three elements)."""
    phase, percent = "shadow", 0
    for marker_offset, marker_phase, marker_percent, *_ in history:
        if marker_offset > offset:
            break
        phase, percent = marker_phase, marker_percent
    return phase, percent


def with_marker(history: List[List[Any]], offset: int, marker: PhaseMarker, keep: int) -> List[List[Any]]:
    """A partition's marker history with ``marker`` (read at ``offset``) in it, the latest ``keep``
    rows; a marker read again (a replay) is not added twice."""
    if any(row[0] == offset for row in history):
        return history
    rows = sorted([*history, [offset, marker.phase, marker.canary_percent, marker.change_id]], key=lambda row: row[0])
    return rows[-keep:]


def parse_marker(data: Any) -> PhaseMarker:
    """``{"phase", "canary_percent", "change_id", "changed_at"}`` validated: a marker decides how
    every later command of its partition is routed, so a malformed one must not be applied."""
    if not isinstance(data, dict):
        raise InvalidRecord(f"a phase marker must be a JSON object, got {type(data).__name__}")
    phase, percent = data.get("phase"), data.get("canary_percent")
    if phase not in PHASES:
        raise InvalidRecord(f"unknown phase {_shown(phase)} (known: {', '.join(PHASES)})")
    if isinstance(percent, bool) or not isinstance(percent, int) or not (1 <= percent <= 99 if phase == "canary" else percent == 0):
        raise InvalidRecord(f"canary_percent {_shown(percent)} does not fit phase {phase!r}")
    return PhaseMarker(
        phase=phase,
        canary_percent=percent,
        change_id=_text(data, "change_id", MAX_ID_CHARS),
        changed_at=_finite_number(data.get("changed_at"), "changed_at"),
    )


def _finite_number(value: Any, name: str) -> float:
    """A JSON number as a finite float (an integer beyond float's range is refused, not raised)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRecord(f"field {name!r} must be a number, got {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise InvalidRecord(f"field {name!r} must be a finite number, got {_shown(value)}")
    return number


def parse_command(data: Any) -> Dict[str, Any]:
    """``{"command_id", "order_id", "action", "payload"?}`` validated."""
    if not isinstance(data, dict):
        raise InvalidRecord(f"a command must be a JSON object, got {type(data).__name__}")
    payload = data.get("payload", {})
    if not isinstance(payload, dict):
        raise InvalidRecord("field 'payload' must be an object")
    return {
        "command_id": _text(data, "command_id"),
        "order_id": _text(data, "order_id"),
        "action": _text(data, "action"),
        "payload": payload,
    }


def parse_commands_record(data: Any) -> Any:
    """An ``orders.commands`` record: a PhaseMarker (``{"phase_marker": {...}}``) or a command."""
    if isinstance(data, dict) and "phase_marker" in data:
        return parse_marker(data["phase_marker"])
    return parse_command(data)
