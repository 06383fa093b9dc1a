"""Stateful aggregation that writes a table once per key per batch, not once per record.

A Faust table write costs a store put and a changelog record, so an agent that writes per record
runs at about a third of the rate of one that only iterates (bench/README.md). The pattern here:

    async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN):
        pending = fold_deltas(((event, deltas_of(event)) for event in events), combine=...)
        write_deltas(stream, table, pending, apply=...)

``fold_deltas`` is pure: it folds each event's ``(key, delta)`` pairs into per-partition, per-key
deltas. ``write_deltas``
then writes every key once, inside the context of the batch's last event *of that key's
partition*, so the RocksDB store and the changelog get the partition the key belongs to (Faust
refuses a table write outside an event's context). ``take_events`` acknowledges the events only
after the loop body has returned, so offsets are committed only past records whose deltas are in
the table: a crash replays at most the uncommitted records (at-least-once), it never loses one.

``DeltaBuffer`` goes further, the way Quix Streams' checkpoint does: it keeps folding across
events and writes each key once per flush, so a hot key costs one store put and one changelog
record per flush instead of one per batch. It flushes when the agent finds it ``due()``
(``FLUSH_INTERVAL``, 1 s) and, with app/transport.py's consumer, right before every offset commit:
the consumer calls it, then flushes the producer (the changelog records), then commits the offsets
of the records acknowledged before the flush. So the stream acknowledges events as it always
does, no offset is committed past a record whose delta is not in the table, and a crash replays
at most the uncommitted records (at-least-once). Without that consumer it holds each event (one
more reference on its message) until the flush that wrote its deltas, and flushes an idle stream
by a timer. No ``take_events`` is needed: events can be folded one at a time.

    buffer = DeltaBuffer(stream, table, combine=operator.add, apply=operator.add)
    async with buffer.flushing():
        async for event in stream.events():
            buffer.add(event, deltas_of(event))
            if buffer.due():
                buffer.flush()

``apply`` must be synchronous: a flush must not yield to the event loop half-way.

Tables written this way must be co-partitioned with the source topic (same key bytes, same
partition count), as every Faust table must.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, AsyncIterator, Callable, Dict, Hashable, Iterable, List, NamedTuple, Optional, Tuple

from faust.types import EventT, StreamT, TableT

BATCH_MAX = 2000
BATCH_WITHIN = 0.2  # seconds: the most a record waits before its batch is written
FLUSH_INTERVAL = 1.0  # seconds: DeltaBuffer writes each key at most once per interval

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
    by_partition: Dict[int, PartitionDeltas], keyed_events: KeyedEvents, combine: Callable[[Any, Any], Any],
) -> Dict[int, PartitionDeltas]:
    """``fold_deltas`` onto deltas folded before (``by_partition`` is updated and returned)."""
    for event, key_deltas in keyed_events:
        partition = event.message.partition
        entry = by_partition.get(partition)
        deltas = entry.deltas if entry is not None else {}
        by_partition[partition] = PartitionDeltas(event, deltas)
        for key, delta in key_deltas:
            deltas[key] = combine(deltas[key], delta) if key in deltas else delta
    return by_partition


def enter_partition(stream: StreamT, event: EventT) -> None:
    """Make ``event`` the current event, so table reads and writes go to its partition.

    ``take_events`` fills its buffer in another task, so the agent's task has no current event.
    Tables find the partition through the current-event context variable, which is per task; the
    stream's ``current_event`` attribute, which Faust's ``_set_current_event`` also sets, is put
    back at once. The task that fills the ``take_events`` buffer reads that attribute after a wait:
    when an agent awaited between entering a partition and the end of its batch, that task
    buffered the event set here instead of the one it had received, so one event was processed
    twice and the other never (nor acknowledged, which held back the partition's commits).
    """
    previous = stream.current_event
    stream._set_current_event(event)
    stream.current_event = previous


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


def hold(events: Iterable[EventT]) -> None:
    """Take one more reference on each event's message: the stream's own acknowledgement (for
    ``take_events``, when the loop body returns) no longer makes its offset committable."""
    for event in events:
        event.message.incref()


def release(stream: StreamT, events: Iterable[EventT]) -> None:
    """Drop the reference ``hold`` took; an event whose last reference this was is acknowledged
    to the consumer, so its offset may be committed."""
    consumer, on_message_out = stream.app.consumer, stream.app.sensors.on_message_out
    for event in events:
        message = event.message
        if message.ack(consumer):
            on_message_out(message.tp, message.offset, message)


class DeltaBuffer:
    """Deltas folded across events and batches, written once per key per flush (see the module
    docstring). With app/transport.py's consumer, the consumer flushes it before every offset
    commit, so the stream acknowledges events as usual; with any other consumer each event is held
    (one more reference on its message) until the flush that wrote its deltas."""

    def __init__(
        self,
        stream: StreamT,
        table: TableT,
        *,
        combine: Callable[[Any, Any], Any],
        apply: Callable[[Any, Any], Any],
        interval: float = FLUSH_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.table = table
        self.combine = combine
        self.apply = apply
        self.interval = interval
        self.clock = clock
        self.consumer = stream.app.consumer
        self.flushed_before_commit = hasattr(self.consumer, "add_before_commit")
        self.last_events: Dict[int, EventT] = {}  # partition -> its latest event
        self.deltas: Dict[int, Dict[Hashable, Any]] = {}  # partition -> key -> folded delta
        self.held: List[EventT] = []  # only without the before-commit flush
        self.since: Optional[float] = None  # when the oldest unwritten delta arrived
        self.writes = 0
        self.flushes = 0

    def add(self, event: EventT, key_deltas: Iterable[Tuple[Hashable, Any]]) -> None:
        """Fold one event's ``(key, delta)`` pairs in."""
        message = event.message
        partition = message.partition
        self.last_events[partition] = event
        deltas = self.deltas.get(partition)
        if deltas is None:
            deltas = self.deltas[partition] = {}
            if self.since is None:
                self.since = self.clock()
        combine = self.combine
        for key, delta in key_deltas:
            deltas[key] = combine(deltas[key], delta) if key in deltas else delta
        if not self.flushed_before_commit:
            hold((event,))  # the stream's own acknowledgement no longer releases it
            self.held.append(event)

    def add_all(self, keyed_events: KeyedEvents) -> None:
        """``add`` for each ``(event, [(key, delta), ...])`` pair (a ``take_events`` batch)."""
        for event, key_deltas in keyed_events:
            self.add(event, key_deltas)

    def due(self) -> bool:
        """True once the oldest unwritten delta is ``interval`` old."""
        return self.since is not None and self.clock() - self.since >= self.interval

    def flush(self) -> int:
        """Write every pending key once (then release held events); returns the writes."""
        pending = {p: PartitionDeltas(self.last_events[p], deltas) for p, deltas in self.deltas.items()}
        self.last_events, self.deltas, self.since = {}, {}, None
        writes = write_deltas(self.stream, self.table, pending, apply=self.apply)
        if self.held:
            held, self.held = self.held, []
            release(self.stream, held)
        self.writes += writes
        self.flushes += 1
        return writes

    async def flush_when_due(self) -> None:
        """Without the before-commit flush: flush an idle stream's deltas too."""
        while True:
            await asyncio.sleep(self.interval / 4)
            if self.due():
                self.flush()

    @contextlib.asynccontextmanager
    async def flushing(self) -> AsyncIterator["DeltaBuffer"]:
        """Flush before every commit (or by a timer) while the agent iterates, and at its end."""
        if self.flushed_before_commit:
            self.consumer.add_before_commit(self.flush)
            try:
                yield self
            finally:
                self.flush()  # an error here keeps the callback, so no commit passes unwritten deltas
                self.consumer.remove_before_commit(self.flush)
            return
        task = asyncio.ensure_future(self.flush_when_due())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
