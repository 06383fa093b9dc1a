"""The worker's consumer hands records over inline and polls in short waits (app/transport.py).

These guard the two changes that lift a bare agent from ~13k to ~38k records/s on this machine:
if a Faust upgrade or a refactor brings back the per-record task hand-off or the 1 s poll, they fail.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from pathlib import Path
from time import monotonic
from types import SimpleNamespace
from typing import AsyncIterator, Dict, List, Optional, Sequence, Tuple

import faust
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner
from faust.exceptions import ValueDecodeError
from faust.types import TP
from faust.types.tuples import Message

from app import app, settings, transport
from app.settings import Settings
from tests.support.workers import WorkerProcess
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread as aiokafka_thread
from app.transport import (
    GETMANY_TIMEOUT, PRODUCER_BUFFER_MAX, Consumer, FastSchema, Producer, ProducerBuffer, Transport,
    fetched_end_offsets,
)


def test_the_worker_consumes_through_this_projects_transport():
    assert isinstance(app.transport, Transport)
    assert isinstance(app.consumer, Consumer)
    assert str(app.conf.broker_consumer[0]).startswith("streamspine://")
    assert str(app.conf.broker_producer[0]).startswith("streamspine://")
    assert isinstance(app.producer, Producer)


def new_consumer() -> Consumer:
    async def nothing(*args) -> None:
        return None

    return Consumer(
        app.transport, callback=nothing, on_partitions_revoked=nothing, on_partitions_assigned=nothing,
        loop=asyncio.get_running_loop(),
    )


async def drain(consumer: Consumer, records, *, suspended: bool = False):
    """Run the drain loop over ``records``; return (task of each callback, getmany timeouts)."""
    tp = TP("metrics", 0)
    fetcher = SimpleNamespace(_stopped=asyncio.Event())
    callback_tasks, timeouts = [], []

    async def fetched_batches(timeout: float):
        timeouts.append(timeout)
        yield tp, [SimpleNamespace(offset=offset, topic=tp.topic, tp=tp) for offset in records]
        fetcher._stopped.set()

    async def callback(message) -> None:
        callback_tasks.append(asyncio.current_task())

    consumer.fetched_batches = fetched_batches
    consumer.callback = callback
    consumer._read_offset.clear()
    if suspended:
        consumer.suspend_flow.set()
    try:
        await consumer._drain_messages(fetcher)
    finally:
        consumer.suspend_flow.clear()
    return callback_tasks, timeouts


async def test_each_record_is_handed_to_the_conductor_inside_the_draining_task():
    consumer = new_consumer()

    async def run():
        return await drain(consumer, range(5)), asyncio.current_task()

    (callback_tasks, timeouts), draining_task = await asyncio.create_task(run())

    assert callback_tasks == [draining_task] * 5  # no task per record
    assert timeouts == [GETMANY_TIMEOUT] and GETMANY_TIMEOUT <= 0.1


async def test_during_a_rebalance_the_hand_off_stays_interruptible():
    consumer = new_consumer()

    callback_tasks, _ = await drain(consumer, range(3), suspended=True)

    assert len(callback_tasks) == 3
    assert asyncio.current_task() not in callback_tasks  # Faust's wait_first path, one task each


async def test_the_fetch_wait_is_the_configured_one_not_fausts_fixed_1500_ms():
    thread = app.consumer._thread
    aiokafka_consumer = thread._create_worker_consumer(app.transport)

    assert aiokafka_consumer._fetch_max_wait_ms == settings.consumer_fetch_wait_ms != 1500
    assert Settings.model_fields["consumer_fetch_wait_ms"].default == 500  # Kafka's own default


def test_workers_against_the_local_broker_wait_20_ms_per_fetch_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("CONSUMER_FETCH_WAIT_MS", raising=False)
    assert WorkerProcess("kafka://127.0.0.1:1", Path("/tmp/unused"), app_id="t").env["CONSUMER_FETCH_WAIT_MS"] == "20"
    monkeypatch.setenv("CONSUMER_FETCH_WAIT_MS", "")  # empty counts as unset, as for the settings
    assert WorkerProcess("kafka://127.0.0.1:1", Path("/tmp/unused"), app_id="t").env["CONSUMER_FETCH_WAIT_MS"] == "20"
    monkeypatch.setenv("CONSUMER_FETCH_WAIT_MS", "300")
    assert WorkerProcess("kafka://127.0.0.1:1", Path("/tmp/unused"), app_id="t").env["CONSUMER_FETCH_WAIT_MS"] == "300"


async def test_fetched_batches_yield_each_partitions_records_at_once_and_read_its_high_watermark_once():
    consumer = new_consumer()
    consumer.resume_flow()
    first, second = TP("getmany-t", 0), TP("getmany-t", 1)
    batch = {first: [consumer_record(first, offset) for offset in range(5)], second: [consumer_record(second, 7)]}

    async def wait_next_records(timeout):
        return batch, {first, second}

    high_watermark_reads = []
    consumer._wait_next_records = wait_next_records
    consumer.highwater = lambda tp: high_watermark_reads.append(tp) or 100 + tp.partition

    delivered = [(tp, [message.offset for message in messages]) async for tp, messages in consumer.fetched_batches(timeout=0.01)]

    assert sorted(delivered) == [(first, list(range(5))), (second, [7])]
    assert sorted(high_watermark_reads) == [first, second]  # once per partition, not per record
    assert app.monitor.tp_end_offsets[first] == 100 and app.monitor.tp_end_offsets[second] == 101


async def test_fetched_batches_stop_when_the_consumer_generation_changes():
    consumer = new_consumer()
    consumer.resume_flow()
    tp, other = TP("getmany-t", 0), TP("getmany-t", 1)
    batch = {tp: [consumer_record(tp, offset) for offset in range(5)], other: [consumer_record(other, 0)]}

    async def wait_next_records(timeout):
        return batch, {tp, other}

    consumer._wait_next_records = wait_next_records
    consumer.highwater = lambda tp: 5
    delivered = []
    generation = app.consumer_generation_id
    try:
        async for partition, messages in consumer.fetched_batches(timeout=0.01):
            delivered.append(partition)
            app.consumer_generation_id = generation + 1  # a rebalance began
    finally:
        app.consumer_generation_id = generation

    assert delivered == [tp]  # the next partition's records are not handed on


def consumer_record(tp: TP, offset: int):
    from aiokafka.structs import ConsumerRecord

    return ConsumerRecord(tp.topic, tp.partition, offset, 0, 0, b"k", b"v", None, 1, 1, [])


# --- the producer's buffer ------------------------------------------------------------------------


def test_the_conductor_waits_only_beyond_a_deep_producer_buffer():
    buffer = app.producer.buffer

    assert isinstance(buffer, ProducerBuffer)
    assert buffer.max_messages == PRODUCER_BUFFER_MAX >= 10 * 1000  # Faust's fixed 100 stalled every flush


async def test_the_producer_buffer_size_is_its_queue_length():
    buffer = ProducerBuffer()
    buffer.app = SimpleNamespace()  # no settings to read: the size must not need them
    for n in range(3):
        buffer.pending.put_nowait(n)

    assert buffer.size == 3


async def test_table_writes_go_to_the_changelog_as_one_batch_per_partition_in_order(kafka_broker):
    """What a batch body writes in one turn of the event loop reaches Kafka as record batches,
    each partition's writes in the order written, tombstones included; the persisted offset is
    recorded once per partition, and a flush (before every commit) waits for all of it."""
    topic = await new_topic(kafka_broker, partitions=2)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap, max_batch_size=1024)
    await producer.start()
    buffer = ProducerBuffer()
    monitor = SimpleNamespace(messages_sent=0, messages_sent_by_topic=Counter())  # Faust's counts of records sent
    buffer.app = SimpleNamespace(producer=SimpleNamespace(_ensure_producer=lambda: producer), monitor=monitor)
    delivered: Dict[TP, int] = {}
    first, second = TP(topic, 0), TP(topic, 1)
    try:
        for turn in range(3):
            for n in range(40):  # 40 x ~60 bytes: several 1 kB batches per partition and turn
                tp = first if n % 4 else second
                buffer.send_changelog(tp, f"k{n}".encode(), None if n == 39 else f"turn {turn} write {n}".encode() * 3,
                                      lambda tp, offset: delivered.__setitem__(tp, offset))
            assert buffer.size >= 40
            await asyncio.sleep(0)
        await buffer.flush()
        assert buffer.size == 0 and buffer.bytes == 0
        assert delivered == {first: 89, second: 29}  # the last offset of each partition
        assert monitor.messages_sent == 120 and monitor.messages_sent_by_topic == {topic: 120}
    finally:
        await producer.stop()
    read = await read_all(kafka_broker, topic, 120)
    for tp in (first, second):
        expected = [(f"k{n}".encode(), None if n == 39 else f"turn {turn} write {n}".encode() * 3)
                    for turn in range(3) for n in range(40) if (tp == first) == bool(n % 4)]
        assert [(key, value) for key, value in read[tp.partition]] == expected


async def test_a_changelog_batch_that_fails_fails_every_flush_and_nothing_after_it_is_sent(kafka_broker):
    topic = await new_topic(kafka_broker, partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    await producer.start()
    buffer = ProducerBuffer()
    buffer.app = SimpleNamespace(producer=SimpleNamespace(_ensure_producer=lambda: producer))
    tp = TP(topic, 0)
    buffer.send_changelog(tp, b"k", b"sent", lambda *_: None)
    await buffer.flush()
    await producer.stop()  # the broker is away for good: the next batch cannot be handed on
    buffer.send_changelog(tp, b"k", b"lost", lambda *_: None)
    with pytest.raises(Exception):
        await buffer.flush()
    buffer.send_changelog(tp, b"k", b"after the loss", lambda *_: None)
    with pytest.raises(Exception):
        await buffer.flush()  # no offset may be committed past a lost write
    assert buffer.size == 0
    assert [value for _, value in (await read_all(kafka_broker, topic, 1))[0]] == [b"sent"]


async def test_published_records_reach_the_partition_of_their_key_in_order_before_publish_returns(kafka_broker):
    name = await new_topic(kafka_broker, partitions=3)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    await producer.start()
    monitor = SimpleNamespace(messages_sent=0, messages_sent_by_topic=Counter())
    records = [(f"order-{n % 17}".encode(), f"event {n}".encode()) for n in range(200)]
    try:
        await transport.publish(SimpleNamespace(producer=SimpleNamespace(_producer=producer), monitor=monitor),
                                ((app.topic(name), key, value) for key, value in records))
    finally:
        await producer.stop()
    read = await read_all(kafka_broker, name, 200)
    partition_of = {key: DefaultPartitioner()(key, [0, 1, 2], [0, 1, 2]) for key, _ in records}  # Topic.send's choice
    assert {partition: [record for record in records if partition_of[record[0]] == partition] for partition in read} == read
    assert sum(len(got) for got in read.values()) == 200 and monitor.messages_sent_by_topic == {name: 200}


async def new_topic(broker, partitions: int) -> str:
    topic = f"changelog-probe-{id(object())}-{asyncio.get_running_loop().time():.3f}"
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    return topic


async def read_all(broker, topic: str, count: int) -> Dict[int, List[Tuple[bytes, Optional[bytes]]]]:
    """The (key, value) of ``count`` records of ``topic``, per partition in offset order."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=broker.bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    read: Dict[int, List[Tuple[bytes, Optional[bytes]]]] = {}
    try:
        seen = 0
        deadline = asyncio.get_running_loop().time() + 20
        while seen < count and asyncio.get_running_loop().time() < deadline:
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                read.setdefault(tp.partition, []).extend((record.key, record.value) for record in records)
                seen += len(records)
        await asyncio.sleep(0.3)  # anything beyond ``count`` would show now
        for tp, records in (await consumer.getmany(timeout_ms=300)).items():
            read.setdefault(tp.partition, []).extend((record.key, record.value) for record in records)
    finally:
        await consumer.stop()
    return read


