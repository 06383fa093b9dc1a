"""Produce and consume test records on a real broker with aiokafka."""
from __future__ import annotations

import asyncio
import json
from typing import Any, Iterable, List, Optional, Tuple

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
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
