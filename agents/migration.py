"""Zero-downtime migration V1 -> V2.

orders.v1 -> translate_v1_orders -> orders.v2                     (bridge: declared mapping + upcasters)
orders.v2 -> reconcile_v2_orders                                    (completeness: every V1 id reached V2)
orders.commands -> route_commands -> orders.v1.in, orders.v2.in     (phases: who answers, who gets a copy)
migration.v1.results + migration.v2.results -> compare_results      (parallel run: field-by-field diff)
Pages: /migration/status/ (any worker), /migration/local/, POST /migration/phase (ADMIN_TOKEN)

Every agent runs on app/runtime.py: a decode function per topic refuses a record for any reason
it fails (the record goes to ``<topic>.dlq``), and the batch body runs under ``until_applied``
(retried, never acknowledged after an error). Bodies read first, send and wait for Kafka's
acknowledgement, then write the tables in one step without awaiting, so a retry starts from the
same state (sends may repeat: at-least-once, with the same event and command ids).
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import time
import uuid
from decimal import Decimal
from functools import lru_cache
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple, TypeVar, Union, cast

import faust
import orjson
from faust import web
from faust.types import EventT, StreamT, TopicT

from app import app, settings, transport
from app.aggregation import BATCH_MAX, BATCH_WITHIN, enter_partition, fold_deltas, write_deltas
from app.dead_letters import RECORD_OVERHEAD
from app.gauges import gauge
from app.runtime import Decoded, decoded_batches, require_encodable, until_applied
from app.settings import Settings
from app.topics import raw_topic
from app.web import from_other_workers, require_admin_token
from models.migration import (
    CompareRules,
    InvalidRecord,
    OrderV2,
    PhaseMarker,
    RoutedCommand,
    answering_system,
    check_phase_change,
    compare_fields,
    decode_json,
    message_bytes,
    normalized_result,
    parse_commands_record,
    parse_v2_order,
    phase_at,
    translate,
    with_marker,
)
from tables.migration import order_events, partition_state, pending_results

log = logging.getLogger(__name__)
T = TypeVar("T")


V1_RESULTS, V2_RESULTS = "migration.v1.results", "migration.v2.results"
orders_v1 = raw_topic("orders.v1")
orders_v2 = raw_topic("orders.v2")  # OrderV2 records, written as message_bytes (documented fields only)
commands = raw_topic("orders.commands")
system_inputs = {system: raw_topic(f"orders.{system}.in") for system in ("v1", "v2")}  # RoutedCommand records
results = raw_topic(V1_RESULTS, V2_RESULTS)
# One tick per partition with results whose counterpart is overdue: the expiry is written under an
# event of that partition (Faust writes a table only in an event's context).
result_expiry = raw_topic("migration.result-expiry")

RULES = CompareRules()  # the comparison of MIGRATION_IGNORE_FIELDS and MIGRATION_TOLERANCE, set by register()


def compare_rules(settings: Settings) -> CompareRules:
    """The fields left out of the comparison and the tolerance of amounts, from the settings."""
    return CompareRules(
        ignore=frozenset(name.strip() for name in settings.migration_ignore_fields.split(",") if name.strip()),
        tolerance=Decimal(str(settings.migration_tolerance)),
    )


def register(app: faust.App, settings: Settings) -> None:
    """Compare V1 and V2 results with the rules of the settings."""
    global RULES
    RULES = compare_rules(settings)


BRIDGE_IDS_PER_ORDER = 200  # V1 event ids remembered per order for idempotency
PHASE_HISTORY = 100  # phase markers remembered per commands partition
CHANGE_IDS_SHOWN = 20  # latest change ids per partition in /migration/local/, to tell a change read
EXPIRY_INTERVAL = 1.0  # seconds between looks for results whose counterpart never came
COMPLETENESS_MAX_AGE = 1.0  # seconds a scan of the orders' states serves the status pages
COMPLETENESS_CHUNK = 1000  # orders scanned between two turns of the event loop
ROUTING_FIELDS_BYTES = 128  # what routing adds to a command: system, answers, phase, canary_percent
PENDING_ENTRY_BYTES = 128  # what a waiting result's table entry adds to its fields
SAMPLE_VALUE_CHARS = 256  # a mismatch sample shows at most this much JSON of each value

Counts = Dict[str, Any]
CountedEvent = Tuple[EventT, List[Tuple[bytes, Counts]]]


# --- shared by the agents -------------------------------------------------------------------------


@lru_cache(maxsize=1)
def output_limit() -> int:
    """Bytes a record's key and value may have (a setting read through Faust's registry: once)."""
    return app.conf.producer_max_request_size - RECORD_OVERHEAD


def require_fits(size: int) -> None:
    """Refuse a record whose output (a record sent or a table entry) would not fit in a produce
    request: its send would fail on every retry of its batch."""
    limit = output_limit()
    if size > limit:
        raise InvalidRecord(f"its output would be {size} bytes, more than the {limit} a produce request takes")


def sendable(key: bytes, record: Any) -> bytes:
    """A message's bytes, refused with a reason when orjson cannot write it or it is too large."""
    try:
        value = message_bytes(record)
    except orjson.JSONEncodeError as error:
        raise InvalidRecord(f"not writable as JSON: {error}") from None
    require_fits(len(key) + len(value))
    return value


