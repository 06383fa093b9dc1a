"""Produce and consume test records on a real broker with aiokafka."""
from __future__ import annotations

import asyncio
import json
from typing import Any, Iterable, List, Tuple

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord


def encode(value: Any) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


async def produce(bootstrap: str, topic: str, records: Iterable[Tuple[Any, ...]], max_batch_size: int = 16384) -> None:
    """Send (key, value) or (key, value, headers) tuples; values that are not bytes are sent as
    JSON; headers is a dict of str to str."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=max_batch_size)
    await producer.start()
    try:
        sends = [
            await producer.send(
                topic, encode(record[1]), key=record[0].encode() if record[0] is not None else None,
                headers=[(name, value.encode()) for name, value in record[2].items()] if len(record) > 2 else None,
            )
            for record in records
        ]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


def produce_sync(bootstrap: str, topic: str, records: Iterable[Tuple[Any, ...]], max_batch_size: int = 16384) -> None:
    asyncio.run(produce(bootstrap, topic, list(records), max_batch_size))


async def consume(bootstrap: str, topic: str, count: int, timeout: float = 30.0, *, exact: bool = True) -> List[ConsumerRecord]:
    """Read ``count`` records of ``topic`` from the beginning (no consumer group); with
    ``exact=False`` return what arrived within ``timeout`` instead of raising."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    records: List[ConsumerRecord] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(records) < count and loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for partition_records in batch.values():
                records.extend(partition_records)
    finally:
        await consumer.stop()
    if len(records) < count and exact:
        raise TimeoutError(f"read {len(records)} of {count} records from {topic} within {timeout}s")
    return records


def consume_sync(bootstrap: str, topic: str, count: int, timeout: float = 30.0, *, exact: bool = True) -> List[ConsumerRecord]:
    return asyncio.run(consume(bootstrap, topic, count, timeout, exact=exact))


async def consume_to_end(bootstrap: str, topic: str, timeout: float = 30.0) -> List[ConsumerRecord]:
    """Every record of ``topic`` up to the end offsets it has when the call starts."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    records: List[ConsumerRecord] = []
    try:
        await consumer.topics()  # fetches the cluster metadata
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        async def behind() -> bool:
            return any([await consumer.position(tp) < end for tp, end in ends.items()])

        while await behind() and loop.time() < deadline:
            for partition_records in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(partition_records)
    finally:
        await consumer.stop()
    return records


def consume_to_end_sync(bootstrap: str, topic: str, timeout: float = 30.0) -> List[ConsumerRecord]:
    return asyncio.run(consume_to_end(bootstrap, topic, timeout))
