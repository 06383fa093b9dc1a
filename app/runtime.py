"""The processing runtime every agent shares: decode, dead-letter, batch, apply, acknowledge.

    async for batch in decoded_batches(stream, decode_order, max_=BATCH_MAX, within=BATCH_WITHIN):
        await until_applied(apply_orders, batch, what="orders")

- Batches come from a batch channel (``batch_channel``: a stream of a ``BatchTopic``, such as
  app/topics.py's ``raw_topic``): the consumer of app/transport.py puts
  each partition's fetched records into the agent's queue as one list, and a batch is what waits
  there when the agent asks, at most ``max_`` records, at once (no wait for more: under load the
  queue fills while the body runs, so batches grow with the load). None of the per-record
  hand-off, queueing and acknowledgement of Faust's stream, which cost more than the jobs' own
  work (bench/RESULTS.md). A stream that is not a topic read through that transport (``agent.test_context()``, FAST_CONSUMER=false) is read with Faust's
  ``take_events(max_, within=within)`` instead; ``within`` applies only there.
- ``decode`` runs on each record; ANY exception it raises (a RecursionError from deep nesting, a
  ValueError from a 5,000-digit integer, an OverflowError from a date) is the record's fault: the
  record goes to ``<topic>.dlq`` with the reason and the rest of the batch goes on.
- The batch body runs under ``until_applied``: the one retry policy of app/retry.py (exponential
  backoff, for as long as it takes, never on cancellation), so a batch is applied or the worker
  stops trying, never skipped. Bodies must be idempotent (offset/LSN/version guards), since a retry
  runs them again.
- A batch is acknowledged when the loop body returns (all its records, dead letters included, in
  one step: ``Consumer.ack_all``), so offsets are committed only past records that were applied or
  dead-lettered; a body that raises leaves its batch unacknowledged, to be read again.

Pipelined mode, for a sink slow enough that the next batch should be parsed while the previous one
is written (``ship_logs`` and Elasticsearch, agents/logs.py):

    order = ReleaseOrder()
    async with PipelinedWrites(IN_FLIGHT) as writes:
        async for events in held_batches(stream, max_=BATCH_MAX, within=BATCH_WITHIN):
            for part in parts_of(events):  # whole records, the unit of one write
                turn = order.next_turn()
                write = until_applied(write_part, part, what="part writes")
                await writes.start(write, then=partial(after_write, part, ready, turn), released=turn[1])
            await writes.slot_free()  # while every slot is busy, the next batch grows in the queue

- ``held_batches`` yields each batch without acknowledging it when the body returns (with
  ``take_events``, it takes one more reference on each event first): the agent releases each part
  itself, with ``release_in_order``.
- ``PipelinedWrites.start`` runs a write in the background (at most ``limit`` at once) and then
  what follows it (dead letters, then ``release_in_order``). Writes run under ``until_applied``
  like every batch body, so an error is retried; one that still escapes (or a cancelled write)
  fails the agent at its next ``start`` and fails every later part; leaving ``async with`` lets the
  writes end, or drops them on shutdown (cancellation): a part not released is read again.
- The ordered-release rule: parts are released strictly in read order, each after the part before
  and after its batch's ``ready`` future (``ship_logs``: its statistics acknowledged by Kafka).
  Faust commits up to the first offset not acknowledged but lets a gap of one offset at the head
  pass, so a part released before an earlier one could let an unwritten record be committed. A
  part never released holds every later one. ``ReleaseOrder.batch_turn`` orders the batches'
  ``ready`` futures the same way, each after the one before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from types import TracebackType
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Deque,
    Generic,
    Iterable,
    List,
    NamedTuple,
    Optional,
    Tuple,
    Type,
    TypeVar,
    cast,
)

import orjson
from faust.types import EventT, StreamT, TopicT
from faust.types.tuples import Message

from app.dead_letters import dead_letter
from app.retry import MAX_BACKOFF, apply_stats, retrying
from app.transport import BatchTopic, Conductor, Consumer

log = logging.getLogger(__name__)

T = TypeVar("T")


class Decoded(NamedTuple, Generic[T]):
    """A record that passed decoding and validation: its event and its value."""

    event: EventT
    value: T


class DecodedBatch(List[Decoded[T]]):
    """The records of a batch that passed decoding, in read order; ``refused`` holds the events
    that were dead-lettered instead (for the jobs that count them)."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: List[EventT] = []


