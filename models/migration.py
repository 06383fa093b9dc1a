"""Zero-downtime migration of the orders system V1 -> V2: the messages, the declared V1 -> V2
mapping with its upcasters, the parallel-run comparison and the routing rule of each phase.

Everything here is pure and unit-tested without Kafka; agents/migration.py wires it to topics.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import faust

from models.metrics import InvalidRecord

# --- messages --------------------------------------------------------------------------------------


class OrderV2(faust.Record, serializer="json"):
    """An order event in the V2 format, produced by the bridge to ``orders.v2``."""

    order_id: str
    customer_id: str
    amount: Dict[str, str]
    state: str
    created_at: str
    source_version: int
    event_id: str


class RoutedCommand(faust.Record, serializer="json"):
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


class PhaseMarker(faust.Record, serializer="json"):
    """A phase change, written into every partition of ``orders.commands``: commands before it in
    a partition are routed by the old phase, commands after it by the new one, also on replay."""

    phase: str
    canary_percent: int
    change_id: str
    changed_at: float


# --- the V1 -> V2 mapping ----------------------------------------------------------------------------

CURRENT_V1_SCHEMA = 2
STATE_OF_V1_STATUS = {"NEW": "created", "PAID": "paid", "SHIPPED": "shipped", "DELIVERED": "delivered",
                      "CANCELLED": "cancelled", "REFUNDED": "refunded"}
# V1 (latest schema) field -> V2 field: used by the bridge and by the comparison of results.
KEY_RENAMES = {"id": "order_id", "customer": "customer_id", "status": "state", "created_at": "created_at"}


def _text(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value.strip():
        raise InvalidRecord(f"field {name!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _utc_iso(value: Any, name: str) -> str:
    """``"2024-11-01 10:00:00"`` (V1: naive, UTC) or ISO 8601 -> ``"2024-11-01T10:00:00Z"``."""
    if not isinstance(value, str):
        raise InvalidRecord(f"field {name!r} must be a date-time string, got {value!r}")
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRecord(f"field {name!r} is not a date-time: {value!r}") from None
    moment = moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def upcast_1_to_2(event: Dict[str, Any]) -> Dict[str, Any]:
    """Schema 1 ``{"total_cents": 1250, "created": "2024-11-01 10:00:00"}`` -> schema 2
    ``{"total": "12.50", "currency": "USD", "created_at": "2024-11-01T10:00:00Z"}``."""
    cents = event.get("total_cents")
    if isinstance(cents, bool) or not isinstance(cents, int) or cents < 0:
        raise InvalidRecord(f"field 'total_cents' must be a non-negative integer, got {cents!r}")
    upcast = {key: value for key, value in event.items() if key not in ("total_cents", "created")}
    upcast.update(total=str((Decimal(cents) / 100).quantize(Decimal("0.01"))), currency=event.get("currency", "USD"),
                  created_at=_utc_iso(event.get("created"), "created"), schema_version=2)
    return upcast


# Each V1 schema version's upcaster to the next; add one here when V1 changes its format.
UPCASTERS: Dict[int, Callable[[Dict[str, Any]], Dict[str, Any]]] = {1: upcast_1_to_2}


def upcast(event: Dict[str, Any]) -> Tuple[Dict[str, Any], int]:
    """The event in the current V1 schema, and the schema version it arrived in."""
    version = event.get("schema_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= CURRENT_V1_SCHEMA:
        raise InvalidRecord(f"unknown V1 schema_version {version!r} (known: 1..{CURRENT_V1_SCHEMA})")
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
        return given
    canonical = json.dumps(event, sort_keys=True, separators=(",", ":"), default=str)
    return "v1-" + hashlib.blake2b(canonical.encode(), digest_size=12).hexdigest()


def translate(event: Any) -> OrderV2:
    """A V1 order event (any known schema) as a V2 event; InvalidRecord says why it cannot be."""
    if not isinstance(event, dict):
        raise InvalidRecord(f"a V1 event must be a JSON object, got {type(event).__name__}")
    event_id = v1_event_id(event)
    current, source_version = upcast(event)
    status = _text(current, "status").upper()
    if status not in STATE_OF_V1_STATUS:
        raise InvalidRecord(f"unknown V1 status {status!r} (known: {', '.join(STATE_OF_V1_STATUS)})")
    try:
        total = Decimal(str(current.get("total")))
    except InvalidOperation:
        raise InvalidRecord(f"field 'total' is not a decimal amount: {current.get('total')!r}") from None
    if not total.is_finite() or total < 0:
        raise InvalidRecord(f"field 'total' must be a non-negative amount, got {current.get('total')!r}")
    currency = current.get("currency")
    if not isinstance(currency, str) or len(currency) != 3 or not currency.isalpha():
        raise InvalidRecord(f"field 'currency' must be an ISO 4217 code, got {currency!r}")
    return OrderV2(
        order_id=_text(current, "id"),
        customer_id=_text(current, "customer"),
        amount={"value": str(total.quantize(Decimal("0.01"))), "currency": currency.upper()},
        state=STATE_OF_V1_STATUS[status],
        created_at=_utc_iso(current.get("created_at"), "created_at"),
        source_version=source_version,
        event_id=event_id,
    )


def decode_json(value: Optional[bytes]) -> Any:
    if value is None:
        raise InvalidRecord("record has no value")
    try:
        return json.loads(value)
    except (UnicodeDecodeError, ValueError) as error:
        raise InvalidRecord(f"value is not JSON: {error}") from None


# --- parallel-run comparison ---------------------------------------------------------------------


@dataclass(frozen=True)
class CompareRules:
    """How results are normalised before they are compared."""

    ignore: frozenset = frozenset({"source_version", "event_id", "processed_at"})
    tolerance: Decimal = Decimal("0.005")


def flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"amount": {"value": "1"}}`` -> ``{"amount.value": "1"}``."""
    if isinstance(value, dict):
        flat: Dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(flatten(inner, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def as_v2_shape(result: Mapping[str, Any]) -> Dict[str, Any]:
    """A V1 result in V2 field names and formats, through the bridge's own mapping when it is an
    order; otherwise field names renamed by KEY_RENAMES."""
    try:
        return translate(dict(result)).asdict()
    except InvalidRecord:
        return {KEY_RENAMES.get(key, key): value for key, value in result.items()}


def _numeric(value: Any) -> Optional[Decimal]:
    if isinstance(value, bool):
        return None
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def equal(v1: Any, v2: Any, rules: CompareRules) -> bool:
    if v1 == v2:
        return True
    a, b = _numeric(v1), _numeric(v2)
    if a is not None and b is not None:
        return abs(a - b) <= rules.tolerance
    if isinstance(v1, str) and isinstance(v2, str):
        return v1.strip().lower() == v2.strip().lower()
    return False


def compare_results(v1_result: Mapping[str, Any], v2_result: Mapping[str, Any], rules: CompareRules) -> Dict[str, Tuple[Any, Any]]:
    """Field by field differences ``{field: (v1 value, v2 value)}`` after normalisation."""
    left, right = flatten(as_v2_shape(v1_result)), flatten(dict(v2_result))
    diffs: Dict[str, Tuple[Any, Any]] = {}
    for field in sorted(set(left) | set(right)):
        if field in rules.ignore or field.split(".", 1)[0] in rules.ignore:
            continue
        if not equal(left.get(field), right.get(field), rules):
            diffs[field] = (left.get(field), right.get(field))
    return diffs


# --- phases and routing --------------------------------------------------------------------------

PHASES = ("shadow", "canary", "cutover", "rollback")
NEXT_PHASES = {
    "shadow": {"shadow", "canary", "rollback"},
    "canary": {"shadow", "canary", "cutover", "rollback"},
    "cutover": {"rollback"},
    "rollback": {"shadow", "rollback"},
}


def check_phase_change(current: str, phase: str, canary_percent: Any) -> int:
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
    ``history`` rows are ``[marker offset, phase, canary_percent]`` in offset order."""
    phase, percent = "shadow", 0
    for marker_offset, marker_phase, marker_percent in history:
        if marker_offset > offset:
            break
        phase, percent = marker_phase, marker_percent
    return phase, percent


def parse_command(data: Any) -> Dict[str, Any]:
    """``{"command_id", "order_id", "action", "payload"?}`` validated."""
    if not isinstance(data, dict):
        raise InvalidRecord(f"a command must be a JSON object, got {type(data).__name__}")
    payload = data.get("payload", {})
    if not isinstance(payload, dict):
        raise InvalidRecord("field 'payload' must be an object")
    return {"command_id": _text(data, "command_id"), "order_id": _text(data, "order_id"),
            "action": _text(data, "action"), "payload": payload}
