"""The Kafka consumer transport of the worker: Faust's aiokafka driver without its per-record stall.

Registered through Faust's own extension point (the ``faust.transports`` entry point in
pyproject.toml) and chosen by the URL scheme ``streamspine://`` of ``broker_consumer``; the
producer keeps Faust's stock ``kafka://`` transport. ``FAST_CONSUMER=false`` switches back to the
stock consumer.

What it changes, with the measurements behind it (bench/README.md has the profiles):

1. Faust's ``Consumer._drain_messages`` hands each record to the conductor through
   ``await self.wait_first(callback(message), self.suspend_flow.wait())``. mode's ``wait_first``
   wraps the callback and three events in tasks, waits for the first, then cancels three: four
   tasks and about three event-loop turns per record (strace: 304,191 ``epoll_wait`` calls for
   100k records). That loop is what a profile shows as "idle in epoll". Here the callback is
   awaited inline while the flow runs; during a rebalance (``suspend_flow`` set) the stock,
   interruptible path is kept.
2. The stock loop asks ``getmany(timeout=1.0)``. When the stream buffer of a partition passes its
   high-water mark Faust drops that partition from the active set, and the next ``getmany`` often
   covers only drained partitions: it blocks the full second while the buffer empties in
   milliseconds (instrumented: 11.0 s of a 13.4 s run inside ``_wait_next_records``). Here the
   wait is ``GETMANY_TIMEOUT`` (50 ms).
3. Faust builds its aiokafka consumer with ``fetch_max_wait_ms=1500`` and no setting to change it.
   A broker that does not answer a waiting fetch as soon as data arrives (the local broker, Tansu
   0.6, holds it the full wait: 381 ms median latency per hop with 1500, 3 ms with 20) then adds up
   to that wait to every record. Here it is ``CONSUMER_FETCH_WAIT_MS``: 500 ms (Kafka's default;
   a real Kafka answers early anyway), 20 ms against the local broker (app/local_broker.py), where
   polling the idle partitions that often costs CPU (bench/README.md, "Logging, fifth round").
4. Table recovery asks the broker for each changelog partition's end offset (ListOffsets). Tansu
   0.6 answers with the base offset of the last record batch + 1 (15 records in batches of 10 and
   5: 11), while its fetch responses carry the true high watermark (15). With multi-record
   changelog batches Faust then found the table's persisted offset beyond the "end" and refused to
   start (``ConsistencyError``), which is why every record used to be its own produce batch
   (``PRODUCER_MAX_BATCH_SIZE=1``, half the rate of the stateful pattern). Here each end offset is
   checked with one fetch of the last batch and the larger of the two is used: on a real Kafka
   they are equal, so the check costs one small fetch per changelog partition at recovery.

5. Faust's ``pause_partitions`` only stops handing on what is fetched: aiokafka goes on fetching
   the partition. After recovery Faust pauses every changelog partition of its active tables,
   so each fetch round carried 128 changelog partitions besides the 105 stream partitions (and
   fetched and decoded the worker's own table writes, to drop them). Here changelog partitions
   are paused and resumed in aiokafka too, in the consumer thread: an idle worker's broker went
   from 54 % to 35 % of a core, the worker from 18 % to 14 % (bench/README.md). Stream partitions
   keep Faust's own pause.

6. Batch channels: a topic an agent reads through app/runtime.py gets each partition's fetched
   records as one list in its queue (``Consumer._deliver``, ``BatchQueue``), each record tracked
   and referenced as the conductor would, and acknowledged by the agent with ``ack_all`` under one
   hold of Faust's ack lock (``Message.ack`` takes it three times per record). The conductor's
   per-record callbacks serve the other channels. Faust's own hand-off of a record (build an
   event, queue it, let the stream take, track and acknowledge it) cost more than the jobs'
   work (bench/RESULTS.md).

The producer (same URL scheme) is Faust's aiokafka producer whose buffer of unsent records stalls
the consumer only beyond ``PRODUCER_BUFFER_MAX`` records instead of Faust's fixed 100: a flush of
app/aggregation.py writes hundreds of keys at once, and with 100 the conductor stopped the stream
for every 100 changelog sends (50-76 stalls, 2.2-4.0 s of a 9-11 s run; bench/README.md). The
conductor asks that buffer's size once per record; Faust's ``size`` reads a setting through the
settings registry each time (4.6 % of a bare agent's main thread), this one reads the queue.
The buffer is also bounded in bytes (``PRODUCER_BUFFER_MB``, docs/memory.md): 20,000 changelog
records of a table whose values are a few kB held over 100 MiB while the producer lagged.

``FastSchema`` (the app's ``Schema`` setting, so every topic and channel uses it) decodes raw
``bytes`` keys/values and schemaless JSON values without Faust's serializer registry, whose
schemaless path looks up ``data["__faust"]`` and catches a ``KeyError`` for every plain JSON value
(the whole decode: 23.6 % of a bare agent's main thread, ``_maybe_namespace`` alone 8.3 %). Any
other type or serializer, and any JSON value that does carry a ``__faust`` model tag, takes
Faust's own path.

``Conductor`` (the transport's ``Conductor`` class): Faust's outer ``on_message`` takes the
``asyncio.Lock`` of its partition -> callback map for every record (``async with``); the lock is
held only while ``_update_indices`` rebuilds the map, so while it is free the map is read as is,
and Faust's locked lookup is used otherwise. The per-partition delivery itself stays Faust's
(its compiled ``ConductorHandler``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from pathlib import Path
from typing import (
    Any,
    AsyncIterator,
    Callable,
    ClassVar,
    Deque,
    Dict,
    FrozenSet,
    Iterable,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Set,
    Tuple,
    Type,
    cast,
)

import faust
from aiokafka import TopicPartition
from faust.exceptions import ValueDecodeError
from faust.transport import conductor as faust_conductor
from faust.transport.consumer import CONSUMER_FETCHING, ensure_TPset
from faust.transport.drivers import aiokafka
from faust.transport.producer import ProducerBuffer as FaustProducerBuffer
from faust.types import TP, AppT, ConsumerT, ProducerT
from faust.types.transports import ConductorT, ConsumerCallback
from faust.types.tuples import Message, ack_lock
from faust.utils import json as faust_json
from mode import Service
from mode.utils.futures import notify

from app import memory
from app.gauges import register_value

log = logging.getLogger(__name__)

GETMANY_TIMEOUT = 0.05
SEEK_PARK_TIMEOUT = 10.0  # seconds perform_seek waits for the drain loop to stop delivering
PRODUCER_BUFFER_MAX = 20_000  # unsent records before the conductor waits (Faust: 100)
END_OFFSET_CHECK_TIMEOUT = 10.0  # seconds for the fetch that checks the changelog end offsets


class ConsumerThread(aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread, with the fetch wait of CONSUMER_FETCH_WAIT_MS."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        from app import settings  # the app is loaded before Faust builds its transport

        consumer = super()._create_worker_consumer(transport)
        # aiokafka reads this when its fetcher starts (AIOKafkaConsumer.start), after this returns.
        consumer._fetch_max_wait_ms = settings.consumer_fetch_wait_ms
        return consumer

    not_fetching: FrozenSet[TP] = frozenset()  # paused in aiokafka by set_fetching

    def set_fetching(self, tps: Set[TP], fetch: bool) -> None:
        """Resume (``fetch``) or pause fetching ``tps`` in aiokafka, in the consumer thread and in
        the order of the calls; partitions not assigned (any more) are left alone."""
        consumer, loop = self._consumer, self.thread_loop
        if consumer is None or not tps or loop.is_closed():
            return
        self.not_fetching = (self.not_fetching - tps) if fetch else (self.not_fetching | tps)
        partitions = [TopicPartition(tp.topic, tp.partition) for tp in tps]

        def apply() -> None:
            assigned = consumer.assignment()
            mine = [tp for tp in partitions if tp in assigned]
            (consumer.resume if fetch else consumer.pause)(*mine)

        loop.call_soon_threadsafe(apply)

    def verify_event_path(self, now: float, tp: TP) -> None:
        """Faust's check that aiokafka fetches every assigned partition (it logs an error for each
        one not fetched for a while), except the partitions paused here on purpose: an idle
        worker logged one error per paused changelog partition at every check."""
        if tp not in self.not_fetching:
            super().verify_event_path(now, tp)

    async def seek_to_committed(self) -> Mapping[TP, int]:
        """aiokafka's seek to the committed offsets, which moves only the partitions committed past
        offset 0: one with no committed offset (or 0) stays at its fetch position. The Consumer's
        drain loop drops what was fetched before a seek, because the seek fetches it again; for such
        a partition nothing did, and a new member that fetched a whole partition of records nobody had
        committed before the seek of its first assignment never delivered them (the CDC takeover
        test: three partitions of a topic never applied). Those partitions go back too: to offset 0,
        or where the reset policy starts a partition (``consumer_auto_offset_reset``)."""
        committed = await super().seek_to_committed()
        unmoved = {tp: offset for tp, offset in committed.items() if not offset}
        if unmoved:
            await self.call_thread(self._seek_unmoved, unmoved)
        return committed

    async def _seek_unmoved(self, unmoved: Mapping[Any, Optional[int]]) -> None:
        consumer = self._ensure_consumer()
        for tp, offset in unmoved.items():
            if offset == 0:
                consumer.seek(tp, 0)
        fresh = [tp for tp, offset in unmoved.items() if offset is None]
        if fresh and self.app.conf.consumer_auto_offset_reset == "latest":
            await consumer.seek_to_end(*fresh)
        elif fresh:
            await consumer.seek_to_beginning(*fresh)

    async def _highwaters(self, partitions: List[TP]) -> Mapping[TP, int]:
        ends = dict(await super()._highwaters(partitions))
        if self.consumer.in_transaction or not any(ends.values()):
            return ends  # last stable offsets come from fetch responses; empty partitions need no check
        return await fetched_end_offsets(self._create_client_consumer(cast(Any, self.transport)), ends)


async def fetched_end_offsets(consumer: Any, ends: Dict[TP, int]) -> Dict[TP, int]:
    """The end offsets ``ends`` (from ListOffsets), each raised to the high watermark that a fetch
    of the partition's last batch reports; ``consumer`` is a group-less aiokafka consumer, not yet
    started, stopped here. A partition the fetch does not answer keeps its ListOffsets value."""
    probe = [tp for tp, end in ends.items() if end]  # an empty partition has nothing to check
    if not probe:
        return ends
    await consumer.start()
    try:
        consumer.assign(probe)
        for tp in probe:
            consumer.seek(tp, ends[tp] - 1)  # the last batch starts at or before this offset
        loop = asyncio.get_running_loop()
        deadline = loop.time() + END_OFFSET_CHECK_TIMEOUT
        waiting = set(probe)
        while waiting and loop.time() < deadline:
            await consumer.getmany(*waiting, timeout_ms=200)
            for tp in list(waiting):
                highwater = consumer.highwater(tp)
                if highwater is not None:
                    ends[tp] = max(ends[tp], highwater)
                    waiting.discard(tp)
    finally:
        await consumer.stop()
    return ends


class Consumer(aiokafka.Consumer):
    """aiokafka consumer whose drain loop awaits each record inline and polls in short waits."""

    getmany_timeout: ClassVar[float] = GETMANY_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Seek fence (see perform_seek): bumped when a seek starts and when it ends.
        self._seek_epoch = 0
        self._seeking = 0
        self._seek_done = asyncio.Event()
        self._seek_done.set()
        self._drain_parked = asyncio.Event()
        self._drain_task: Any = None
        super().__init__(*args, **kwargs)

    @Service.task
    async def _profile_memory(self) -> None:
        """The opt-in heap profiler (app/memory.py, MEMORY_PROFILE); returns at once when it is off."""
        register_buffer_gauges(self)
        await memory.profile_memory(Path(self.app.conf.datadir))

    async def perform_seek(self) -> None:
        """Faust's seek of every partition to its committed offset, fenced off from the drain loop.

        After a rebalance Faust's Recovery resumes the flow and the stream partitions *before* this
        seek (``_restart_recovery`` -> ``on_recovery_completed``), and calls
        ``app.flow_control.resume()`` after it, which empties every stream queue. So records fetched
        from the committed offset C are delivered (read offset -> X) while the seek runs, the seek
        sets the read offset back to C, the queues are cleared, and the drain loop then delivers the
        rest of the batch it fetched *before* the seek (offset X+1 > C + 1): Faust records a gap
        [C+1, X] and moves the read offset to X+1, so the records C+1..X that aiokafka fetches again
        after the seek are dropped as "already delivered" although the cleared queues never
        processed them. The gap is then folded into the acked offsets (``_new_offset``) and
        committed: those records are lost. The same offsets also sit twice in the acked list
        (processed once, plus the gap), and ``consecutive_numbers`` then yields runs of two, so the
        committed offset of the partition advances one record per commit (2.8 s): the partition
        looks stalled and the next rebalance replays it from there (faust-streaming #221, #629).

        Here the drain loop parks (delivers nothing, has no fetch in flight) for the whole seek, and
        drops what is left of any batch fetched before the seek: the seek repositions those
        partitions, so aiokafka fetches those records again from the committed offset."""
        self._seek_epoch += 1
        self._seeking += 1
        self._seek_done.clear()
        try:
            drain_task = self._drain_task
            if drain_task is not None and not drain_task.done() and drain_task is not asyncio.current_task():
                try:
                    await asyncio.wait_for(self._drain_parked.wait(), timeout=SEEK_PARK_TIMEOUT)
                except asyncio.TimeoutError:
                    self.log.warning("Seeking while the drain loop still delivers (not parked in %ss)", SEEK_PARK_TIMEOUT)
            await super().perform_seek()
        finally:
            self._seeking -= 1
            self._seek_epoch += 1
            if not self._seeking:
                self._seek_done.set()

    def pause_partitions(self, tps: Iterable[TP]) -> None:
        """Faust's pause, which only drops what is fetched from ``tps``; changelog partitions are
        also paused in aiokafka, so a recovered table's changelog is not fetched every round."""
        tpset = ensure_TPset(tps)
        super().pause_partitions(tpset)
        cast(ConsumerThread, self._thread).set_fetching({tp for tp in tpset if self._is_changelog_tp(tp)}, fetch=False)

    def resume_partitions(self, tps: Iterable[TP]) -> None:
        tpset = ensure_TPset(tps)
        super().resume_partitions(tpset)
        cast(ConsumerThread, self._thread).set_fetching({tp for tp in tpset if self._is_changelog_tp(tp)}, fetch=True)

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def fetched_batches(self, timeout: float) -> AsyncIterator[Tuple[TP, List[Message]]]:
        """Faust's ``getmany``, but the records come partition by partition, a list of each
        partition's fetched records at once, and a partition's high watermark is handed to the
        monitor once per fetched batch, not once per record (the same value)."""
        records, active_partitions = await self._wait_next_records(timeout)
        generation_id = self.app.consumer_generation_id
        if records is None or self.should_stop:
            return
        if not self.flow_active:
            self.log.dev("getmany called while flow not active. Seek back to committed offsets.")
            try:
                await self.perform_seek()
            except Exception as ex:
                self.log.warning(f"exception performing seek when flow not active {ex}")
            return
        app, to_message, buffered = self.app, self._to_message, self._buffered_partitions
        track_end_offset = app.monitor.track_tp_end_offset
        for tp, tp_records in records.items():
            if not self.flow_active:
                break
            if app.consumer_generation_id != generation_id:
                self.log.dev("Generation id changed from %r to %r. Cancelling getmany.", generation_id, app.consumer_generation_id)
                break
            if tp_records and (active_partitions is None or tp in active_partitions or tp in buffered):
                track_end_offset(tp, self.highwater(tp))
                yield tp, [to_message(tp, record) for record in tp_records]

    async def _drain_messages(self, fetcher: Any) -> None:  # Faust's loop, but for the changes above
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        self._drain_task = asyncio.current_task()
        self._drain_parked.clear()
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                if self._seeking:  # perform_seek: deliver nothing and fetch nothing until it is done
                    self._drain_parked.set()
                    await self._seek_done.wait()
                    self._drain_parked.clear()
                    continue
                epoch = self._seek_epoch
                set_flag(CONSUMER_FETCHING)
                fetched = cast(AsyncIterator, self.fetched_batches(timeout=self.getmany_timeout))
                await self.sleep(0)
                if self.should_stop:
                    continue
                async for tp, messages in fetched:
                    if self._seek_epoch != epoch or not await self._deliver(tp, messages, epoch):
                        break  # fetched before a seek, which repositions the partition: fetched again
                if hasattr(fetched, "aclose"):
                    await fetched.aclose()
                unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            self._drain_parked.set()  # a seek never waits for a loop that has ended
            unset_flag(CONSUMER_FETCHING)

    def track_all(self, messages: Iterable[Message]) -> None:
        """``track_message`` of each message not tracked yet: a rebalance waits for it to be
        acknowledged, and the sensors count it in."""
        on_message_in, track = self.app.sensors.on_message_in, self._unacked_messages.add
        for message in messages:
            if not message.tracked:
                message.tracked = True
                track(message)
                on_message_in(message.tp, message.offset, message)

    def forget(self, messages: Iterable[Message]) -> None:
        """Records handed to a batch channel and dropped there unprocessed (a rebalance emptied its
        queue, or they were fetched before it): a rebalance no longer waits for them to be
        acknowledged (Faust's stream leaves that to the garbage collector, which a reference left
        anywhere defeats); they are read again from the committed offset."""
        discard = self._unacked_messages.discard
        for message in messages:
            discard(message)

    def ack_all(self, messages: Iterable[Message]) -> None:
        """``Message.ack`` of each message (one reference dropped; the last one acknowledges the
        message to this consumer, as ``Consumer.ack`` does), under one hold of Faust's ack lock
        rather than three per message, and the sensors' ``on_message_out`` for each acknowledged."""
        acks_enabled_for, committed_offsets = self.app.topics.acks_enabled_for, self._committed_offset
        acked_index, acked, unacked = self._acked_index, self._acked, self._unacked_messages
        done: List[Message] = []
        with ack_lock:
            for message in messages:
                if message.acked:
                    continue
                refcount = message.refcount = max(message.refcount - 1, 0)
                if refcount:
                    continue
                message.acked = True
                tp, offset = message.tp, message.offset
                if not acks_enabled_for(message.topic):
                    continue
                committed = committed_offsets[tp]
                index = acked_index[tp]
                if (committed is None or offset >= committed) and offset not in index:
                    unacked.discard(message)
                    index.add(offset)
                    acked[tp].append(offset)
                    self._n_acked += 1
                    done.append(message)
            notify(self._waiting_for_ack)
        on_message_out = self.app.sensors.on_message_out
        for message in done:
            on_message_out(message.tp, message.offset, message)

    async def _deliver(self, tp: TP, messages: List[Message], epoch: int) -> bool:
        """Hand one partition's fetched records on: to its batch channels in one list, and record
        by record to the conductor's per-record channels. False if a seek began meanwhile (the
        read offset is then the seek's)."""
        fresh = await self._fresh(tp, messages)
        if not fresh:
            return True
        if self._commit_every is not None and self._n_acked >= self._commit_every:
            self._n_acked = 0
            await self.commit()
        queues = cast(Conductor, self.app.topics).batch_queues.get(tp) if isinstance(self.app.topics, Conductor) else None
        if queues:
            hand_on = deliver_batch(self, fresh, queues)
            if self.suspend_flow.is_set():
                await self.wait_first(hand_on, self.suspend_flow.wait())
            else:
                await hand_on
            if self._seek_epoch != epoch:
                return False
            if tp not in cast(Conductor, self.app.topics).per_record_tps:
                self._read_offset[tp] = fresh[-1].offset
                return True
        return await self._deliver_each(tp, fresh, epoch)

    async def _fresh(self, tp: TP, messages: List[Message]) -> List[Message]:
        """``messages`` without the ones delivered before a seek; offsets skipped between the
        read offset and them (compaction, transaction markers) are recorded as gaps, as Faust does."""
        read_offset = self._read_offset[tp]
        if read_offset is not None and messages[0].offset < read_offset:
            messages = [message for message in messages if message.offset >= read_offset]
        if not read_offset or not messages or not self.app.topics.acks_enabled_for(tp.topic):
            return messages
        previous = read_offset
        for message in messages:
            if message.offset - previous > 1:  # the offsets between (Faust's call includes the record's own)
                await self._add_gap(tp, previous + 1, message.offset - 1)
            previous = message.offset
        return messages

    async def _deliver_each(self, tp: TP, messages: List[Message], epoch: int) -> bool:
        """Faust's hand-off of each record to the conductor: awaited inline while the flow runs,
        through the stock interruptible ``wait_first`` during a rebalance."""
        callback, flow_is_suspended = self.callback, self.suspend_flow.is_set
        for index, message in enumerate(messages):
            if index and not index % YIELD_EVERY:
                await asyncio.sleep(0)
            if flow_is_suspended():
                await self.wait_first(callback(message), self.suspend_flow.wait())
            else:
                await callback(message)
            if self._seek_epoch != epoch:
                return False  # a seek began during the hand-off: keep the read offset it sets
            self._read_offset[tp] = message.offset
        return True


YIELD_EVERY = 100  # records handed on between two turns of the event loop


async def deliver_batch(consumer: Consumer, messages: List[Message], queues: Tuple["BatchQueue", ...]) -> None:
    """Put one partition's fetched records in each batch channel's queue, each message referenced
    once per channel and tracked as unacknowledged (``wait_empty`` waits for it on a rebalance)."""
    app = consumer.app
    await app.flow_control.acquire()
    await app.producer.buffer.wait_until_ebb()
    count = len(queues)
    with ack_lock:
        for message in messages:
            message.refcount += count
    consumer.track_all(messages)
    for queue in queues:
        queue.put(messages)


class BatchQueue:
    """The queue of a batch channel (app/runtime.py's ``batch_channel``): lists of one partition's
    records, in fetch order. Like Faust's stream queue it never makes the consumer wait: past
    ``max_records`` it stops fetching the partitions it holds (``pause``, Faust's
    ``on_buffer_full``) until the agent has taken it down to 40 % (``resume``), so an agent that
    cannot keep up (its sink away) holds up its own partitions only. Managed by Faust's flow
    control like a stream's queue: emptied on a rebalance."""

    def __init__(
        self,
        flow_control: Any,
        max_records: int,
        on_drop: Callable[[List[Message]], None] = lambda _: None,
        pause: Callable[[TP], None] = lambda _: None,
        resume: Callable[[TP], None] = lambda _: None,
    ) -> None:
        self.batches: Deque[List[Message]] = deque()
        self.records = 0
        self.max_records = max_records
        self.on_drop = on_drop  # given each list ``clear`` drops
        self.pause, self.resume = pause, resume
        self.paused: Set[TP] = set()
        self.readable = asyncio.Event()
        flow_control.manage_queue(self)

    def qsize(self) -> int:
        """Records waiting (the buffer gauge of /metrics)."""
        return self.records

    def clear(self) -> None:
        for messages in self.batches:
            self.on_drop(messages)
        self.batches.clear()
        self.records = 0
        self.readable.clear()
        self.resume_all()

    def put(self, messages: List[Message]) -> None:
        self.batches.append(messages)
        self.records += len(messages)
        self.readable.set()
        if self.records >= self.max_records:
            first = messages[0]  # its ``tp`` is aiokafka's TopicPartition; Faust's sets of partitions hold only TP
            tp = TP(first.topic, first.partition)
            if tp not in self.paused:
                self.paused.add(tp)
                self.pause(tp)

    async def get(self, max_records: int) -> List[Message]:
        """The records waiting, at least one, at most ``max_records``; they are the caller's
        (the lists put are not changed)."""
        while not self.batches:
            self.readable.clear()
            await self.readable.wait()
        batches = self.batches
        taken = batches.popleft()
        if len(taken) > max_records:
            batches.appendleft(taken[max_records:])
            taken = taken[:max_records]
        elif batches and len(taken) + len(batches[0]) <= max_records:
            taken = list(taken)
            while batches and len(taken) + len(batches[0]) <= max_records:
                taken += batches.popleft()
        self.records -= len(taken)
        if not batches:
            self.readable.clear()
        if self.paused and self.records <= self.max_records * RESUME_RATIO:
            self.resume_all()
        return taken

    def resume_all(self) -> None:
        paused, self.paused = self.paused, set()
        for tp in paused:
            self.resume(tp)


RESUME_RATIO = 0.4  # a paused queue's partitions are fetched again below this share (Faust's too)


def register_buffer_gauges(consumer: "Consumer") -> None:
    """The sizes of the worker's record buffers (on /metrics and in the heap reports)."""
    app = consumer.app
    register_value(
        "streamspine_consumer_unacked_messages", "Records read and not yet acknowledged.", lambda: len(consumer._unacked_messages)
    )
    register_value(
        "streamspine_consumer_acked_offsets",
        "Acknowledged offsets waiting for the ones before them.",
        lambda: sum(len(offsets) for offsets in consumer._acked.values()),
    )
    register_value(
        "streamspine_stream_buffered_events",
        "Events buffered for the agents' streams.",
        lambda: sum(queue.qsize() for queue in list(app.flow_control._queues)),
    )
    register_value("streamspine_producer_buffer_records", "Records waiting in the producer buffer.", lambda: app.producer.buffer.size)
    register_value(
        "streamspine_producer_buffer_bytes", "Bytes waiting in the producer buffer.", lambda: getattr(app.producer.buffer, "bytes", -1)
    )


MaybeBytes = Optional[bytes]  # a record's key or value (ProducerBuffer's ``bytes`` counter shadows the type there)


class ChangelogRecords:
    """A changelog partition's records queued in one turn of the event loop (dropped once they are
    in aiokafka's batches), their bytes, and what to call with the offset of the last one once
    Kafka has them all."""

    def __init__(self, on_delivered: Callable[[TP, int], None]) -> None:
        self.records: List[Tuple[MaybeBytes, MaybeBytes]] = []
        self.count = 0
        self.size = 0
        self.on_delivered = on_delivered


class ChangelogTurn(NamedTuple):
    """Settled when a turn's batches are in aiokafka, and when its offsets were recorded."""

    enqueued: asyncio.Future
    delivered: asyncio.Future


class ProducerBuffer(FaustProducerBuffer):
    """Faust's buffer of records waiting to be sent, with a size that costs no settings lookup and
    a bound in bytes as well as in records: the stream waits while the buffer holds more than
    ``max_messages`` records or ``max_bytes`` of keys and values (PRODUCER_BUFFER_MB), until it is
    back under both. Faust's own wait gives up after 0.1 s without a send (a broker that takes
    nothing let the buffer grow by a record per 0.1 s); this one waits for the sends.

    Table writes (app/stores.py's ``Table``) come here through ``send_changelog``: each changelog
    partition's records of one turn of the event loop (a batch body writes its keys without
    awaiting) go to aiokafka as one record batch, in the order written, instead of a
    ``FutureMessage``, a queue entry and an aiokafka ``send`` each (about half of a table write's
    cost). They count in the bounds until Kafka has them, and ``flush`` (before every commit)
    waits for them and raises if a batch failed, so no offset is committed past an unsent write."""

    max_messages = PRODUCER_BUFFER_MAX
    max_bytes = 32 * 1024 * 1024  # set from PRODUCER_BUFFER_MB by the Producer
    threaded = False  # the producer_threaded setting, read once
    bytes = 0  # keys and values of the records in ``pending`` and of the changelog batches

    def __post_init__(self) -> None:
        super().__post_init__()
        self.changelog: Dict[TP, ChangelogRecords] = {}  # queued in this turn of the event loop
        self.changelog_records = 0  # queued or on their way
        self.changelog_tasks: Set[asyncio.Future] = set()
        self.last_turn: Optional[ChangelogTurn] = None
        self.changelog_failure: Optional[BaseException] = None

    @property
    def size(self) -> int:
        if self.threaded:  # Faust's own accounting of the producer thread's queue
            return super().size
        return self.pending.qsize() + self.changelog_records

    def send_changelog(self, tp: TP, key: MaybeBytes, value: MaybeBytes, on_delivered: Callable[[TP, int], None]) -> None:
        """Queue a changelog record; sent with the others of this turn of the event loop."""
        if not self.changelog:
            asyncio.get_running_loop().call_soon(self._send_changelog_batches)
        queued = self.changelog.get(tp)
        if queued is None:
            queued = self.changelog[tp] = ChangelogRecords(on_delivered)
        if type(value) is bytes and value:
            value = bytes(memoryview(value))  # only its own bytes (see ``trimmed``)
        size = len(key or b"") + len(value or b"")
        queued.records.append((key, value))
        queued.count += 1
        queued.size += size
        self.changelog_records += 1
        self.bytes += size

    def _send_changelog_batches(self) -> None:
        if not self.changelog:
            return  # sent by a flush in the meantime
        queued, self.changelog = self.changelog, {}
        loop = asyncio.get_running_loop()
        previous, self.last_turn = self.last_turn, ChangelogTurn(loop.create_future(), loop.create_future())
        task = asyncio.ensure_future(self._deliver_changelog(queued, previous, self.last_turn))
        self.changelog_tasks.add(task)
        task.add_done_callback(self._changelog_sent)

    async def _deliver_changelog(self, queued: Dict[TP, ChangelogRecords], previous: Optional[ChangelogTurn], turn: ChangelogTurn) -> None:
        """Hand this turn's batches to aiokafka after the previous turn's (each partition's writes
        stay in order), wait for Kafka, and record the offsets after the previous turn recorded
        its own. After a failure nothing more is sent or recorded."""
        try:
            if self.changelog_failure is not None:
                raise self.changelog_failure
            if previous is not None:
                await asyncio.shield(previous.enqueued)
            producer = cast(Any, self.app).producer._ensure_producer()
            sent = await send_in_batches(producer, {tp: changes.records for tp, changes in queued.items()})
            deliveries = [(tp, queued[tp], count, delivery) for tp, batches in sent.items() for count, delivery in batches]
            for changes in queued.values():
                changes.records.clear()  # copied into the batches
            turn.enqueued.set_result(None)
            count_sent(self.app, {tp: changes.count for tp, changes in queued.items()})
            delivered = [(tp, changes, count, await delivery) for tp, changes, count, delivery in deliveries]
            if previous is not None:
                await asyncio.shield(previous.delivered)
            for tp, changes, count, metadata in delivered:
                changes.on_delivered(tp, metadata.offset + count - 1)
            turn.delivered.set_result(None)
        except BaseException as error:
            self._fail(turn, error)
            raise
        finally:
            for changes in queued.values():
                self.changelog_records -= changes.count
                self.bytes -= changes.size
            self.message_sent.set()

    def _fail(self, turn: ChangelogTurn, error: BaseException) -> None:
        """Remember the first failure (every flush raises it from now on) and fail the turn."""
        if isinstance(error, asyncio.CancelledError):
            error = RuntimeError("a changelog batch was cancelled before Kafka had it")
        if self.changelog_failure is None:
            self.changelog_failure = error
            log.error("A changelog batch was not sent: no offset is committed from now on", exc_info=error)
        for step in turn:
            if not step.done():
                step.set_exception(error)
                step.exception()  # retrieved: the next turn raises it again

    def _changelog_sent(self, task: asyncio.Future) -> None:
        self.changelog_tasks.discard(task)
        if not task.cancelled():
            task.exception()  # recorded by ``_fail``

    async def flush(self) -> None:
        """Every changelog batch queued so far, delivered, then Faust's records; raises if a batch
        failed (before a commit: the offsets of records whose writes were lost are never committed)."""
        self._send_changelog_batches()
        sending = [task for task in self.changelog_tasks if not task.done()]
        if sending:
            await asyncio.wait(sending)
        if self.threaded:
            await super().flush()
        else:
            await self.flush_pending()
        if self.changelog_failure is not None:
            raise self.changelog_failure

    async def flush_pending(self) -> None:
        """Faust's flush of its own records (``size`` counts the changelog's too, and under steady
        writes never reaches 0: Faust's loop on it would hold the commit)."""
        while self.pending.qsize():
            self.message_sent.clear()
            try:
                await asyncio.wait_for(self.message_sent.wait(), timeout=0.1)
            except asyncio.TimeoutError:
                return  # Faust's flush gives up after 0.1 s without a send, too

    def over_bounds(self) -> bool:
        return self.size > self.max_messages or self.bytes > self.max_bytes

    def put(self, fut: Any) -> None:
        if not self.threaded:
            fut.message = trimmed(fut.message)
            self.bytes += record_bytes(fut.message)
        super().put(fut)

    async def _send_pending(self, fut: Any) -> None:
        try:
            await super()._send_pending(fut)
        finally:
            if not self.threaded:
                self.bytes -= record_bytes(fut.message)

    async def wait_until_ebb(self) -> None:
        """Wait while the buffer is over a bound (the conductor calls this before each record)."""
        if self.threaded:
            return await super().wait_until_ebb()
        while self.over_bounds() and not self.should_stop:
            self.message_sent.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.message_sent.wait(), timeout=1.0)