def reason_of(error: BaseException) -> str:
    """A dead letter's reason: the exception's type and message (messages of some are empty)."""
    try:
        text = str(error)
    except Exception:  # noqa: BLE001 - str() of a hostile value may itself fail
        text = ""
    name = type(error).__name__
    return f"{name}: {text}" if text else name


def require_encodable(value: Any) -> Any:
    """``value`` if it can be written back as JSON (orjson: integers of at most 64 bits, str keys,
    nesting under 255 levels); raises ValueError otherwise. A result the worker cannot store
    or send must be refused when its record is decoded, not when the batch is written."""
    try:
        orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError) as error:
        raise ValueError(f"not writable as JSON: {error}") from None
    return value


async def decoded_batches(
    stream: StreamT,
    decode: Callable[[EventT], Optional[T]],
    *,
    max_: int,
    within: float,
    ahead: bool = False,
) -> AsyncIterator[DecodedBatch[T]]:
    """Batches of up to ``max_`` records, decoded: what the batch channel holds (see
    ``batch_channel``), or for a stream that is not a topic read by this project's transport
    (``agent.test_context()``, FAST_CONSUMER=false) what ``take_events`` gathers ``within`` seconds.

    ``decode`` returns the record's value, or None to skip it (a tombstone); any exception makes
    the record a dead letter. Every batch is yielded, even one whose records were all refused,
    so the caller sees the stream advance. A batch is acknowledged when the loop body returns.
    With ``ahead`` (a batch channel only), the next batch is decoded while the body awaits its
    sinks (``DecodingAhead``): for a body that waits on other processes most of its time.
    """
    channel = batch_channel(stream)
    if channel is None:
        async for events in stream.take_events(max_, within=within):
            yield await decoded(events, decode)
        return
    try:
        if ahead:
            decoding = DecodingAhead(stream, channel_batches(stream, channel, max_), decode)
            try:
                while True:
                    messages, batch = await decoding.next()
                    yield batch
                    acknowledge(stream, messages)
            finally:
                await decoding.close()
        else:
            async for messages, events in channel_batches(stream, channel, max_):
                yield await decoded(events, decode)
                acknowledge(stream, messages)
    finally:
        stop_reading(stream, channel)


class DecodingAhead(Generic[T]):
    """Batches decoded by a task of their own, one batch ahead of the agent, so that the CPU
    decodes the next batch while the agent's body waits on its sinks. The next batch is taken from
    the channel only once the body has begun the one before, so batches still grow with the load.
    A batch decoded before a rebalance (an older consumer generation, or the flow stopped) is
    dropped unacknowledged, as ``channel_batches`` drops one (its dead letters may be sent again
    when it is read again)."""

    def __init__(
        self, stream: StreamT, batches: AsyncIterator[Tuple[List[Message], List[EventT]]], decode: Callable[[EventT], Optional[T]]
    ) -> None:
        self.stream = stream
        self.forget = cast(Consumer, stream.app.consumer).forget
        self.ready: asyncio.Queue = asyncio.Queue(maxsize=1)
        self.held: List[Message] = []  # taken from the channel, not yet handed to the agent
        self.decoding = asyncio.ensure_future(self.decode_all(batches, decode))

    async def decode_all(self, batches: AsyncIterator[Tuple[List[Message], List[EventT]]], decode: Callable[[EventT], Optional[T]]) -> None:
        async for messages, events in batches:
            self.held = messages
            await self.ready.put((messages, await decoded(events, decode)))
            await self.ready.join()  # until the agent took it

    async def next(self) -> Tuple[List[Message], DecodedBatch[T]]:
        """The next batch that may still be applied, and its messages (to acknowledge)."""
        while True:
            taken = asyncio.ensure_future(self.ready.get())
            try:
                await asyncio.wait((taken, self.decoding), return_when=asyncio.FIRST_COMPLETED)
            finally:
                got = taken.done()
                if not got:
                    taken.cancel()  # the item, if any, stays in the queue
            if not got:
                self.decoding.result()  # raises what stopped the decoding (it never ends by itself)
                raise RuntimeError("the decoding of the next batches ended")
            messages, batch = taken.result()
            self.held = []
            self.ready.task_done()
            if still_current(self.stream, messages):
                return messages, batch
            self.forget(messages)

    async def close(self) -> None:
        """Stop decoding; what was taken and not handed out is read again after a rebalance."""
        self.decoding.cancel()
        await asyncio.gather(self.decoding, return_exceptions=True)
        self.forget(self.held)
        self.held = []