def stats_key(kind: str, partition: int) -> bytes:
    return f"{kind}:{partition}".encode()


def counted(kind: str, event: EventT, **counts: Any) -> CountedEvent:
    """What one record adds to the counters of its kind and source partition."""
    return event, [(stats_key(kind, event.message.partition), counts)]


def add_counters(total: Counts, counts: Counts) -> None:
    """Sum counters and per-field counts, gather samples, keep the largest lag."""
    for name, value in counts.items():
        if name == "field_mismatches":
            fields = total.setdefault(name, {})
            for field, count in value.items():
                fields[field] = fields.get(field, 0) + count
        elif name == "samples":
            total.setdefault(name, []).extend(value)
        elif name in ("lag_ms", "at"):
            total[name] = max(total.get(name, 0.0), value)
        else:
            total[name] = total.get(name, 0) + value


def summed(total: Counts, counts: Counts) -> Counts:
    """``total`` plus ``counts``, as a new value (a table's stored value is never changed in place)."""
    result = {
        name: dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else value for name, value in total.items()
    }
    add_counters(result, counts)
    return result


def stats_after(stats: Counts, counts: Counts) -> Counts:
    """A partition's counters after a batch: sums, the batch's lag and time, the latest samples."""
    result = summed(stats, counts)
    for latest in ("lag_ms", "at"):  # the latest batch's, not the largest ever
        if latest in counts:
            result[latest] = counts[latest]
    if "samples" in result:
        result["samples"] = result["samples"][-settings.migration_samples :]
    return result


def write_counters(stream: StreamT, counted_events: Iterable[CountedEvent]) -> None:
    """Write a batch's counters once per kind and partition (app/aggregation.py)."""
    write_deltas(stream, partition_state, fold_deltas(counted_events, combine=added), apply=stats_after)


def added(total: Counts, counts: Counts) -> Counts:
    """``total`` with ``counts`` added in place: folds a batch's own counts (each made fresh for
    its record by ``counted``), never a table's stored value (``stats_after`` copies that)."""
    add_counters(total, counts)
    return total


# --- bridge ---------------------------------------------------------------------------------------


class BridgedOrder(NamedTuple):
    """A V1 event the bridge translates: the order's key, its V2 event and that event's bytes."""

    key: bytes
    order: OrderV2
    value: bytes


def decode_v1_order(event: EventT) -> BridgedOrder:
    """An ``orders.v1`` record as its V2 event. orders.v1 must be keyed by order id: the bridge's
    idempotency and the reconciliation are per order, in the partition the order's key hashes to."""
    order = translate(decode_json(event.value))
    key = order.order_id.encode("utf-8", "replace")
    value = sendable(key, order)  # refuses ids orjson cannot write (lone surrogates) first
    if event.key != key:
        raise InvalidRecord(f"record key {event.key!r} is not the order id {order.order_id!r}")
    return BridgedOrder(key, order, value)


def seen_on(state: Dict[str, Any], side: str, event_id: str, now: float) -> Dict[str, Any]:
    """An order's reconciliation state after ``event_id`` was seen on ``side``."""
    other = "v2" if side == "v1" else "v1"
    waiting = dict(state.get(other, {}))
    if event_id in waiting:
        del waiting[event_id]
        state = {**state, other: waiting, "reconciled": state.get("reconciled", 0) + 1}
    else:
        mine = dict(state.get(side, {}))
        mine.setdefault(event_id, now)
        state = {**state, side: mine}
    return state