# --- before-commit callbacks ----------------------------------------------------------------------


# --- decoding without the serializer registry -----------------------------------------------------


def message(value, key=b"k") -> Message:
    return Message("t", 0, 1, 0.0, 0, [], key, value, None)


class Reading(faust.Record, serializer="json"):
    value: float


def test_every_topic_decodes_through_fast_schema():
    assert app.conf.Schema is FastSchema
    assert isinstance(app.topic("any-topic", key_type=bytes).schema, FastSchema)


async def test_fast_schema_decodes_raw_keys_and_plain_json_values_like_faust():
    schema = FastSchema(key_type=bytes, key_serializer="raw", value_serializer="json")

    event = await schema.decode(app, message(b'{"id": 1, "user": "u1"}'))

    assert event.key == b"k" and event.value == {"id": 1, "user": "u1"}
    assert event.message.offset == 1 and event.headers == {}


async def test_a_json_value_tagged_with_a_faust_model_still_becomes_that_model():
    schema = FastSchema(key_type=bytes, key_serializer="raw", value_serializer="json")

    event = await schema.decode(app, message(Reading(value=2.5).dumps()))

    assert event.value == Reading(value=2.5)


async def test_fast_schema_raises_faust_decode_errors_for_invalid_json():
    schema = FastSchema(key_type=bytes, key_serializer="raw", value_serializer="json")

    with pytest.raises(ValueDecodeError):
        await schema.decode(app, message(b"{not json"), propagate=True)


