"""Stateful aggregation that writes a table once per key per batch, not once per record.

A Faust table write costs a store put and a changelog record, so an agent that writes per record
runs at about a third of the rate of one that only iterates (bench/README.md). The pattern here:

    async for batch in decoded_batches(stream, decode, max_=BATCH_MAX, within=BATCH_WITHIN):
        pending = fold_deltas(((entry.event, deltas_of(entry.value)) for entry in batch), combine=...)
        await until_applied(write_deltas, stream, table, pending, apply=...)

``fold_deltas`` is pure: it folds each event's ``(key, delta)`` pairs into per-partition, per-key
deltas. ``write_deltas``
then writes every key once, inside the context of the batch's last event *of that key's
partition*, so the RocksDB store and the changelog get the partition the key belongs to (Faust
refuses a table write outside an event's context). app/runtime.py acknowledges the records only
after the loop body has returned, so offsets are committed only past records whose deltas are in
the table: a crash replays at most the uncommitted records (at-least-once), it never loses one.

A table that holds values rather than sums folds with ``combine=latest`` and is written by
``write_values``, which sets each key's last value without reading the table first.

Tables written this way must be co-partitioned with the source topic (same key bytes, same
partition count), as every Faust table must.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, Iterable, Mapping, NamedTuple, Optional, Tuple

from faust.streams import current_event
from faust.types import EventT, StreamT, TableT

BATCH_MAX = 8000  # records; a batch writes each key once, so a longer one writes less per record
BATCH_WITHIN = 0.2  # seconds take_events waits for more (a stream without a batch channel, app/runtime.py)

KeyedEvents = Iterable[Tuple[EventT, Iterable[Tuple[Hashable, Any]]]]


class PartitionDeltas(NamedTuple):
    """What one partition's records of a batch add to the table."""

    last_event: EventT
    deltas: Dict[Hashable, Any]


def fold_deltas(
    keyed_events: KeyedEvents,
    combine: Callable[[Any, Any], Any],
) -> Dict[int, PartitionDeltas]:
    """Fold each event's ``(key, delta)`` pairs into one delta per key per partition."""
    return fold_into({}, keyed_events, combine)


def fold_into(
    by_partition: Dict[int, PartitionDeltas],
    keyed_events: KeyedEvents,
    combine: Callable[[Any, Any], Any],
) -> Dict[int, PartitionDeltas]:
    """``fold_deltas`` onto deltas folded before (``by_partition`` is updated and returned)."""
    last_events: Dict[int, EventT] = {}
    for event, key_deltas in keyed_events:
        partition = event.message.partition
        entry = by_partition.get(partition)
        if entry is None:
            entry = by_partition[partition] = PartitionDeltas(event, {})
        last_events[partition] = event
        deltas = entry.deltas
        for key, delta in key_deltas:
            deltas[key] = combine(deltas[key], delta) if key in deltas else delta
    for partition, event in last_events.items():  # one tuple per partition, not one per event
        by_partition[partition] = PartitionDeltas(event, by_partition[partition].deltas)
    return by_partition


def enter_partition(stream: StreamT, event: EventT) -> None:
    """Make ``event`` the current event, so table reads and writes go to its partition (the one
    entered last is kept when it is of the same topic partition: tables look only at that).

    The agent's task has no current event of its own (a batch has many; with ``take_events`` a
    buffer filled in another task).
    Tables find the partition through the current-event context variable, which is per task; the
    stream's ``current_event`` attribute, which Faust's ``_set_current_event`` also sets, is put
    back at once. The task that fills the ``take_events`` buffer reads that attribute after a wait:
    when an agent awaited between entering a partition and the end of its batch, that task
    buffered the event set here instead of the one it had received, so one event was processed
    twice and the other never (nor acknowledged, which held back the partition's commits).
    """
    entered: Optional[EventT] = getattr(stream, "entered_event", None)
    if entered is not None and current_event() is entered and same_partition(entered, event):
        return
    previous = stream.current_event
    stream._set_current_event(event)
    stream.current_event = previous
    stream.entered_event = event  # type: ignore[attr-defined]  # the context variable holds only a weak reference


def same_partition(one: EventT, other: EventT) -> bool:
    return one.message.partition == other.message.partition and one.message.topic == other.message.topic


def write_deltas(
    stream: StreamT,
    table: TableT,
    pending: Dict[int, PartitionDeltas],
    apply: Callable[[Any, Any], Any],
) -> int:
    """Write ``table[key] = apply(table[key], delta)`` once per key; returns the number of writes."""
    writes = 0
    for entry in pending.values():
        enter_partition(stream, entry.last_event)
        for key, delta in entry.deltas.items():
            table[key] = apply(table[key], delta)
            writes += 1
    return writes


def latest(_previous: Any, value: Any) -> Any:
    """The ``combine`` of tables that hold values, not sums: a key's last value in the batch wins."""
    return value


def by_partition(latest_values: Mapping[Any, Tuple[EventT, Any]]) -> Dict[int, PartitionDeltas]:
    """``{key: (its latest event, value)}`` folded as ``fold_deltas(..., combine=latest)`` folds it."""
    return fold_deltas(((event, ((key, value),)) for key, (event, value) in latest_values.items()), combine=latest)


def write_values(stream: StreamT, table: TableT, pending: Dict[int, PartitionDeltas]) -> int:
    """Write ``table[key] = value`` once per key, without reading the table (see ``write_deltas``);
    returns the number of writes."""
    writes = 0
    for entry in pending.values():
        enter_partition(stream, entry.last_event)
        for key, value in entry.deltas.items():
            table[key] = value
            writes += 1
    return writes