def count_sent(app: Any, counts: Mapping[TP, int]) -> None:
    """Count records handed on in batches as Faust's monitor counts each record sent (its
    ``on_send_initiated``): the ``streamspine_records_produced`` metric includes them."""
    monitor = getattr(app, "monitor", None)
    if monitor is None:
        return
    for tp, count in counts.items():
        monitor.messages_sent += count
        monitor.messages_sent_by_topic[tp.topic] += count


async def send_in_batches(producer: Any, by_partition: Mapping[TP, List[Tuple[MaybeBytes, MaybeBytes]]]) -> Dict[TP, List[Tuple[int, Any]]]:
    """Hand each partition's records to aiokafka as record batches, in order: (records, delivery)
    of each batch (the delivery's offset is its first record's). The partitions go side by side:
    aiokafka takes a partition's next batch only once the one before was drained (sent)."""

    async def send(tp: TP, records: List[Tuple[MaybeBytes, MaybeBytes]]) -> List[Tuple[int, Any]]:
        return [
            (count, await producer.send_batch(builder, tp.topic, partition=tp.partition))
            for builder, count in record_batches(producer, records)
        ]

    sent = await asyncio.gather(*(send(tp, records) for tp, records in by_partition.items()))
    return dict(zip(by_partition, sent, strict=True))


