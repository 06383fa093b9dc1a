"""Zero-downtime migration V1 -> V2.

orders.v1 -> translate_v1_orders -> orders.v2                     (bridge: declared mapping + upcasters)
orders.v1 + orders.v2 -> reconcile_pending                          (completeness: every V1 id reached V2)
orders.commands -> route_commands -> orders.v1.in, orders.v2.in     (phases: who answers, who gets a copy)
migration.v1.results + migration.v2.results -> compare_results      (parallel run: field-by-field diff)
Pages: /migration/status/ (any worker), /migration/local/, POST /migration/phase (ADMIN_TOKEN)
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from decimal import Decimal
from typing import Any, Dict, List, Optional, Tuple

from faust import web
from faust.types import EventT

from app import app, settings
from app.aggregation import BATCH_MAX, BATCH_WITHIN, enter_partition
from app.dead_letters import dead_letter
from app.web import require_admin_token
from models.migration import (
    CompareRules, InvalidRecord, OrderV2, PhaseMarker, RoutedCommand, answering_system, check_phase_change,
    compare_results, decode_json, parse_command, phase_at, translate,
)
from tables.migration import order_events, partition_state, pending_results

log = logging.getLogger(__name__)


def raw_topic(*names: str):
    """A topic of raw key and value bytes, created with TOPIC_PARTITIONS partitions."""
    return app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                     partitions=settings.topic_partitions, internal=True)


V1_RESULTS, V2_RESULTS = "migration.v1.results", "migration.v2.results"
orders_v1 = raw_topic("orders.v1")
orders_v2 = app.topic("orders.v2", key_type=bytes, value_type=OrderV2, key_serializer="raw",
                      partitions=settings.topic_partitions, internal=True)
commands = raw_topic("orders.commands")
system_inputs = {
    system: app.topic(f"orders.{system}.in", key_type=bytes, value_type=RoutedCommand, key_serializer="raw",
                      partitions=settings.topic_partitions, internal=True)
    for system in ("v1", "v2")
}
results = raw_topic(V1_RESULTS, V2_RESULTS)
# One tick per partition with results whose counterpart is overdue: the expiry is written under an
# event of that partition (Faust writes a table only in an event's context).
result_expiry = raw_topic("migration.result-expiry")

RULES = CompareRules(
    ignore=frozenset(name.strip() for name in settings.migration_ignore_fields.split(",") if name.strip()),
    tolerance=Decimal(str(settings.migration_tolerance)),
)
BRIDGE_IDS_PER_ORDER = 200  # V1 event ids remembered per order for idempotency
PHASE_HISTORY = 100  # phase markers remembered per commands partition
EXPIRY_INTERVAL = 1.0  # seconds between looks for results whose counterpart never came


def stats_key(kind: str, partition: int) -> bytes:
    return f"{kind}:{partition}".encode()


def bump(kind: str, partition: int, **counts: int) -> Dict[str, Any]:
    """Add to the counters of a source partition (call under an event of that partition)."""
    key = stats_key(kind, partition)
    stats = dict(partition_state[key])
    for name, count in counts.items():
        stats[name] = stats.get(name, 0) + count
    partition_state[key] = stats
    return stats


class BatchCounters:
    """Counters of a batch, per kind and source partition, written once per batch: one table
    write per partition instead of one per record."""

    def __init__(self) -> None:
        self.pending: Dict[Tuple[str, int], Tuple[EventT, Dict[str, Any]]] = {}

    def add(self, kind: str, event: EventT, **counters: Any) -> None:
        key = (kind, event.message.partition)
        _, total = self.pending.get(key, (event, {}))
        add_counters(total, counters)
        self.pending[key] = (event, total)

    def write(self, stream) -> None:
        for (kind, partition), (event, counters) in self.pending.items():
            enter_partition(stream, event)
            key = stats_key(kind, partition)
            stats = dict(partition_state[key])
            add_counters(stats, counters)
            for latest in ("lag_ms", "at"):  # the latest batch's, not the largest ever
                if latest in counters:
                    stats[latest] = counters[latest]
            if "samples" in stats:
                stats["samples"] = stats["samples"][-settings.migration_samples:]
            partition_state[key] = stats
        self.pending.clear()


# --- bridge ---------------------------------------------------------------------------------------


def order_key_of(event: EventT, order: OrderV2) -> bytes:
    """orders.v1 must be keyed by order id: the bridge's idempotency and the reconciliation are
    per order, in the partition the order's key hashes to."""
    key = order.order_id.encode()
    if event.key != key:
        raise InvalidRecord(f"record key {event.key!r} is not the order id {order.order_id!r}")
    return key