async def test_raw_values_pass_through_and_typed_values_take_fausts_path():
    raw = FastSchema(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    typed = FastSchema(key_type=bytes, value_type=Reading, key_serializer="raw", value_serializer="json")

    assert (await raw.decode(app, message(b"\xff\x00"))).value == b"\xff\x00"
    assert (await typed.decode(app, message(b'{"value": 1.5}'))).value == Reading(value=1.5)


# --- changelog end offsets --------------------------------------------------------------------------


async def test_end_offsets_are_checked_against_the_high_watermark_of_a_fetch(kafka_broker):
    bootstrap = kafka_broker.bootstrap
    topic = f"end-offsets-{asyncio.get_running_loop().time():.0f}-{id(bootstrap)}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 2, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=50)
    await producer.start()
    try:
        for size in (10, 5):  # two batches of several records each, on partition 0
            await asyncio.gather(*[await producer.send(topic, b"v", partition=0) for _ in range(size)])
    finally:
        await producer.stop()
    tps = [TP(topic, 0), TP(topic, 1)]
    listed = await end_offsets(bootstrap, tps)  # the local broker answers 11 here (its bug)

    ends = await fetched_end_offsets(AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None), dict(listed))

    assert ends == {TP(topic, 0): 15, TP(topic, 1): 0}