async def publish(app: AppT, messages: Iterable[Tuple[Any, Optional[bytes], Optional[bytes]]]) -> None:
    """Send ``(topic, key, value)`` records, each to the partition of its key as Faust's
    ``Topic.send`` picks it, and wait until Kafka has every one: one record batch per partition
    instead of a ``send`` (and its futures) per record. While the app's producer is not started
    (Faust's ``test_context``) each goes through ``Topic.send``."""
    producer = getattr(app.producer, "_producer", None)
    if producer is None:
        sent = [await topic.send(key=key, value=value) for topic, key, value in messages]
        for delivery in sent:
            await delivery
        return
    grouped = await by_partition(producer, ((topic.get_topic_name(), key, value) for topic, key, value in messages))
    delivered = await send_grouped(producer, grouped)
    count_sent(app, {tp: len(records) for tp, records in grouped.items()})
    await delivered


async def by_partition(
    producer: Any, records: Iterable[Tuple[str, Optional[bytes], Optional[bytes]]]
) -> Dict[TP, List[Tuple[Optional[bytes], Optional[bytes]]]]:
    """``(topic name, key, value)`` records grouped by the partition the producer's partitioner
    picks for the key (Kafka's murmur2, as Faust's ``Topic.send`` and every client), in order."""
    grouped: Dict[TP, List[Tuple[Optional[bytes], Optional[bytes]]]] = {}
    known: Set[str] = set()
    for name, key, value in records:
        if name not in known:
            await producer.client._wait_on_metadata(name)
            known.add(name)
        grouped.setdefault(TP(name, producer._partition(name, None, None, None, key, None)), []).append((key, value))
    return grouped