def new_orders(stream: StreamT, batch: List[Decoded[BridgedOrder]]) -> Tuple[List[Decoded[BridgedOrder]], List[Decoded[BridgedOrder]]]:
    """The batch's V1 events not translated before (by event id), and the repeats."""
    new, repeats, in_batch = [], [], set()
    for entry in batch:
        enter_partition(stream, entry.event)
        key, event_id = entry.value.key, entry.value.order.event_id
        if (key, event_id) in in_batch or event_id in order_events[key].get("ids", []):
            repeats.append(entry)
        else:
            in_batch.add((key, event_id))
            new.append(entry)
    return new, repeats


def remember_bridged(key: bytes, event_id: str, now: float) -> None:
    """Store an event id as translated (idempotency) and as seen on V1 (reconciliation)."""
    state = seen_on(order_events[key], "v1", event_id, now)  # read now: reconcile_v2_orders writes it too
    order_events[key] = {**state, "ids": (state.get("ids", []) + [event_id])[-BRIDGE_IDS_PER_ORDER:]}


def lag_ms(event: EventT, now: float) -> float:
    timestamp = event.message.timestamp
    return round(max(0.0, now - timestamp) * 1000, 1) if timestamp else 0.0


async def bridge_batch(stream: StreamT, batch: List[Decoded[BridgedOrder]], refused: List[EventT]) -> None:
    """Send the batch's new V2 events; once Kafka has them all, store their ids. A crash or retry
    in between translates them again (the same event_id), never marks as done an unsent one."""
    counts = [counted("bridge", event, dead_lettered=1) for event in refused]
    new, repeats = new_orders(stream, batch)
    counts += [counted("bridge", entry.event, duplicates=1) for entry in repeats]
    await transport.publish(app, ((orders_v2, entry.value.key, entry.value.value) for entry in new))
    now = time.time()
    for entry in new:
        enter_partition(stream, entry.event)
        remember_bridged(entry.value.key, entry.value.order.event_id, now)
        counts.append(counted("bridge", entry.event, translated=1, lag_ms=lag_ms(entry.event, now), at=now))
    write_counters(stream, counts)


@app.agent(orders_v1)
async def translate_v1_orders(stream: StreamT) -> None:
    """Translate each V1 event to V2 once (by event id); invalid events go to orders.v1.dlq."""
    async for batch in decoded_batches(stream, decode_v1_order, max_=BATCH_MAX, within=BATCH_WITHIN):
        await until_applied(bridge_batch, stream, batch, batch.refused, what="migration bridge")


def decode_v2_order(event: EventT) -> str:
    """An ``orders.v2`` record's event id; the record must be keyed by its order id."""
    order_id, event_id = require_encodable(parse_v2_order(decode_json(event.value)))
    if event.key != order_id.encode():
        raise InvalidRecord(f"record key {event.key!r} is not the order id {order_id!r}")
    return event_id


async def reconcile_batch(stream: StreamT, batch: List[Decoded[str]]) -> None:
    now = time.time()
    for entry in batch:
        enter_partition(stream, entry.event)
        order_events[entry.event.key] = seen_on(order_events[entry.event.key], "v2", entry.value, now)


@app.agent(orders_v2)
async def reconcile_v2_orders(stream: StreamT) -> None:
    """Every V2 event clears its V1 counterpart (same order key, same partition)."""
    async for batch in decoded_batches(stream, decode_v2_order, max_=BATCH_MAX, within=BATCH_WITHIN):
        await until_applied(reconcile_batch, stream, batch, what="migration reconciliation")


# --- routing --------------------------------------------------------------------------------------

Command = Dict[str, Any]


def decode_command(event: EventT) -> Union[PhaseMarker, Command]:
    """An ``orders.commands`` record: a phase marker, or a command both systems can be sent."""
    item = parse_commands_record(decode_json(event.value))
    if isinstance(item, dict):
        require_encodable(item)  # the payload goes to both systems as it came
        require_fits(len(item["order_id"].encode()) + len(orjson.dumps(item)) + ROUTING_FIELDS_BYTES)
    return item


def routed_messages(command: Command, phase: str, percent: int, answering: str) -> List[Tuple[TopicT, bytes, bytes]]:
    """A command's copy for each system, flagged with whether that system answers it."""
    key = command["order_id"].encode()
    return [
        (
            topic,
            key,
            message_bytes(RoutedCommand(system=system, answers=system == answering, phase=phase, canary_percent=percent, **command)),
        )
        for system, topic in system_inputs.items()
    ]