def still_current(stream: StreamT, messages: List[Message]) -> bool:
    """Whether records read earlier may still be applied: no rebalance began since (flow active)
    and they were fetched in the consumer's current generation."""
    generation = stream.app.consumer_generation_id
    return stream.app.flow_control.is_active() and all(message.generation_id == generation for message in messages)


async def decoded(events: List[EventT], decode: Callable[[EventT], Optional[T]]) -> DecodedBatch[T]:
    batch: DecodedBatch[T] = DecodedBatch()
    for event in events:
        try:
            value = decode(event)
        except Exception as error:  # noqa: BLE001 - any failure a record causes is its own
            await dead_letter(reason_of(error), event)
            batch.refused.append(event)
            continue
        if value is not None:
            batch.append(Decoded(event, value))
    return batch


def batch_channel(stream: StreamT) -> Optional[TopicT]:
    """The stream's topic if it is a batch channel: a ``BatchTopic`` subscribed through this
    project's transport, whose consumer puts each partition's fetched records in its queue as one
    list, with no per-record hand-off, queue entry or acknowledgement by the stream. None for any
    other stream (``agent.test_context()``, FAST_CONSUMER=false), which is read with Faust's
    ``take_events``."""
    channel = stream.channel
    if isinstance(channel, BatchTopic) and getattr(channel, "batch_queue", None) is not None:
        return cast(TopicT, channel)
    return None


def stop_reading(stream: StreamT, channel: TopicT) -> None:
    """The agent reads its batch channel no more (it stopped or failed): deliver nothing to it, or
    its full queue would stop the consumer's delivery to every agent."""
    cast(Conductor, stream.app.topics).remove_batch_channel(channel)


async def channel_batches(stream: StreamT, channel: TopicT, max_: int) -> AsyncIterator[Tuple[List[Message], List[EventT]]]:
    """The records waiting in a batch channel (at most ``max_``), and their events. Records fetched
    before a rebalance (an older consumer generation, or while the flow is stopped) are dropped
    unacknowledged, as Faust's stream drops them: they are read again from the committed offset.
    A record whose key or value the topic's schema cannot decode is dead-lettered (and acknowledged
    with its batch)."""
    app = stream.app
    queue = channel.batch_queue  # type: ignore[attr-defined]
    make_event: Callable[..., EventT] = cast(Any, app.conf.Event)
    raw = (
        channel.key_serializer == "raw"
        and channel.value_serializer == "raw"
        and channel.key_type in (None, bytes)
        and channel.value_type in (None, bytes)
    )
    forget = cast(Consumer, app.consumer).forget
    while True:
        messages: List[Message] = await queue.get(max_)
        generation = app.consumer_generation_id
        if not app.flow_control.is_active():
            forget(messages)
            continue
        if messages[0].generation_id != generation or messages[-1].generation_id != generation:
            forget(message for message in messages if message.generation_id != generation)
            messages = [message for message in messages if message.generation_id == generation]
            if not messages:
                continue
        if raw:
            events = [make_event(app, message.key, message.value, message.headers or {}, message) for message in messages]
        else:
            decoded = [await decoded_event(channel, message) for message in messages]
            events = [event for event in decoded if event is not None]
        yield messages, events