async def send_grouped(producer: Any, grouped: Mapping[TP, List[Tuple[MaybeBytes, MaybeBytes]]]) -> "asyncio.Future[Any]":
    """Hand ``by_partition``'s records to the producer (``send_in_batches``); the future of all
    their deliveries (it fails if any did)."""
    sent = await send_in_batches(producer, grouped)
    return asyncio.gather(*(delivery for batches in sent.values() for _, delivery in batches))


def record_batches(producer: Any, records: List[Tuple[Optional[bytes], Optional[bytes]]]) -> Iterator[Tuple[Any, int]]:
    """aiokafka record batches holding ``records`` in order (a new one when one is full), with
    how many each holds."""
    builder, count = producer.create_batch(), 0
    for key, value in records:
        if builder.append(timestamp=None, key=key, value=value) is None:  # full (a first record always fits)
            yield builder, count
            builder, count = producer.create_batch(), 0
            builder.append(timestamp=None, key=key, value=value)
        count += 1
    if count:
        yield builder, count


def trimmed(message: Any) -> Any:
    """The pending record with a value that holds only its own bytes. orjson (3.12 on; Faust's
    JSON codec) returns ``bytes`` with at least 4 KiB allocated however short the JSON: a
    100-byte changelog value held 4 KiB while it waited here (tracemalloc: 283 MiB for 71,000
    records). The copy costs about 1 us for a few hundred bytes."""
    value = message.value
    if type(value) is bytes and value:
        return message._replace(value=bytes(memoryview(value)))
    return message