class PartitionPhases:
    """The phase histories of a batch's commands partitions: as stored, plus the batch's markers
    (written to the table only after the batch's commands were sent)."""

    def __init__(self, stream: StreamT) -> None:
        self.stream = stream
        self.histories: Dict[int, List[List[Any]]] = {}
        self.markers: Dict[int, Tuple[EventT, PhaseMarker]] = {}

    def history(self, event: EventT) -> List[List[Any]]:
        partition = event.message.partition
        if partition not in self.histories:
            enter_partition(self.stream, event)
            self.histories[partition] = partition_state[stats_key("phase", partition)].get("history", [])
        return self.histories[partition]

    def add_marker(self, event: EventT, marker: PhaseMarker) -> None:
        partition, offset = event.message.partition, event.message.offset
        self.histories[partition] = with_marker(self.history(event), offset, marker, PHASE_HISTORY)
        self.markers[partition] = (event, marker)

    def write(self) -> None:
        for partition, (event, marker) in self.markers.items():
            enter_partition(self.stream, event)
            partition_state[stats_key("phase", partition)] = {
                "history": self.histories[partition],
                "change_id": marker.change_id,
                "changed_at": marker.changed_at,
            }


async def route_batch(stream: StreamT, batch: List[Decoded[Union[PhaseMarker, Command]]], refused: List[EventT]) -> None:
    """Route each command by the phase in force at its offset; a marker switches the phase of its
    partition from its own offset on."""
    counts = [counted("router", event, dead_lettered=1) for event in refused]
    phases = PartitionPhases(stream)
    messages: List[Tuple[TopicT, bytes, bytes]] = []
    for entry in batch:
        if isinstance(entry.value, PhaseMarker):
            phases.add_marker(entry.event, entry.value)
            continue
        phase, percent = phase_at(phases.history(entry.event), entry.event.message.offset)
        answering = answering_system(phase, percent, entry.value["order_id"])
        messages += routed_messages(entry.value, phase, percent, answering)
        counts.append(counted("router", entry.event, routed=1, **{f"answered_by_{answering}": 1}))
    await transport.publish(app, messages)
    phases.write()
    write_counters(stream, counts)


@app.agent(commands)
async def route_commands(stream: StreamT) -> None:
    """Send every command to both systems, flagged with the one whose answer counts."""
    async for batch in decoded_batches(stream, decode_command, max_=BATCH_MAX, within=BATCH_WITHIN):
        await until_applied(route_batch, stream, batch, batch.refused, what="migration router")


# --- comparison -----------------------------------------------------------------------------------


class Result(NamedTuple):
    """A system's result, normalised for the comparison (V2 shape, flattened)."""

    side: str
    fields: Dict[str, Any]


def decode_result(event: EventT) -> Result:
    """A ``migration.v1.results``/``migration.v2.results`` record: a JSON object keyed by request id."""
    if event.key is None:
        raise InvalidRecord("a result must be keyed by its request id")
    result = decode_json(event.value)
    if not isinstance(result, dict):
        raise InvalidRecord(f"a result must be a JSON object, got {type(result).__name__}")
    side = "v1" if event.message.topic == V1_RESULTS else "v2"
    fields = require_encodable(normalized_result(side, result))  # it waits in a table for its pair
    require_fits(len(event.key) + len(orjson.dumps(fields)) + PENDING_ENTRY_BYTES)
    return Result(side, fields)


def sample_value(value: Any) -> Any:
    """A field value as a mismatch sample shows it: at most SAMPLE_VALUE_CHARS of its JSON."""
    text = orjson.dumps(value)
    if len(text) <= SAMPLE_VALUE_CHARS:
        return value
    return f"{text[:SAMPLE_VALUE_CHARS].decode(errors='ignore')}... ({len(text)} bytes)"


def comparison_counters(key: bytes, diffs: Dict[str, Tuple[Any, Any]], now: float) -> Counts:
    """What one comparison adds to the counters: matched, or mismatched with fields and a sample."""
    if not diffs:
        return {"compared": 1, "matched": 1}
    sample = {
        "key": key.decode(errors="replace")[:SAMPLE_VALUE_CHARS],
        "at": now,
        "diff": {field[:SAMPLE_VALUE_CHARS]: {"v1": sample_value(v1), "v2": sample_value(v2)} for field, (v1, v2) in diffs.items()},
    }
    return {"compared": 1, "mismatched": 1, "field_mismatches": {field: 1 for field in diffs}, "samples": [sample]}


def waiting_result(entry: Dict[str, Any]) -> Dict[str, Any]:
    """A table entry as the comparison reads it; a result stored unnormalised (before results
    were normalised when decoded) is treated as absent: the new result waits in its place."""
    return {} if entry and not entry.get("done") and "fields" not in entry else entry