async def decoded_event(channel: TopicT, message: Message) -> Optional[EventT]:
    """The event of ``message`` as the topic's schema decodes it; a record it cannot decode is a
    dead letter (None)."""
    try:
        return await channel.decode(message, propagate=True)
    except Exception as error:  # noqa: BLE001 - any failure a record causes is its own
        app, make_event = channel.app, cast(Any, channel.app.conf.Event)
        await dead_letter(reason_of(error), make_event(app, message.key, message.value, message.headers or {}, message))
        return None


def acknowledge(stream: StreamT, messages: Iterable[Message]) -> None:
    """Drop one reference on each message; a message whose last reference this was is
    acknowledged to the consumer, so its offset may be committed."""
    consumer = stream.app.consumer
    ack_all = getattr(consumer, "ack_all", None)
    if ack_all is not None:  # app/transport.py's consumer: the same, in one step
        ack_all(messages)
        return
    on_message_out = stream.app.sensors.on_message_out
    for message in messages:
        if message.ack(consumer):
            on_message_out(message.tp, message.offset, message)


async def until_applied(apply: Callable[..., Awaitable[T]], *args: Any, what: str, max_backoff: Optional[float] = None) -> T:
    """``await apply(*args)`` until it returns, under the one retry policy."""
    started = time.perf_counter()
    async for attempt in retrying(what, max_backoff=max_backoff or MAX_BACKOFF):
        with attempt:
            result = await apply(*args)
    stats = apply_stats[what]
    stats.batches += 1
    stats.seconds += time.perf_counter() - started
    return result


# --- pipelined mode ------------------------------------------------------------------------------


def hold(events: Iterable[EventT]) -> None:
    """Take one more reference on each event's message: the stream's own acknowledgement (for
    ``take_events``, when the loop body returns) no longer makes its offset committable."""
    for event in events:
        event.message.incref()


def release(stream: StreamT, events: Iterable[EventT]) -> None:
    """Drop the reference ``hold`` took (or, on a batch channel, the one the delivery took); an
    event whose last reference this was is acknowledged to the consumer, so its offset may be
    committed."""
    acknowledge(stream, (event.message for event in events))


async def held_batches(stream: StreamT, *, max_: int, within: float) -> AsyncIterator[List[EventT]]:
    """Batches of up to ``max_`` records (as ``decoded_batches`` reads them), not acknowledged
    when the loop body returns: release them with ``release_in_order``."""
    channel = batch_channel(stream)
    if channel is None:
        async for events in stream.take_events(max_, within=within):
            hold(events)  # take_events acknowledges the batch when the loop body returns; the agent releases it
            yield events
        return
    try:
        async for _messages, events in channel_batches(stream, channel, max_):
            yield events
    finally:
        stop_reading(stream, channel)


