"""The one way to read topics outside the consumer group: every worker keeps its own full copy.

Used where every worker needs all of a small topic (silences, the item replica, item models):
a follower reads from the beginning (or only the last record), hands each record to its topic's
``apply`` (a record ``apply`` refuses is logged and skipped: it changes no state), and reconnects
under the runtime's retry policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Callable, Dict, Optional, Tuple

from aiokafka import AIOKafkaConsumer, TopicPartition

from app import app, settings  # noqa: F401 - the App first, so mypy reads `settings` as its value
from app.retry import retrying
from app.settings import bootstrap_servers

log = logging.getLogger(__name__)

Apply = Callable[[bytes, Optional[bytes]], None]


class TopicFollower:
    """Reads topics from the beginning (or only their last record), outside the consumer group, in
    one consumer, and hands each record to its topic's ``apply``; reconnects on errors.
    ``positions`` are the next offsets read per (topic, partition)."""

    def __init__(
        self, topics: Dict[Callable[[], str], Tuple[int, Apply]], latest_only: bool = False, fetch_wait_ms: Optional[int] = None
    ) -> None:
        self.topics = topics  # topic name (resolved at start) -> (partitions, apply)
        self.latest_only = latest_only
        self.fetch_wait_ms = fetch_wait_ms or settings.consumer_fetch_wait_ms
        self.positions: Dict[Tuple[str, int], int] = {}
        self.caught_up = asyncio.Event()

    async def wait_caught_up(self, timeout: float = 10.0) -> None:
        """Wait (a bounded time) until what existed at start has been read."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.caught_up.wait(), timeout)

    async def follow(self) -> None:
        """Read for as long as the worker runs; a lost connection is retried under the one policy."""
        async for attempt in retrying(f"following {', '.join(name() for name in self.topics)}", max_backoff=5.0):
            with attempt:
                await self._read()

    async def _read(self) -> None:
        applies = {name(): apply for name, (_partitions, apply) in self.topics.items()}
        partitions = [TopicPartition(name(), number) for name, (count, _apply) in self.topics.items() for number in range(count)]
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers(settings.kafka_broker),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.fetch_wait_ms,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await consumer.start()
        try:
            consumer.assign(partitions)
            ends = await consumer.end_offsets(partitions)
            for partition in partitions:
                consumer.seek(partition, max(ends[partition] - 1, 0) if self.latest_only else 0)
            self._check_caught_up(ends)
            while True:
                batch = await consumer.getmany(timeout_ms=1000)
                for partition, records in batch.items():
                    for record in records:
                        self._apply(applies[partition.topic], record)
                        self.positions[(partition.topic, partition.partition)] = record.offset + 1
                self._check_caught_up(ends)
        finally:
            await consumer.stop()

    @staticmethod
    def _apply(apply: Apply, record: Any) -> None:
        try:
            apply(record.key, record.value)
        except Exception as error:  # noqa: BLE001 - one bad record must not stop the replica
            log.warning("ignoring a malformed record of %s at offset %s: %r", record.topic, record.offset, error)

    def _check_caught_up(self, ends: Dict[TopicPartition, int]) -> None:
        if not self.caught_up.is_set() and all(self.positions.get((tp.topic, tp.partition), 0) >= end for tp, end in ends.items()):
            self.caught_up.set()