async def compare_batch(stream: StreamT, batch: List[Decoded[Result]], refused: List[EventT]) -> None:
    """Pair each result with the other system's (waiting in the table or earlier in the batch)."""
    now = time.time()
    counts = [counted("compare", event, dead_lettered=1) for event in refused]
    entries: Dict[bytes, Tuple[EventT, Dict[str, Any]]] = {}  # the batch's new table entries
    for entry in batch:
        event, result, key = entry.event, entry.value, cast(bytes, entry.event.key)
        enter_partition(stream, event)
        pending = entries[key][1] if key in entries else waiting_result(pending_results[key])
        if not pending:
            entries[key] = (event, {"side": result.side, "fields": result.fields, "at": now, "partition": event.message.partition})
        elif pending.get("done") or pending["side"] == result.side:
            counts.append(counted("compare", event, duplicates=1))  # a replayed or repeated result
        else:
            v1, v2 = (pending["fields"], result.fields) if result.side == "v2" else (result.fields, pending["fields"])
            counts.append(counted("compare", event, **comparison_counters(key, compare_fields(v1, v2, RULES), now)))
            entries[key] = (event, {"done": True, "at": now, "partition": event.message.partition})
    for key, (event, value) in entries.items():
        enter_partition(stream, event)
        pending_results[key] = value
        expiry_index.add(key, value)
    write_counters(stream, counts)


@app.agent(results)
async def compare_results_of_both_systems(stream: StreamT) -> None:
    """Pair each request's V1 and V2 results by key and compare them after normalisation."""
    async for batch in decoded_batches(stream, decode_result, max_=BATCH_MAX, within=BATCH_WITHIN):
        await until_applied(compare_batch, stream, batch, batch.refused, what="migration comparison")


def due_at(pending: Dict[str, Any]) -> float:
    """When a waiting result counts as missing on the other side (after the compare window), or
    a 'compared' marker is dropped (after two)."""
    window = settings.migration_compare_window
    return pending.get("at", 0.0) + (2 * window if pending.get("done") else window)


def is_overdue(pending: Dict[str, Any], now: float) -> bool:
    return due_at(pending) < now


class ExpiryIndex:
    """When each entry of ``pending_results`` falls due, per partition, soonest first: the expiry
    looks only at what is overdue instead of decoding every waiting result each second. It is
    kept in memory by the writes of this worker and rebuilt from the table (one scan) when the
    worker's active partitions change and after each table recovery (recovery writes the table
    without this index); an entry it lists that was replaced or deleted since is skipped, since
    the table is read before anything is expired."""

    def __init__(self) -> None:
        self.assignment: Optional[Tuple[int, frozenset]] = None
        self.due: Dict[int, List[Tuple[float, bytes]]] = {}

    def add(self, key: bytes, pending: Dict[str, Any]) -> None:
        heapq.heappush(self.due.setdefault(pending["partition"], []), (due_at(pending), key))

    def forget(self) -> None:
        """Rebuild at the next look (the table was recovered)."""
        self.assignment = None

    def refresh(self) -> None:
        """Rebuild from the table if the consumer generation or the active partitions changed,
        unless a recovery is under way (it ends with ``forget``)."""
        if app.in_recovery:
            return
        assignment = (app.consumer_generation_id, frozenset(app.assignor.assigned_actives()))
        if assignment == self.assignment:
            return
        self.assignment, self.due = assignment, {}
        for key, pending in pending_results.items():
            if isinstance(pending.get("partition"), int):
                self.add(key, pending)

    def overdue_partitions(self, now: float) -> List[int]:
        self.refresh()
        return sorted(partition for partition, due in self.due.items() if due and due[0][0] < now)

    def pop_overdue(self, partition: int, now: float) -> List[Tuple[float, bytes]]:
        due = self.due.get(partition, [])
        overdue = []
        while due and due[0][0] < now:
            overdue.append(heapq.heappop(due))
        return overdue

    def restore(self, partition: int, items: List[Tuple[float, bytes]]) -> None:
        """Put back what ``pop_overdue`` gave and was not expired (its batch failed)."""
        for item in items:
            heapq.heappush(self.due.setdefault(partition, []), item)


expiry_index = ExpiryIndex()


@pending_results.on_recover
async def rebuild_expiry_index() -> None:
    expiry_index.forget()


