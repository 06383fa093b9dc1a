"""Batch channels (app/transport.py, app/runtime.py): a partition's fetched records reach the agent as
one list, with one reference each, and are acknowledged exactly as Faust's per-record path
acknowledges them, only after the loop body returned."""

from __future__ import annotations

import asyncio
from typing import Any, List, Tuple

import orjson
import pytest
from aiokafka import TopicPartition
from faust.types import TP

from app import app
from app.runtime import batch_channel, decoded_batches
from app.topics import raw_topic
from app.transport import BatchQueue, BatchTopic, Consumer
from tests.unit.test_transport import consumer_record, new_consumer


def messages_of(consumer: Consumer, tp: TP, offsets: List[int], values: Any = None) -> List[Any]:
    messages = [consumer._to_message(tp, consumer_record(tp, offset)) for offset in offsets]
    for message, value in zip(messages, values or ()):
        message.value = value
    return messages


async def test_a_partitions_fetched_records_reach_its_batch_channel_as_one_list():
    consumer = new_consumer()
    app.flow_control.resume()
    tp = TP("batch-probe-deliver", 0)
    queue = BatchQueue(app.flow_control, max_records=100)
    conductor = app.topics
    conductor.batch_queues[tp] = (queue,)
    conductor._acking_topics.add(tp.topic)  # as for every subscribed topic
    callbacks: List[Any] = []

    async def per_record(message: Any) -> None:
        callbacks.append(message)

    consumer.callback = per_record
    consumer._read_offset[tp] = 5  # set by a seek: read from 5 on; 7 is missing (compaction)
    try:
        messages = messages_of(consumer, tp, [3, 4, 5, 6, 8, 9])
        assert await consumer._deliver(tp, messages, consumer._seek_epoch)
    finally:
        del conductor.batch_queues[tp]
        conductor._acking_topics.discard(tp.topic)

    delivered = await queue.get(100)
    assert [message.offset for message in delivered] == [5, 6, 8, 9]  # 3 and 4 come before the seek
    assert all(message.refcount == 1 and message.tracked for message in delivered)
    assert set(delivered) <= set(consumer._unacked_messages)  # a rebalance waits for them
    assert callbacks == []  # no per-record hand-off
    assert consumer._read_offset[tp] == 9
    assert [(gap.begin, gap.end) for gap in consumer._gap[tp]] == [(7, 8)]


async def test_ack_all_leaves_the_consumer_as_acknowledging_each_message_does():
    tp = TP("batch-probe-ack", 0)
    app.topics._acking_topics.add(tp.topic)  # as for every subscribed topic
    by_one, at_once = new_consumer(), new_consumer()
    for consumer in (by_one, at_once):
        consumer._committed_offset[tp] = 2
    offsets = [1, 2, 3, 4, 5, 7, 8]
    one, once = messages_of(by_one, tp, offsets), messages_of(at_once, tp, offsets)
    for messages in (one, once):
        for message in messages:
            message.incref()
        messages[3].incref()  # offset 4 read by two channels: only its second ack counts
        messages[4].acked = True  # offset 5 acknowledged already

    for message in one:
        message.ack(by_one)
    at_once.ack_all(once)

    for consumer in (by_one, at_once):
        assert list(consumer._acked[tp]) == [2, 3, 7, 8]
        assert consumer._acked_index[tp] == {2, 3, 7, 8}
        assert consumer._n_acked == 4
    assert [message.refcount for message in once] == [message.refcount for message in one]
    assert [message.acked for message in once] == [message.acked for message in one]
    assert at_once._new_offset(tp) == by_one._new_offset(tp) == 4  # offset 4 still held

    at_once._committed_offset[tp] = 4  # that offset committed
    at_once.ack_all([once[3]])
    assert at_once._new_offset(tp) == 5