async def end_offsets(bootstrap: str, tps):
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        return await consumer.end_offsets(tps)
    finally:
        await consumer.stop()


async def test_table_recovery_reads_end_offsets_through_that_check(monkeypatch):
    thread = app.consumer._thread
    seen = {}

    async def listed_by_the_broker(self, partitions):  # Faust's ListOffsets answer
        return {tp: 11 for tp in partitions}

    async def checked(client, ends):
        seen.update(client=client, ends=dict(ends))
        return {tp: end + 4 for tp, end in ends.items()}

    monkeypatch.setattr(aiokafka_thread, "_highwaters", listed_by_the_broker)
    monkeypatch.setattr(transport, "fetched_end_offsets", checked)
    monkeypatch.setattr(thread, "_create_client_consumer", lambda transport_: "group-less consumer")

    ends = await thread._highwaters([TP("changelog", 0)])

    assert ends == {TP("changelog", 0): 15}
    assert seen == {"client": "group-less consumer", "ends": {TP("changelog", 0): 11}}


def test_the_worker_batches_its_changelog_records_now_that_end_offsets_are_checked():
    # One record per produce batch was only needed for Tansu's wrong ListOffsets answer
    # (the check above); test_crash_recovery.py restarts workers on batched changelogs.
    assert settings.producer_max_batch_size == 16384
    assert app.conf.producer_max_batch_size == 16384


