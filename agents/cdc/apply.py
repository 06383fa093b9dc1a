"""CDC apply: change events -> every sink side by side -> the state tables (cdc_rows, cdc_table_stats).

<CDC_TOPIC_PREFIX>.<schema>.<table> -> apply_changes -> REPLICA_DSN, REDIS_URL, ELASTICSEARCH_URL (LSN-guarded)
                                                    -> cdc_rows (row image per key), cdc_table_stats
                                                    -> <topic>.dlq (what no sink may apply, what a sink refused)

The apply side runs on app/runtime.py: ``decode_change`` refuses (dead-letters) every record no
sink may apply, so a batch holds only changes every sink can write; each sink's write runs under the
one retry policy, and so does the batch body. ``agents.cdc.register`` sets SINKS and declares the
agent on the change topics of CDC_TABLES.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import faust
from faust.types import EventT, StreamT, TopicT

from agents.cdc.capture import BACKOFF_MAX, cdc_topic_name
from agents.cdc.sinks import apply_to_sink
from app.aggregation import enter_partition
from app.dead_letters import dead_letter
from app.runtime import decoded_batches, require_encodable, until_applied
from models.cdc import UNAVAILABLE, Change, InvalidChange, fill_unavailable, key_json, latest_per_row, parse_change
from tables.cdc import cdc_rows, cdc_table_stats

APPLY_BATCH_MAX = 2000
APPLY_BATCH_WITHIN = 0.1  # seconds take_events waits for more (a stream without a batch channel)

SINKS: List[Any] = []  # configured_sinks(settings), set by agents.cdc.register when the app is built


def change_of_record(topic: str, key: Optional[bytes], value: Optional[bytes], sinks: Sequence[Any]) -> Optional[Change]:
    """A record of a change topic -> its Change (None for a tombstone). Raises for a record no sink
    may apply: not a change event (models.cdc.parse_change), a change of a table other than the one
    its topic names, or a change some sink could not write or the state table could not store."""
    change = parse_change(key, value)
    if change is None:
        return None
    if cdc_topic_name(change.table_name) != topic:
        raise InvalidChange(f"a change of {change.table_name} on topic {topic}")
    try:  # as cdc_rows stores it (Faust writes tables with orjson), and Redis and Elasticsearch send it
        require_encodable({change.table_name: {"key": change.key, "row": change.after}})
    except ValueError as error:
        raise InvalidChange(f"row or key {error}") from None
    for sink in sinks:
        reason = sink.refusal(change)
        if reason:
            raise InvalidChange(f"{sink.name}: {reason}")
    return change


def decode_change(event: EventT) -> Optional[Change]:
    """The decode step of ``decoded_batches``: whatever it raises dead-letters the record."""
    change = change_of_record(event.message.topic, event.message.key, event.message.value, SINKS)
    if change is not None:
        change.origin = event
    return change


def row_state(stream: StreamT, change: Change) -> Optional[Dict[str, Any]]:
    """This table's entry of the row's state (last applied LSN and image), if any."""
    enter_partition(stream, change.origin)  # Faust reads a RocksDB table in the current event's partition
    return (cdc_rows.get(key_json(change.key)) or {}).get(change.table_name)


def complete_images(stream: StreamT, changes: List[Change]) -> Tuple[List[Change], List[Tuple[Change, str]]]:
    """Fill unchanged-TOAST placeholders from the row's previous image (this batch's or the state table's)."""
    images: Dict[Tuple[str, str], Optional[Dict[str, Any]]] = {}
    complete, invalid = [], []
    for change in changes:
        ident = (change.table_name, change.row_id)
        if change.after is not None and UNAVAILABLE in change.after.values():
            previous = images[ident] if ident in images else (row_state(stream, change) or {}).get("row")
            try:
                change.after = fill_unavailable(change.after, previous)
            except InvalidChange as error:
                invalid.append((change, str(error)))
                continue
        images[ident] = change.after
        complete.append(change)
    return complete, invalid