async def test_the_queue_merges_lists_splits_long_ones_and_pauses_its_partitions_when_full():
    """A full queue stops the fetching of its partitions (Faust's on_buffer_full), not the consumer:
    an agent whose sink is away holds up its own partitions, never the other agents'."""
    dropped: List[List[Any]] = []
    paused: List[TP] = []
    resumed: List[TP] = []
    queue = BatchQueue(app.flow_control, max_records=10, on_drop=dropped.append, pause=paused.append, resume=resumed.append)
    first, second = TP("q", 0), TP("q", 1)
    records = messages_of(new_consumer(), first, list(range(12))) + messages_of(new_consumer(), second, list(range(12, 20)))

    queue.put(records[:12])  # over the bound: partition 0 is fetched no more
    queue.put(records[12:16])
    assert paused == [first, second] and queue.qsize() == 16
    assert await queue.get(5) == records[:5]  # a long list split; still 11 waiting
    assert resumed == []
    assert await queue.get(9) == records[5:12]  # not merged with the next list: 11 would pass 9
    assert queue.qsize() == 4 and sorted(resumed) == [first, second]  # down to 40 %: fetched again
    assert await queue.get(2) == records[12:14]

    queue.put(records[16:18])
    queue.put(records[18:19])
    assert await queue.get(5) == records[14:19]  # merged
    queue.put(records[19:])
    queue.clear()  # a rebalance empties it
    assert queue.qsize() == 0 and not queue.batches
    assert dropped == [records[19:]]  # the consumer forgets them: a rebalance does not wait for them


async def test_a_full_queue_pauses_and_resumes_its_partition_in_the_consumers_own_sets():
    """Records carry aiokafka's TopicPartition; Faust's consumer asserts that its active
    partitions are all TP (a bridge backlog of 80,000 events once crashed the worker here)."""
    consumer = new_consumer()
    tp = TP("batch-probe-pause", 0)
    consumer._set_active_tps({tp})
    queue = BatchQueue(app.flow_control, max_records=2, pause=consumer.on_buffer_full, resume=consumer.on_buffer_drop)
    queue.put(messages_of(consumer, TopicPartition(tp.topic, tp.partition), [0, 1, 2]))
    assert consumer._get_active_partitions() == set()
    await queue.get(3)
    assert consumer._get_active_partitions() == {tp}
    assert all(type(active) is TP for active in consumer._get_active_partitions())


@pytest.fixture
def letters(monkeypatch) -> List[int]:
    """The offsets of the records dead-lettered, in order."""
    offsets: List[int] = []

    async def record_letter(reason: str, event: Any = None) -> None:
        offsets.append(event.message.offset)

    monkeypatch.setattr("app.runtime.dead_letter", record_letter)
    return offsets


def agent_stream(topic: str) -> Tuple[Any, Any]:
    """An agent's stream of a batch topic and its channel, subscribed as a worker subscribes it."""
    app.flow_control.resume()
    stream = app.stream(raw_topic(topic))
    app.topics._acking_topics.add(topic)
    return stream, batch_channel(stream)


async def test_decoded_batches_of_a_batch_channel_acknowledge_only_after_the_body(letters):
    stream, channel = agent_stream("batch-probe-agent")
    assert channel is stream.channel and channel in app.topics
    consumer = app.consumer
    tp = TP("batch-probe-agent", 0)
    messages = messages_of(consumer, tp, [0, 1, 2, 3], values=[b"1", b"[[[", b"2", b"3"])
    stale = messages_of(consumer, tp, [4])
    stale[0].generation_id = app.consumer_generation_id - 1  # fetched before a rebalance
    for message in messages + stale:
        message.incref()
        consumer._unacked_messages.add(message)  # tracked, as the delivery tracks them
    channel.batch_queue.put(messages)
    channel.batch_queue.put(stale)

    batches = decoded_batches(stream, lambda event: orjson.loads(event.value), max_=100, within=1.0)
    try:
        batch = await batches.__anext__()
        assert [entry.value for entry in batch] == [1, 2, 3] and letters == [1]
        assert not consumer._acked[tp]  # the body has not returned yet
        channel.batch_queue.put(messages_of(consumer, tp, [5]))
        await batches.__anext__()
        assert list(consumer._acked[tp]) == [0, 1, 2, 3]  # the stale record is read again, not acked
        assert not stale[0].acked and stale[0] not in consumer._unacked_messages  # no rebalance waits for it
        channel.batch_queue.put(messages_of(consumer, tp, [6]))
        with pytest.raises(RuntimeError):
            await batches.athrow(RuntimeError("the body failed"))
        # The agent reads this channel no more: nothing is delivered to it (a full queue would
        # stop the consumer), and what waited in it is read again after a rebalance.
        assert channel not in app.topics and not channel.batch_queue.batches
    finally:
        app.topics.discard(channel)
    assert list(consumer._acked[tp]) == [0, 1, 2, 3]  # offset 5 was not applied: not acknowledged


