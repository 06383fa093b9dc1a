"""Folding a batch of events into one delta per key per partition."""
from __future__ import annotations

import operator
from types import SimpleNamespace

from app.aggregation import fold_deltas


def event(partition: int, offset: int) -> SimpleNamespace:
    return SimpleNamespace(message=SimpleNamespace(partition=partition, offset=offset))


def test_deltas_are_combined_per_key_within_each_partition():
    batch = [(event(0, 1), [("a", 1)]), (event(1, 7), [("b", 5)]), (event(0, 2), [("a", 2), ("c", 1)])]

    pending = fold_deltas(batch, combine=operator.add)

    assert {p: entry.deltas for p, entry in pending.items()} == {0: {"a": 3, "c": 1}, 1: {"b": 5}}


def test_each_partition_is_written_under_its_own_last_event():
    first, second, third = event(0, 1), event(1, 7), event(0, 2)

    pending = fold_deltas([(first, [("a", 1)]), (second, [("b", 1)]), (third, [("a", 1)])], combine=operator.add)

    assert pending[0].last_event is third
    assert pending[1].last_event is second


def test_an_event_without_deltas_still_counts_as_its_partitions_last_event():
    pending = fold_deltas([(event(3, 1), [("k", 1)]), (event(3, 2), [])], combine=operator.add)

    assert pending[3].last_event.message.offset == 2
    assert pending[3].deltas == {"k": 1}


# --- entering a partition, DeltaBuffer ------------------------------------------------------------

import asyncio  # noqa: E402
from typing import Any, List  # noqa: E402

from faust.streams import current_event  # noqa: E402
from faust.types.tuples import ConsumerMessage, Message  # noqa: E402

from app import app  # noqa: E402
from app.aggregation import DeltaBuffer, enter_partition  # noqa: E402


def real_event(partition: int, offset: int, key: bytes = b"k"):
    message = ConsumerMessage("counts-source", partition, offset, 0.0, 0, [], key, b"1", None)
    message.incref()  # as the conductor does when it delivers the message to one stream
    return app.create_event(key, 1, [], message)


class PartitionRecordingTable(dict):
    """A table stand-in: ``table[key]`` defaults to 0; each write records the partition of the
    current event, which is where Faust would put the store entry and the changelog record."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: List[Any] = []

    def __missing__(self, key: Any) -> int:
        return 0

    def __setitem__(self, key: Any, value: Any) -> None:
        self.writes.append((key, value, current_event().message.partition))
        super().__setitem__(key, value)


class FakeConsumer:
    """Records acknowledgements (and, with ``hooks``, before-commit callbacks like app/transport.py's)."""

    def __init__(self) -> None:
        self.acked: List[int] = []

    def ack(self, message: Message) -> bool:
        self.acked.append(message.offset)
        return True


class HookConsumer(FakeConsumer):
    def __init__(self) -> None:
        super().__init__()
        self.callbacks: List[Any] = []

    def add_before_commit(self, callback) -> None:
        self.callbacks.append(callback)

    def remove_before_commit(self, callback) -> None:
        self.callbacks.remove(callback)

    def commit(self) -> None:
        for callback in list(self.callbacks):
            callback()


class FakeStream:
    """Faust's Stream as DeltaBuffer uses it: ``app.consumer``, ``app.sensors``, current event."""

    def __init__(self, consumer: FakeConsumer) -> None:
        self.real = app.stream(app.channel())
        self.app = SimpleNamespace(consumer=consumer, sensors=SimpleNamespace(on_message_out=lambda *a: None))
        self.current_event = None

    def _set_current_event(self, event) -> None:
        self.real._set_current_event(event)  # Faust's own: sets the context variable tables read
        self.current_event = event


async def test_entering_a_partition_leaves_the_streams_current_event_alone():
    stream = app.stream(app.channel())
    received, other = real_event(0, 5), real_event(1, 9)
    stream._set_current_event(received)  # what the take_events buffer task reads after its wait

    enter_partition(stream, other)

    assert current_event() is other  # table writes of this task go to partition 1
    assert stream.current_event is received  # the buffer task still sees the event it received


async def test_delta_buffer_writes_each_key_once_per_flush_in_its_partition():
    table, consumer = PartitionRecordingTable(), HookConsumer()
    buffer = DeltaBuffer(FakeStream(consumer), table, combine=operator.add, apply=operator.add)
    events = [real_event(0, 1, b"a"), real_event(1, 1, b"b"), real_event(0, 2, b"a"), real_event(0, 3, b"c")]

    for event in events:
        buffer.add(event, [(event.key, 1)])
    assert table.writes == []  # nothing written before the flush

    assert buffer.flush() == 3
    assert sorted(table.writes) == [(b"a", 2, 0), (b"b", 1, 1), (b"c", 1, 0)]
    buffer.add(events[0], [(b"a", 5)])
    buffer.flush()
    assert table[b"a"] == 7 and buffer.writes == 4


async def test_with_the_projects_consumer_every_commit_first_writes_the_folded_deltas():
    table, consumer = PartitionRecordingTable(), HookConsumer()
    buffer = DeltaBuffer(FakeStream(consumer), table, combine=operator.add, apply=operator.add)
    event = real_event(2, 7, b"a")

    async with buffer.flushing():
        buffer.add(event, [(b"a", 1)])
        assert event.message.refcount == 1  # not held: the stream acknowledges it as usual
        consumer.commit()
        assert table.writes == [(b"a", 1, 2)]
        buffer.add(real_event(2, 8, b"a"), [(b"a", 1)])
    # leaving the agent writes what is left and stops flushing before commits
    assert table[b"a"] == 2 and consumer.callbacks == []


async def test_with_another_consumer_events_stay_unacknowledged_until_their_deltas_are_written():
    table, consumer = PartitionRecordingTable(), FakeConsumer()
    buffer = DeltaBuffer(FakeStream(consumer), table, combine=operator.add, apply=operator.add, interval=0.05)
    first, second = real_event(0, 1, b"a"), real_event(0, 2, b"a")

    async with buffer.flushing():
        for event in (first, second):
            buffer.add(event, [(b"a", 1)])
            assert event.message.ack(consumer) is False  # the stream's own ack does not release it
        assert consumer.acked == [] and table.writes == []
        for _ in range(100):  # the idle flush
            if consumer.acked:
                break
            await asyncio.sleep(0.01)

    assert table.writes == [(b"a", 2, 0)]
    assert consumer.acked == [1, 2]


def test_a_flush_is_due_once_the_oldest_unwritten_delta_is_an_interval_old():
    now = [100.0]
    buffer = DeltaBuffer(FakeStream(HookConsumer()), PartitionRecordingTable(), combine=operator.add,
                         apply=operator.add, interval=1.0, clock=lambda: now[0])
    assert not buffer.due()
    buffer.add(real_event(0, 1), [(b"k", 1)])
    now[0] += 0.9
    buffer.add(real_event(0, 2), [(b"k", 1)])
    assert not buffer.due()
    now[0] += 0.1
    assert buffer.due()
    buffer.flush()
    assert not buffer.due()