def note_seen(key: bytes, side: str, event_id: str, now: float) -> None:
    """Reconciliation: an event id seen on one side clears the same id waiting on the other."""
    order_events[key] = seen_on(order_events[key], side, event_id, now)


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


@app.agent(orders_v1)
async def translate_v1_orders(stream) -> None:
    """Translate each V1 event to V2 once (by event id); invalid events go to the DLQ.

    A batch's V2 events are sent together and acknowledged by Kafka before their ids are stored:
    a crash in between translates them again (duplicates with the same event_id), never marks as
    done an event that was not sent.
    """
    async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN):
        accepted: List[Tuple[EventT, bytes, OrderV2]] = []
        in_batch = set()
        counters = BatchCounters()
        for event in events:
            enter_partition(stream, event)
            try:
                order = translate(decode_json(event.value))
                key = order_key_of(event, order)
            except InvalidRecord as error:
                await dead_letter(str(error), event)
                counters.add("bridge", event, dead_lettered=1)
                continue
            if order.event_id in order_events[key].get("ids", []) or (key, order.event_id) in in_batch:
                counters.add("bridge", event, duplicates=1)
                continue
            in_batch.add((key, order.event_id))
            accepted.append((event, key, order))
        deliveries = [await orders_v2.send(key=key, value=order) for _, key, order in accepted]
        for delivery in deliveries:
            await delivery
        now = time.time()
        for event, key, order in accepted:
            enter_partition(stream, event)
            state = seen_on(order_events[key], "v1", order.event_id, now)
            order_events[key] = {**state, "ids": (state.get("ids", []) + [order.event_id])[-BRIDGE_IDS_PER_ORDER:]}
            lag_ms = max(0.0, now - event.message.timestamp) * 1000 if event.message.timestamp else 0.0
            counters.add("bridge", event, translated=1, lag_ms=round(lag_ms, 1), at=now)
        counters.write(stream)


@app.agent(orders_v2)
async def reconcile_v2_orders(stream) -> None:
    """Every V2 event clears its V1 counterpart (same order key, same partition)."""
    async for event in stream.events():
        if event.key is None:
            continue
        order = event.value
        note_seen(event.key, "v2", order.event_id, time.time())


# --- routing --------------------------------------------------------------------------------------


def marker_of(data: Any) -> Optional[PhaseMarker]:
    if isinstance(data, dict) and isinstance(data.get("phase_marker"), dict):
        return PhaseMarker(**data["phase_marker"])
    return None


def record_marker(partition: int, offset: int, marker: PhaseMarker) -> None:
    key = stats_key("phase", partition)
    state = partition_state[key]
    history = list(state.get("history", []))
    if not any(row[0] == offset for row in history):
        history.append([offset, marker.phase, marker.canary_percent])
        history.sort(key=lambda row: row[0])
    partition_state[key] = {"history": history[-PHASE_HISTORY:], "change_id": marker.change_id, "changed_at": marker.changed_at}


@app.agent(commands)
async def route_commands(stream) -> None:
    """Send every command to both systems, flagged with the one whose answer counts; a phase
    marker switches the phase of its partition from its offset on."""
    async for event in stream.events():
        partition, offset = event.message.partition, event.message.offset
        try:
            data = decode_json(event.value)
            marker = marker_of(data)
            if marker is not None:
                record_marker(partition, offset, marker)
                continue
            command = parse_command(data)
        except (InvalidRecord, TypeError) as error:
            await dead_letter(str(error), event)
            bump("router", partition, dead_lettered=1)
            continue
        phase, percent = phase_at(partition_state[stats_key("phase", partition)].get("history", []), offset)
        answering = answering_system(phase, percent, command["order_id"])
        key = command["order_id"].encode()
        for system, topic in system_inputs.items():
            await topic.send(key=key, value=RoutedCommand(
                system=system, answers=system == answering, phase=phase, canary_percent=percent, **command))
        bump("router", partition, routed=1, **{f"answered_by_{answering}": 1})


# --- comparison -----------------------------------------------------------------------------------