async def test_empty_changelogs_need_no_check_and_no_extra_consumer(monkeypatch):
    thread = app.consumer._thread

    async def listed_by_the_broker(self, partitions):
        return {tp: 0 for tp in partitions}

    def no_consumer(transport_):
        raise AssertionError("no group-less consumer for empty partitions")

    monkeypatch.setattr(aiokafka_thread, "_highwaters", listed_by_the_broker)
    monkeypatch.setattr(thread, "_create_client_consumer", no_consumer)

    assert await thread._highwaters([TP("changelog", 0)]) == {TP("changelog", 0): 0}


# --- the conductor's callback lookup --------------------------------------------------------------


@pytest.fixture
async def conductor_app():
    """A real app on this project's transport, with its flow running (a worker resumes it once
    partitions are assigned; it starts suspended)."""
    from app.settings import Settings, faust_settings

    conductor_app = faust.App(f"test-conductor-{id(object())}", **{
        **faust_settings(Settings(store="memory://")), "web_enabled": False,
    })
    conductor_app.flow_control.resume()
    return conductor_app


def deliver(conductor_app, *channels):
    """The conductor's ``on_message``, with the partition's callback built as Faust builds it."""
    conductor = conductor_app.topics
    conductor._tp_to_callback[TP("readings", 0)] = conductor._build_handler(TP("readings", 0), set(channels))
    return conductor.on_message


def reading_message(offset: int, value: bytes = b'{"value": 1.5}') -> Message:
    return Message("readings", 0, offset, 0.0, 0, [], b"k", value, None)


async def test_the_conductor_is_this_projects(conductor_app):
    assert isinstance(conductor_app.topics, transport.Conductor)


async def test_a_record_reaches_the_channel_of_its_partition_as_an_event(conductor_app):
    topic = conductor_app.topic("readings", value_type=Reading)
    on_message = deliver(conductor_app, topic)
    record = reading_message(7)

    await on_message(record)

    event = topic.queue.get_nowait()
    assert event.value == Reading(value=1.5) and event.message is record
    assert record.refcount == 1  # one reference, released by the stream's acknowledgement


async def test_delivery_waits_while_the_callback_map_is_being_rebuilt(conductor_app):
    topic = conductor_app.topic("readings", value_type=Reading)
    on_message = deliver(conductor_app, topic)
    lock = conductor_app.topics._tp_to_callback_lock

    async with lock:  # what _update_indices holds while it clears and refills the map
        delivery = asyncio.ensure_future(on_message(reading_message(10)))
        await asyncio.sleep(0.05)
        assert not delivery.done()
    await asyncio.wait_for(delivery, 1)

    assert topic.queue.get_nowait().message.offset == 10