def record_bytes(message: Any) -> int:
    """Bytes of a pending record's key and value (serialized by then; anything else counts 0)."""
    return sum(len(part) for part in (message.key, message.value) if isinstance(part, (bytes, bytearray, str)))


class Producer(aiokafka.Producer):
    """Faust's aiokafka producer with the buffer above (the conductor waits only beyond
    PRODUCER_BUFFER_MAX unsent records or PRODUCER_BUFFER_MB of them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        buffer = ProducerBuffer(loop=self.loop, beacon=self.beacon)  # replaces Faust's before it starts
        buffer.app, buffer.threaded = self.app, bool(self.app.conf.producer_threaded)
        buffer.max_bytes = memory.memory_settings.producer_buffer_mb * 1024 * 1024
        if buffer.threaded:
            buffer.threaded_producer = self.threaded_producer
        self.buffer = buffer


class FastSchema(faust.Schema):
    """Faust's Schema, decoding raw bytes and schemaless JSON without the serializer registry."""

    def compile(self, app: AppT, **kwargs: Any) -> Any:
        conf = app.conf
        key_mode = plain_mode(self.key_type, self.key_serializer or conf.key_serializer)
        value_mode = plain_mode(self.value_type, self.value_serializer or conf.value_serializer)
        if key_mode != "raw" or value_mode is None:
            return super().compile(app, **kwargs)
        on_value_decode_error = kwargs.get("on_value_decode_error")
        default_propagate = kwargs.get("default_propagate", False)
        registry_loads = app.serializers.loads_value
        value_type, value_serializer = self.value_type, self.value_serializer
        Event: Any = conf.Event  # the app's event class (typed as a type alias in Faust)
        loads: Callable[[Any], Any] = faust_json.loads
        blessed_key = faust.Record._blessed_key

        async def decode(message: Message, *, propagate: bool = default_propagate) -> Any:
            value = message.value
            if value is not None and value_mode == "json":
                try:
                    value = loads(value)
                    if type(value) is dict and blessed_key in value:  # a tagged model: Faust's path
                        value = registry_loads(value_type, message.value, serializer=value_serializer)
                except ValueDecodeError as exc:
                    error = exc
                except Exception as exc:  # noqa: BLE001 - what Faust's registry wraps, too
                    error = ValueDecodeError(str(exc))
                else:
                    return Event(app, message.key, value, message.headers or {}, message)  # Event copies a non-dict into a dict
                if propagate:
                    raise error
                if on_value_decode_error is not None:
                    await on_value_decode_error(error, message)
                return None
            return Event(app, message.key, value, message.headers or {}, message)

        return decode