def expire_results(partition: int, now: float) -> Counts:
    """Count results of this partition whose counterpart did not come within the window as
    missing on the other side; drop 'compared' markers older than two windows."""
    missing = {"missing_in_v1": 0, "missing_in_v2": 0}
    overdue = expiry_index.pop_overdue(partition, now)
    for done, (_, key) in enumerate(overdue):
        try:
            expire_result(key, partition, now, missing)
        except BaseException:
            expiry_index.restore(partition, overdue[done:])  # the retry of the batch looks again
            raise
    return missing


def expire_result(key: bytes, partition: int, now: float, missing: Counts) -> None:
    pending = pending_results.get(key)
    if not pending or pending.get("partition") != partition or not is_overdue(pending, now):
        return  # replaced (its new entry is listed too) or gone
    if pending.get("done"):
        del pending_results[key]
    else:
        missing["missing_in_v2" if pending["side"] == "v1" else "missing_in_v1"] += 1
        marker = {"done": True, "missing": True, "at": now, "partition": partition}
        pending_results[key] = marker
        expiry_index.add(key, marker)


@app.timer(interval=EXPIRY_INTERVAL)
async def schedule_result_expiry() -> None:
    """Tick each local partition that holds overdue results (read-only here: no event context)."""
    for partition in expiry_index.overdue_partitions(time.time()):
        await result_expiry.send(value=b"tick", partition=partition)


def tick_partition(event: EventT) -> int:
    """A tick's only content is its partition (its value is ignored)."""
    return event.message.partition


async def expire_batch(stream: StreamT, batch: List[Decoded[int]]) -> None:
    now = time.time()
    counts: List[CountedEvent] = []
    for event in {entry.value: entry.event for entry in batch}.values():  # once per partition
        enter_partition(stream, event)
        missing = expire_results(event.message.partition, now)
        if any(missing.values()):
            counts.append(counted("compare", event, **missing))
    write_counters(stream, counts)


@app.agent(result_expiry)
async def expire_unpaired_results(stream: StreamT) -> None:
    """Count overdue results of the ticks' partitions as missing on the other side."""
    async for batch in decoded_batches(stream, tick_partition, max_=BATCH_MAX, within=BATCH_WITHIN):
        await until_applied(expire_batch, stream, batch, what="migration result expiry")


# --- status and phase changes ---------------------------------------------------------------------


class PhaseChangeInFlight:
    """The phase change this worker is writing or wrote, until every commands partition has read
    its marker. The in-flight check must see the change just written, not only the markers the
    router has read, or two changes posted back to back would both pass it (cutover -> canary)."""

    def __init__(self) -> None:
        self.change_id: Optional[str] = None

    def reserve(self) -> Optional[str]:
        """A new change id, or None while another change of this worker is in flight. Called
        before the cluster is asked, so two workers changing at once see each other's."""
        if self.change_id is not None:
            return None
        self.change_id = str(uuid.uuid4())
        return self.change_id

    def release(self, change_id: str) -> None:
        if self.change_id == change_id:
            self.change_id = None

    def forget_if_read(self, unread: List[str]) -> None:
        """Forget the change once every partition has read its marker."""
        if self.change_id is not None and self.change_id not in unread:
            self.change_id = None


phase_change = PhaseChangeInFlight()


async def local_status(now: float) -> Dict[str, Any]:
    """The counters, phases and unreconciled ids of the partitions this worker owns."""
    totals: Dict[str, Dict[str, Any]] = {"bridge": {}, "compare": {}, "router": {}}
    phases, changes = {}, {}
    for key, stats in partition_state.items():
        kind, partition = (key.decode() if isinstance(key, bytes) else key).split(":", 1)
        if kind == "phase":
            history = stats.get("history", [])
            if history:
                last = history[-1]
                phases[partition] = {
                    "phase": last[1],
                    "canary_percent": last[2],
                    "changed_at": stats.get("changed_at"),
                    "change_id": stats.get("change_id"),
                }
                changes[partition] = [row[3] for row in history[-CHANGE_IDS_SHOWN:] if len(row) > 3]
            continue
        add_counters(totals.setdefault(kind, {}), stats)
    unreconciled, reconciled = await completeness.current(now)
    return {
        "totals": totals,
        "phases": phases,
        "changes": changes,
        "pending_change": phase_change.change_id,
        "unreconciled": unreconciled,
        "reconciled": reconciled,
    }