class ReleaseOrder:
    """Parts are released in the order they were read, each after the one before. Faust commits up
    to the first offset not acknowledged, but lets a gap of one offset at the head pass
    (``Consumer._new_offset``: ``min(acked) - committed > 1``, and no check before the first
    commit), so a part released before an earlier one could let an unwritten record be committed.
    Batches' ``ready`` futures are settled in order too, each after the one before."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.last: asyncio.Future = loop.create_future()
        self.last.set_result(None)
        self.last_batch: asyncio.Future = loop.create_future()
        self.last_batch.set_result(None)

    def next_turn(self) -> Tuple[asyncio.Future, asyncio.Future]:
        """(the release to wait for, this part's release)."""
        previous, self.last = self.last, asyncio.get_running_loop().create_future()
        return previous, self.last

    def batch_turn(self, ready: asyncio.Future) -> asyncio.Future:
        """The batch before's ``ready`` future, to wait for before settling ``ready``."""
        previous, self.last_batch = self.last_batch, ready
        return previous


async def release_in_order(stream: Any, events: List[EventT], ready: asyncio.Future, turn: Tuple[asyncio.Future, asyncio.Future]) -> None:
    """Release ``events`` once their batch is ``ready`` and the part before was released; if
    either failed, they stay held (and so do all parts after them)."""
    previous, released = turn
    try:
        await asyncio.shield(ready)
        await asyncio.shield(previous)
    except BaseException:
        released.cancel()
        raise
    release(stream, events)
    released.set_result(None)


class PipelinedWrites:
    """The writes in progress while the agent prepares the next ones: at most ``limit`` writes at
    once (what follows a write does not hold a slot), and a failed write fails the agent at its
    next write (logged at once). As an async context manager: ``finish`` on leaving, cancelling the
    writes if the block was cancelled."""

    def __init__(self, limit: int) -> None:
        self.slots = asyncio.Semaphore(limit)
        self.tasks: Deque[asyncio.Future] = deque()

    async def __aenter__(self) -> PipelinedWrites:
        return self

    async def __aexit__(
        self, kind: Optional[Type[BaseException]], error: Optional[BaseException], traceback: Optional[TracebackType]
    ) -> None:
        await self.finish(cancel=kind is not None and issubclass(kind, asyncio.CancelledError))

    async def start(
        self,
        write: Coroutine[Any, Any, Any],
        then: Optional[Callable[[Any], Awaitable[None]]] = None,
        *,
        released: Optional[asyncio.Future] = None,
    ) -> None:
        """Wait for a free slot (raising what a finished write raised), then run ``write`` and,
        with its slot given back, ``then(its result)``. ``released`` is the part's turn (settled
        by ``release_in_order``): if the write or ``then`` fails it is cancelled, so every later
        part fails too instead of waiting for a release that never comes."""
        try:
            self.raise_failed()
            await self.slots.acquire()
        except BaseException:
            write.close()  # never started: its batch stays held, so its offsets are not committed
            raise
        self._spawn(self._run(write, then, released)).add_done_callback(lambda _: write.close())  # dropped before it began

    async def slot_free(self) -> None:
        """Wait until a write could start. An agent that waits for this before taking its next
        batch leaves the records in its queue while every slot is busy, so they make one longer
        batch (fewer, larger writes) instead of many batches of what each fetch brought."""
        async with self.slots:
            pass

    def track(self, step: Coroutine[Any, Any, None]) -> None:
        """Run ``step`` (without a slot) among the writes: its failure fails the next write, and
        it is finished or dropped with them. Finished steps are forgotten (raising a failure)."""
        try:
            self.raise_failed()
        except BaseException:
            step.close()
            raise
        self._spawn(step)

    def _spawn(self, step: Coroutine[Any, Any, None]) -> asyncio.Future:
        task = asyncio.ensure_future(step)
        task.add_done_callback(log_failed_write)
        self.tasks.append(task)
        return task

    async def _run(
        self, write: Coroutine[Any, Any, Any], then: Optional[Callable[[Any], Awaitable[None]]], released: Optional[asyncio.Future]
    ) -> None:
        try:
            try:
                result = await write
            finally:
                self.slots.release()
            if then is not None:
                await then(result)
        except BaseException:
            if released is not None:
                released.cancel()  # no-op once released
            raise

    def raise_failed(self) -> None:
        """Forget the finished writes and steps at the head; raise what one of them raised (a
        cancelled one leaves its records, and all after them, held: that fails the agent too)."""
        while self.tasks and self.tasks[0].done():
            task = self.tasks.popleft()
            if task.cancelled():
                raise RuntimeError("a pipelined write was cancelled; its records and the ones after them are not released")
            task.result()

    async def finish(self, cancel: bool) -> None:
        """On shutdown (``cancel``) drop the writes: their records are not committed and are read
        again. After an error let them end, so the batches already written are released."""
        tasks, self.tasks = list(self.tasks), deque()
        if cancel:
            for task in tasks:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def log_failed_write(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("A pipelined write failed; its offsets stay uncommitted", exc_info=task.exception())