async def test_decoded_ahead_decodes_the_next_batch_during_the_body_and_drops_it_after_a_rebalance(letters):
    stream, channel = agent_stream("batch-probe-ahead")
    consumer = app.consumer
    tp = TP("batch-probe-ahead", 0)
    decoding_tasks_before = len(asyncio.all_tasks())

    def put(offsets: List[int], values: List[bytes]) -> List[Any]:
        messages = messages_of(consumer, tp, offsets, values=values)
        for message in messages:
            message.incref()
            consumer._unacked_messages.add(message)
        channel.batch_queue.put(messages)
        return messages

    first, second = put([0, 1], [b"1", b"2"]), None
    batches = decoded_batches(stream, lambda event: orjson.loads(event.value), max_=100, within=1.0, ahead=True)
    try:
        batch = await batches.__anext__()
        assert [entry.value for entry in batch] == [1, 2]
        second = put([2, 3], [b"{{", b"4"])
        await asyncio.sleep(0.05)  # the body awaits its sinks: the next batch is decoded meanwhile
        assert letters == [2]  # its hostile record already dead-lettered
        assert not consumer._acked[tp]  # neither batch acknowledged before its body returned
        app.consumer_generation_id += 1  # a rebalance after the next batch was decoded
        third = put([2, 3], [b"{{", b"4"])
        for message in third:
            message.generation_id = app.consumer_generation_id
        batch = await batches.__anext__()
        assert list(consumer._acked[tp]) == [0, 1]
        assert not any(message.acked or message in consumer._unacked_messages for message in second)  # read again
        assert [entry.value for entry in batch] == [4] and letters == [2, 2]
        with pytest.raises(RuntimeError):
            await batches.athrow(RuntimeError("the body failed"))
        assert channel not in app.topics
        assert len(asyncio.all_tasks()) == decoding_tasks_before  # the decoding task ended with the agent
    finally:
        app.topics.discard(channel)
    assert list(consumer._acked[tp]) == [0, 1] and first[0].acked


async def test_decoding_ahead_takes_one_batch_ahead_and_forgets_it_when_the_agent_stops():
    stream, channel = agent_stream("batch-probe-ahead-stop")
    consumer = app.consumer
    tp = TP("batch-probe-ahead-stop", 0)
    messages = messages_of(consumer, tp, [0, 1, 2], values=[b"0", b"1", b"2"])
    for message in messages:
        message.incref()
        consumer._unacked_messages.add(message)
        channel.batch_queue.put([message])
    batches = decoded_batches(stream, lambda event: orjson.loads(event.value), max_=1, within=1.0, ahead=True)
    try:
        assert [entry.value for entry in await batches.__anext__()] == [0]
        await asyncio.sleep(0.05)  # the body runs: offset 1 is decoded, offset 2 stays in the channel
        assert [message.offset for batch in channel.batch_queue.batches for message in batch] == [2]
        await batches.aclose()  # the agent stops
    finally:
        app.topics.discard(channel)
    assert not messages[1].acked and messages[1] not in consumer._unacked_messages  # read again, no rebalance waits for it


def test_a_stream_of_a_batch_topic_has_its_queue_from_its_subscription_on():
    """No record can reach a batch topic's stream one by one, even before its agent first asks
    for a batch (ship_logs first puts an index template): its queue exists when it subscribes."""
    stream = app.stream(raw_topic("batch-probe-early"))
    try:
        assert isinstance(stream.channel, BatchTopic) and stream.channel in app.topics
        assert isinstance(stream.channel.batch_queue, BatchQueue)
        assert batch_channel(stream) is stream.channel
        plain = app.stream(app.topic("batch-probe-plain", key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"))
        assert batch_channel(plain) is None  # read with take_events
    finally:
        app.topics.remove_batch_channel(stream.channel)