class Completeness:
    """The ids seen on one side only for longer than MIGRATION_RECONCILE_GRACE, and the count of
    reconciled events: a scan of every order's state, so one scan serves every status asked
    within COMPLETENESS_MAX_AGE seconds (a status page polled often scanned a large table
    over and over, taking the worker's loop from its agents), and the scan gives the loop back
    every COMPLETENESS_CHUNK orders."""

    def __init__(self) -> None:
        self.scanned: Optional[Tuple[Dict[str, List[str]], int]] = None
        self.scanned_at = 0.0
        self.scanning: Optional[asyncio.Future] = None

    async def current(self, now: float) -> Tuple[Dict[str, List[str]], int]:
        if self.scanned is not None and time.monotonic() - self.scanned_at < COMPLETENESS_MAX_AGE:
            return self.scanned
        if self.scanning is None:
            self.scanning = asyncio.ensure_future(self.scan(now))
        scanning = self.scanning
        try:
            return await asyncio.shield(scanning)
        finally:
            if self.scanning is scanning and scanning.done():
                self.scanning = None

    async def scan(self, now: float) -> Tuple[Dict[str, List[str]], int]:
        grace = settings.migration_reconcile_grace
        unreconciled: Dict[str, List[str]] = {"v1": [], "v2": []}
        reconciled = 0
        for count, state in enumerate(order_events.values(), 1):
            reconciled += state.get("reconciled", 0)
            for side in ("v1", "v2"):
                unreconciled[side].extend(event_id for event_id, seen in state.get(side, {}).items() if now - seen > grace)
            if not count % COMPLETENESS_CHUNK:
                await asyncio.sleep(0)
        self.scanned, self.scanned_at = (unreconciled, reconciled), time.monotonic()
        return self.scanned


completeness = Completeness()


def unread_changes(pending: Iterable[str], changes: Dict[str, List[str]]) -> List[str]:
    """The pending phase changes whose marker some commands partition has not read yet."""
    return sorted(
        {change for change in pending if len(changes) < settings.topic_partitions or any(change not in ids for ids in changes.values())}
    )