@contextlib.asynccontextmanager
async def consumer_assigned(bootstrap: str, partitions: Dict[str, int], assigned: List[TopicPartition],
                            *, paused: Sequence[TopicPartition] = (),
                            group_id: Optional[str] = None) -> AsyncIterator[Tuple[Consumer, AIOKafkaConsumer]]:
    """A Consumer whose consumer thread drives a real aiokafka consumer of ``assigned`` (the topics
    created with ``partitions`` each), ``paused`` in aiokafka before the Consumer sees it; with
    ``group_id`` it can commit and read committed offsets."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, count, 1) for topic, count in partitions.items()])
    finally:
        await admin.close()
    fetching = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await fetching.start()
    consumer = new_consumer()
    try:
        fetching.assign(assigned)
        if paused:
            fetching.pause(*paused)
        consumer._thread._consumer = fetching
        consumer._thread.thread_loop = asyncio.get_running_loop()  # the consumer thread's loop, here this one
        yield consumer, fetching
    finally:
        consumer._thread._consumer = None
        await fetching.stop()


async def test_changelog_partitions_faust_pauses_are_not_fetched_by_aiokafka_either(kafka_broker):
    """Faust's pause only drops what is fetched; a recovered table's changelog partitions were
    fetched every round (128 of the worker's 233 partitions). Stream partitions keep Faust's pause."""
    changelog = sorted(app.tables.changelog_topics)[0]
    stream = f"paused-stream-{asyncio.get_running_loop().time():.0f}"
    async with consumer_assigned(kafka_broker.bootstrap, {changelog: 2, stream: 1},
                                 [TopicPartition(changelog, 0), TopicPartition(stream, 0)]) as (consumer, fetching):
        consumer.pause_partitions({TP(changelog, 0), TP(changelog, 1), TP(stream, 0)})  # changelog 1 is not assigned
        await asyncio.sleep(0)
        assert fetching.paused() == {TopicPartition(changelog, 0)}
        assert consumer._paused_partitions == {TP(changelog, 0), TP(changelog, 1), TP(stream, 0)}

        consumer.resume_partitions({TP(changelog, 0), TP(stream, 0)})
        await asyncio.sleep(0)
        assert fetching.paused() == set()


async def test_fausts_fetch_check_leaves_out_the_partitions_paused_on_purpose(kafka_broker, caplog):
    """Faust logs an error for every assigned partition aiokafka has not fetched for a while; an
    idle worker logged one per paused changelog partition at every check (7,680 lines in 12 min)."""
    changelog = sorted(app.tables.changelog_topics)[0]
    stream = f"checked-stream-{asyncio.get_running_loop().time():.0f}"
    partitions = [TopicPartition(changelog, 0), TopicPartition(stream, 0)]
    # Neither partition is ever fetched here: the stream one not by this project's choice.
    async with consumer_assigned(kafka_broker.bootstrap, {changelog: 1, stream: 1}, partitions,
                                 paused=partitions) as (consumer, _):
        thread = consumer._thread
        thread.time_started = monotonic()
        consumer.pause_partitions({TP(changelog, 0)})
        await asyncio.sleep(0)
        never_fetched = thread.time_started + thread.tp_fetch_request_timeout_secs + 1

        def reported(topic: str) -> bool:
            return any("has not sent fetch request" in r.getMessage() and topic in r.getMessage() for r in caplog.records)

        caplog.clear()
        with caplog.at_level(logging.ERROR):
            thread.verify_event_path(never_fetched, TP(changelog, 0))
            thread.verify_event_path(never_fetched, TP(stream, 0))
        assert not reported(changelog)  # paused on purpose
        assert reported(stream)  # still checked

        caplog.clear()
        consumer.resume_partitions({TP(changelog, 0)})  # to be fetched again: checked again
        with caplog.at_level(logging.ERROR):
            thread.verify_event_path(never_fetched, TP(changelog, 0))
        assert reported(changelog)


async def test_the_seek_to_committed_offsets_also_moves_partitions_committed_at_zero_or_never(kafka_broker):
    """aiokafka seeks only partitions committed past 0; the drain loop drops what was fetched
    before a seek, counting on the seek to fetch it again. A partition nobody had committed stayed
    at its fetch position, so its records fetched before the seek were never delivered."""
    topic = f"seek-committed-{asyncio.get_running_loop().time():.0f}"
    partitions = [TopicPartition(topic, p) for p in range(3)]
    async with consumer_assigned(kafka_broker.bootstrap, {topic: 3}, partitions, group_id=f"g-{topic}") as (consumer, fetching):
        producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap, max_batch_size=1)
        await producer.start()
        try:
            for tp in partitions:
                for _ in range(5):
                    await (await producer.send(topic, b"x", partition=tp.partition))
        finally:
            await producer.stop()
        await fetching.commit({partitions[1]: 0, partitions[2]: 3})  # partition 0: never committed
        for _ in range(50):  # fetch everything: every position at the end
            await fetching.getmany(timeout_ms=100)
            if all([await fetching.position(tp) == 5 for tp in partitions]):
                break

        async def on_this_loop(fun, *args, **kwargs):  # mode's hop to the (not started) consumer thread
            return await fun(*args, **kwargs)

        consumer._thread.call_thread = on_this_loop
        committed = await consumer._thread.seek_to_committed()
        assert committed == {partitions[0]: None, partitions[1]: 0, partitions[2]: 3}
        assert [await fetching.position(tp) for tp in partitions] == [0, 0, 3]