def plain_mode(typ: Any, serializer: Any) -> Any:
    """``"raw"`` for bytes passed through, ``"json"`` for schemaless JSON, else None (Faust's path)."""
    if serializer == "raw" and typ in (None, bytes):
        return "raw"
    if serializer == "json" and typ is None:
        return "json"
    return None


class BatchTopic(faust.Topic):
    """A topic its agents read in batches (app/runtime.py's ``decoded_batches``): each stream of it
    gets a ``BatchQueue`` when it subscribes (``Conductor.add``), before any record can reach it,
    and the consumer hands it each partition's fetched records as one list. Through Faust's stock
    consumer (FAST_CONSUMER=false) it is an ordinary topic."""


class Conductor(faust_conductor.Conductor):
    """Faust's conductor (its per-partition callbacks included: Faust's compiled
    ``ConductorHandler``), with the callback of a record's partition found without a lock, and
    batch channels: a stream of a ``BatchTopic`` gets a ``batch_queue`` and is
    subscribed like any other but gets each partition's fetched records as one list in that queue
    (``Consumer._deliver``); the per-record callbacks serve the other channels only."""

    batch_queues: Dict[TP, Tuple[BatchQueue, ...]]
    per_record_tps: Set[TP]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.batch_queues, self.per_record_tps = {}, set()
        super().__init__(*args, **kwargs)

    def add(self, topic: Any) -> None:
        """Faust's subscription of a channel; a stream of a ``BatchTopic`` gets its batch queue."""
        if isinstance(topic, BatchTopic) and topic.is_iterator and getattr(topic, "batch_queue", None) is None:
            app = self.app
            topic.batch_queue = BatchQueue(  # type: ignore[attr-defined]
                app.flow_control,
                app.conf.stream_buffer_maxsize,
                on_drop=lambda messages: cast(Consumer, app.consumer).forget(messages),
                pause=lambda tp: app.consumer.on_buffer_full(tp),
                resume=lambda tp: app.consumer.on_buffer_drop(tp),
            )
        super().add(topic)

    def remove_batch_channel(self, channel: Any) -> None:
        """Stop delivering to a batch channel whose agent stopped reading (a restarted agent reads a
        new one): its queue is emptied, its records are read again after the next rebalance."""
        channel.batch_queue.clear()
        self._topics.discard(channel)
        for channels in (*self._tp_index.values(), *self._topic_name_index.values()):
            channels.discard(channel)
        self._update_callback_map()

    def _update_callback_map(self) -> None:
        batch_queues: Dict[TP, Tuple[BatchQueue, ...]] = {}
        per_record: Dict[TP, Any] = {}
        for tp, channels in self._tp_index.items():
            queues = tuple(queue for queue in (getattr(channel, "batch_queue", None) for channel in channels) if queue is not None)
            if queues:
                batch_queues[tp] = queues
            others = {channel for channel in channels if getattr(channel, "batch_queue", None) is None}
            if others or not queues:
                per_record[tp] = others
        self.batch_queues, self.per_record_tps = batch_queues, set(per_record)
        self._tp_to_callback.update((tp, self._build_handler(tp, cast(Any, channels))) for tp, channels in per_record.items())

    def _compile_message_handler(self) -> ConsumerCallback:
        """Faust takes the partition -> callback map's lock for every record; the lock is held only
        while the map is rebuilt (across awaits), so while it is free the map can be read as is."""
        locked_lookup = super()._compile_message_handler()
        if self.app.client_only:
            return locked_lookup
        lock, callback_for = self._tp_to_callback_lock, self._tp_to_callback.__getitem__

        async def on_message(message: Message) -> None:
            if lock.locked():
                return await locked_lookup(message)
            return await callback_for(message.tp)(message)

        return on_message


class Transport(aiokafka.Transport):
    """Faust's aiokafka transport with the consumer and producer above (URL scheme ``streamspine://``)."""

    Consumer: ClassVar[Type[ConsumerT]] = Consumer
    Producer: ClassVar[Type[ProducerT]] = Producer
    Conductor: ClassVar[Type[ConductorT]] = Conductor