def merge_status(parts: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The cluster's status from every worker's local status."""
    compare: Dict[str, Any] = {"field_mismatches": {}, "samples": []}
    bridge: Dict[str, Any] = {}
    router: Dict[str, Any] = {}
    phases: Dict[str, Dict[str, Any]] = {}
    changes: Dict[str, List[str]] = {}
    missing_v2: List[str] = []
    extra_v2: List[str] = []
    reconciled = 0
    for part in parts:
        for total, kind in ((compare, "compare"), (bridge, "bridge"), (router, "router")):
            add_counters(total, part["totals"].get(kind, {}))
        phases.update(part["phases"])
        changes.update(part.get("changes", {}))
        missing_v2.extend(part["unreconciled"]["v1"])
        extra_v2.extend(part["unreconciled"]["v2"])
        reconciled += part["reconciled"]
    phase, percent = cluster_phase(phases)
    compared = compare.get("compared", 0)
    samples = sorted(compare["samples"], key=lambda sample: sample["at"])[-settings.migration_samples :]
    return {
        "phase": phase,
        "canary_percent": percent,
        "pending_changes": unread_changes((part["pending_change"] for part in parts if part.get("pending_change")), changes),
        "compared": compared,
        "matched": compare.get("matched", 0),
        "mismatched": compare.get("mismatched", 0),
        "missing_in_v1": compare.get("missing_in_v1", 0),
        "missing_in_v2": compare.get("missing_in_v2", 0),
        "parity": compare.get("matched", 0) / compared if compared else None,
        "field_mismatches": compare["field_mismatches"],
        "samples": samples,
        "bridge": {
            "translated": bridge.get("translated", 0),
            "dead_lettered": bridge.get("dead_lettered", 0),
            "duplicates": bridge.get("duplicates", 0),
            "lag": bridge.get("lag_ms", 0.0),
        },
        "router": {name: router.get(name, 0) for name in ("routed", "answered_by_v1", "answered_by_v2", "dead_lettered")},
        "completeness": {
            "reconciled": reconciled,
            "missing_in_v2": len(missing_v2),
            "missing_ids": sorted(missing_v2)[: settings.migration_samples],
            "unknown_in_v1": len(extra_v2),
            "unknown_ids": sorted(extra_v2)[: settings.migration_samples],
        },
        "partitions": phases,
    }


def cluster_phase(phases: Dict[str, Dict[str, Any]]) -> Tuple[str, int]:
    """The phase every commands partition is in; ``changing`` while markers are still on their way."""
    if not phases:
        return "shadow", 0
    seen = {(state["phase"], state["canary_percent"]) for state in phases.values()}
    if len(seen) == 1 and len(phases) == settings.topic_partitions:
        return seen.pop()
    if len(seen) == 1 and len(phases) < settings.topic_partitions:
        # Partitions without a marker are still in the initial phase.
        return ("changing", 0) if seen != {("shadow", 0)} else ("shadow", 0)
    return "changing", 0


@app.page("/migration/local/")
async def migration_local(view: web.View, request: web.Request) -> web.Response:
    """This worker's share of /migration/status/."""
    return view.json(await local_status(time.time()))


async def gather_status() -> Dict[str, Any]:
    """Ask every worker that owns table partitions for its share, and merge."""
    parts = [await local_status(time.time()), *(await from_other_workers("/migration/local/")).values()]
    status = merge_status(parts)
    phase_change.forget_if_read(status["pending_changes"])
    return status


@app.timer(interval=EXPIRY_INTERVAL)
async def forget_read_phase_change() -> None:
    """While this worker's phase change is in flight, look whether every partition has read it
    (the status of any worker would show it as pending to the others until then)."""
    if phase_change.change_id is None:
        return
    try:
        await gather_status()
    except Exception as error:  # noqa: BLE001 - a worker away now; the next tick asks again
        log.debug("phase change %s: status not gathered: %r", phase_change.change_id, error)


@app.page("/migration/status/")
async def migration_status(view: web.View, request: web.Request) -> web.Response:
    """Phase, comparison, bridge and completeness of the whole cluster, from any worker."""
    try:
        return view.json(await gather_status())
    except RuntimeError as error:
        raise view.ServerError(str(error)) from None


async def write_markers(marker: PhaseMarker) -> None:
    """A phase marker into every partition of orders.commands, acknowledged by Kafka."""
    value = json.dumps({"phase_marker": marker.asdict()}).encode()
    deliveries = [await commands.send(value=value, partition=partition) for partition in range(settings.topic_partitions)]
    for delivery in deliveries:
        await delivery


@app.page("/migration/phase")
class MigrationPhase(web.View):
    """GET: the current phase. POST (ADMIN_TOKEN) ``{"phase", "canary_percent"?}``: change it."""

    async def get(self, request: web.Request) -> web.Response:
        status = await gather_status()
        return self.json({"phase": status["phase"], "canary_percent": status["canary_percent"], "partitions": status["partitions"]})

    async def post(self, request: web.Request) -> web.Response:
        require_admin_token(self, request)
        try:
            body = await request.json()
        except json.JSONDecodeError:
            raise self.ValidationError("body must be JSON") from None
        if not isinstance(body, dict):
            raise self.ValidationError("body must be a JSON object")
        change_id = phase_change.reserve()
        if change_id is None:
            await gather_status()  # forgets this worker's change if every partition has read it
            change_id = phase_change.reserve()
        if change_id is None:
            return self.in_flight([phase_change.change_id])
        written = False
        try:
            status = await gather_status()
            others = [change for change in status["pending_changes"] if change != change_id]
            if others or status["phase"] == "changing":
                return self.in_flight(others)
            try:
                percent = check_phase_change(status["phase"], body.get("phase"), body.get("canary_percent"))
            except ValueError as error:
                raise self.ValidationError(str(error)) from None
            marker = PhaseMarker(phase=body["phase"], canary_percent=percent, change_id=change_id, changed_at=time.time())
            await write_markers(marker)
            written = True
        finally:
            if not written:
                phase_change.release(change_id)
        return self.json(
            {"phase": marker.phase, "canary_percent": percent, "change_id": change_id, "previous": status["phase"]}, status=202
        )

    def in_flight(self, changes: List[Optional[str]]) -> web.Response:
        return self.json({"error": "a phase change is still reaching every partition; try again", "pending_changes": changes}, status=409)


# --- Prometheus ----------------------------------------------------------------------------------


@gauge(
    "streamspine_migration_count",
    "Bridge, comparison and router counts per source partition (standby copies included: aggregate with max by partition).",
    ["kind", "partition", "count"],
)
def migration_counts() -> Dict[Tuple[str, ...], float]:
    samples: Dict[Tuple[str, ...], float] = {}
    for key, stats in partition_state.items():
        kind, partition = (key.decode() if isinstance(key, bytes) else key).split(":", 1)
        if kind == "phase":
            continue
        for name, value in stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name not in ("lag_ms", "at"):
                samples[(kind, partition, name)] = float(value)
    return samples