def comparison_counters(key: bytes, diffs: Dict[str, Tuple[Any, Any]], now: float) -> Dict[str, Any]:
    """What one comparison adds to the counters: matched, or mismatched with fields and a sample."""
    if not diffs:
        return {"compared": 1, "matched": 1}
    sample = {"key": key.decode(errors="replace"), "at": now,
              "diff": {field: {"v1": v1, "v2": v2} for field, (v1, v2) in diffs.items()}}
    return {"compared": 1, "mismatched": 1, "field_mismatches": {field: 1 for field in diffs}, "samples": [sample]}


def expire_results(partition: int, now: float) -> None:
    """Count results of this partition whose counterpart did not come within the window as
    missing on the other side; drop 'compared' markers older than two windows."""
    missing = {"missing_in_v1": 0, "missing_in_v2": 0}
    for key, pending in list(pending_results.items()):
        if pending.get("partition") != partition or not is_overdue(pending, now):
            continue
        if pending.get("done"):
            del pending_results[key]
        else:
            missing["missing_in_v2" if pending["side"] == "v1" else "missing_in_v1"] += 1
            pending_results[key] = {"done": True, "missing": True, "at": now, "partition": partition}
    if any(missing.values()):
        bump("compare", partition, **missing)


@app.agent(results)
async def compare_results_of_both_systems(stream) -> None:
    """Pair each request's V1 and V2 results by key and compare them after normalisation."""
    async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN):
        counters = BatchCounters()
        now = time.time()
        for event in events:
            enter_partition(stream, event)
            partition = event.message.partition
            side = "v1" if event.message.topic == V1_RESULTS else "v2"
            try:
                if event.key is None:
                    raise InvalidRecord("a result must be keyed by its request id")
                result = decode_json(event.value)
                if not isinstance(result, dict):
                    raise InvalidRecord(f"a result must be a JSON object, got {type(result).__name__}")
            except InvalidRecord as error:
                await dead_letter(str(error), event)
                counters.add("compare", event, dead_lettered=1)
                continue
            pending = pending_results[event.key]  # {} when the table has nothing for the key
            if not pending:
                pending_results[event.key] = {"side": side, "result": result, "at": now, "partition": partition}
            elif pending.get("done") or pending["side"] == side:
                counters.add("compare", event, duplicates=1)  # a replayed or repeated result
            else:
                v1, v2 = (pending["result"], result) if side == "v2" else (result, pending["result"])
                counters.add("compare", event, **comparison_counters(event.key, compare_results(v1, v2, RULES), now))
                pending_results[event.key] = {"done": True, "at": now, "partition": partition}
        counters.write(stream)


def is_overdue(pending: Dict[str, Any], now: float) -> bool:
    window = settings.migration_compare_window
    return now - pending.get("at", now) > (2 * window if pending.get("done") else window)


@app.timer(interval=EXPIRY_INTERVAL)
async def schedule_result_expiry() -> None:
    """Tick each local partition that holds overdue results (read-only here: no event context)."""
    now = time.time()
    partitions = {pending.get("partition") for pending in pending_results.values() if is_overdue(pending, now)}
    for partition in sorted(p for p in partitions if p is not None):
        await result_expiry.send(value=b"tick", partition=partition)


@app.agent(result_expiry)
async def expire_unpaired_results(stream) -> None:
    """Count overdue results of the tick's partition as missing on the other side."""
    async for event in stream.events():
        expire_results(event.message.partition, time.time())


# --- status and phase changes ---------------------------------------------------------------------


def add_counters(total: Dict[str, Any], counters: Dict[str, Any]) -> None:
    """Sum counters and per-field counts, gather samples, keep the largest lag."""
    for name, value in counters.items():
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


def local_status(now: float) -> Dict[str, Any]:
    """The counters, phases and unreconciled ids of the partitions this worker owns."""
    totals: Dict[str, Dict[str, Any]] = {"bridge": {}, "compare": {}, "router": {}}
    phases = {}
    for key, stats in partition_state.items():
        kind, partition = (key.decode() if isinstance(key, bytes) else key).split(":", 1)
        if kind == "phase":
            if stats.get("history"):
                last = stats["history"][-1]
                phases[partition] = {"phase": last[1], "canary_percent": last[2], "changed_at": stats.get("changed_at")}
            continue
        add_counters(totals.setdefault(kind, {}), stats)
    grace = settings.migration_reconcile_grace
    unreconciled = {"v1": [], "v2": []}
    reconciled = 0
    for key, state in order_events.items():
        reconciled += state.get("reconciled", 0)
        for side in ("v1", "v2"):
            unreconciled[side].extend(event_id for event_id, seen in state.get(side, {}).items() if now - seen > grace)
    return {"totals": totals, "phases": phases, "unreconciled": unreconciled, "reconciled": reconciled}