def record_rows(stream: StreamT, latest: List[Change], rejected_ids: set) -> None:
    """The last applied LSN and image of each row (one write per row per batch), under its event's partition."""
    for change in latest:
        if id(change) in rejected_ids:
            continue
        enter_partition(stream, change.origin)
        key = key_json(change.key)
        current = dict(cdc_rows.get(key) or {})
        previous = current.get(change.table_name)
        if previous is None or previous["lsn"] <= change.lsn:
            current[change.table_name] = {
                "lsn": change.lsn,
                "op": change.op,
                "ts_ms": change.ts_ms,
                "row": change.after,
                "tx_id": change.tx_id,
            }
            cdc_rows[key] = current


def record_counts(stream: StreamT, changes: List[Change], rejected_ids: set, now_ms: int) -> None:
    """Per table and partition: changes by op, the highest LSN applied, the lag of the newest change
    (summed over the batch first: one read and write of the state table per table and partition)."""
    batch: Dict[Tuple[str, int], Tuple[EventT, Dict[str, int], int, int]] = {}  # -> (an event, counts, highest LSN, newest ts_ms)
    for change in changes:
        if id(change) in rejected_ids:
            continue
        event = change.origin
        table_partition = (change.table_name, event.message.partition)
        _, counts, lsn, _ = batch.get(table_partition) or (event, {}, 0, 0)
        counts[change.op] = counts.get(change.op, 0) + 1
        batch[table_partition] = (event, counts, max(lsn, change.lsn), change.ts_ms)
    sink_names = [sink.name for sink in SINKS]
    for (table_name, partition), (event, counts, lsn, ts_ms) in batch.items():
        stats_key = f"{table_name}#{partition}".encode()
        enter_partition(stream, event)  # Faust reads and writes a RocksDB table in the current event's partition
        entry = dict(cdc_table_stats.get(stats_key) or {})
        totals = dict(entry.get("counts", {}))
        for op, count in counts.items():
            totals[op] = totals.get(op, 0) + count
        entry.update(
            table=table_name,
            partition=partition,
            counts=totals,
            lsn=max(entry.get("lsn", 0), lsn),
            sinks=sink_names,
            lag_ms=max(0, now_ms - ts_ms),
            applied_at_ms=now_ms,
        )
        cdc_table_stats[stats_key] = entry


async def apply_batch(stream: StreamT, changes: List[Change]) -> None:
    """Complete the images, keep the newest change per row, apply it to every sink side by side
    (each under the retry policy), dead-letter what a sink refused, record the rows and counts.
    Run again after a failure, it changes nothing twice (LSN guards), but may repeat a dead letter."""
    changes, incomplete = complete_images(stream, changes)
    refused: Dict[int, Tuple[Change, List[str]]] = {id(c): (c, [reason]) for c, reason in incomplete}
    latest = latest_per_row(changes)
    # The sinks are independent: applied side by side, a batch takes as long as the slowest one.
    for sink, sink_rejected in zip(SINKS, await asyncio.gather(*(apply_to_sink(sink, latest) for sink in SINKS)), strict=True):
        for change, reason in sink_rejected:
            refused.setdefault(id(change), (change, []))[1].append(f"{sink.name}: {reason}")
    for change, reasons in refused.values():
        await dead_letter("; ".join(reasons), change.origin)
    record_rows(stream, latest, set(refused))
    record_counts(stream, changes, set(refused), int(time.time() * 1000))


async def apply_change_stream(stream: StreamT) -> None:
    """The apply agent's loop: decoded batches (refused records dead-lettered), each applied until it is."""
    async for batch in decoded_batches(stream, decode_change, max_=APPLY_BATCH_MAX, within=APPLY_BATCH_WITHIN, ahead=True):
        await until_applied(apply_batch, stream, [entry.value for entry in batch], what="CDC apply", max_backoff=BACKOFF_MAX)


def declare_apply_agent(app: faust.App, change_topics: TopicT) -> None:
    """The apply agent on the change topics (one agent reads them all)."""

    async def apply_changes(stream: StreamT) -> None:
        """Each batch of change events to the replica, Redis and Elasticsearch, then to the state tables."""
        await apply_change_stream(stream)

    app.agent(change_topics, name="agents.cdc.apply_changes")(apply_changes)  # its name before the split