def merge_status(parts: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The cluster's status from every worker's local status."""
    compare: Dict[str, Any] = {"field_mismatches": {}, "samples": []}
    bridge: Dict[str, Any] = {}
    router: Dict[str, Any] = {}
    phases: Dict[str, Dict[str, Any]] = {}
    missing_v2: List[str] = []
    extra_v2: List[str] = []
    reconciled = 0
    for part in parts:
        for total, kind in ((compare, "compare"), (bridge, "bridge"), (router, "router")):
            add_counters(total, part["totals"].get(kind, {}))
        phases.update(part["phases"])
        missing_v2.extend(part["unreconciled"]["v1"])
        extra_v2.extend(part["unreconciled"]["v2"])
        reconciled += part["reconciled"]
    phase, percent = cluster_phase(phases)
    compared = compare.get("compared", 0)
    samples = sorted(compare["samples"], key=lambda sample: sample["at"])[-settings.migration_samples:]
    return {
        "phase": phase,
        "canary_percent": percent,
        "compared": compared,
        "matched": compare.get("matched", 0),
        "mismatched": compare.get("mismatched", 0),
        "missing_in_v1": compare.get("missing_in_v1", 0),
        "missing_in_v2": compare.get("missing_in_v2", 0),
        "parity": compare.get("matched", 0) / compared if compared else None,
        "field_mismatches": compare["field_mismatches"],
        "samples": samples,
        "bridge": {"translated": bridge.get("translated", 0), "dead_lettered": bridge.get("dead_lettered", 0),
                   "duplicates": bridge.get("duplicates", 0), "lag": bridge.get("lag_ms", 0.0)},
        "router": {name: router.get(name, 0) for name in ("routed", "answered_by_v1", "answered_by_v2", "dead_lettered")},
        "completeness": {"reconciled": reconciled, "missing_in_v2": len(missing_v2),
                         "missing_ids": sorted(missing_v2)[: settings.migration_samples],
                         "unknown_in_v1": len(extra_v2), "unknown_ids": sorted(extra_v2)[: settings.migration_samples]},
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
    return view.json(local_status(time.time()))


async def gather_status() -> Dict[str, Any]:
    """Ask every worker that owns table partitions for its share, and merge."""
    parts = [local_status(time.time())]
    me = str(app.conf.canonical_url).rstrip("/")
    for worker in app.router.tables_metadata():
        if str(worker).rstrip("/") == me:
            continue
        async with app.http_client.get(f"{str(worker).rstrip('/')}/migration/local/") as response:
            if response.status != 200:
                raise RuntimeError(f"worker {worker} answered {response.status}")
            parts.append(await response.json())
    return merge_status(parts)


@app.page("/migration/status/")
async def migration_status(view: web.View, request: web.Request) -> web.Response:
    """Phase, comparison, bridge and completeness of the whole cluster, from any worker."""
    try:
        return view.json(await gather_status())
    except RuntimeError as error:
        raise view.ServerError(str(error))


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
            raise self.ValidationError("body must be JSON")
        if not isinstance(body, dict):
            raise self.ValidationError("body must be a JSON object")
        current, _ = cluster_phase((await gather_status())["partitions"])
        if current == "changing":
            return self.json({"error": "a phase change is still reaching every partition; try again"}, status=409)
        try:
            percent = check_phase_change(current, body.get("phase"), body.get("canary_percent"))
        except ValueError as error:
            raise self.ValidationError(str(error))
        marker = PhaseMarker(phase=body["phase"], canary_percent=percent, change_id=str(uuid.uuid4()), changed_at=time.time())
        value = json.dumps({"phase_marker": marker.asdict()}).encode()
        deliveries = [await commands.send(value=value, partition=partition) for partition in range(settings.topic_partitions)]
        for delivery in deliveries:
            await delivery
        return self.json({"phase": marker.phase, "canary_percent": percent, "change_id": marker.change_id, "previous": current}, status=202)
