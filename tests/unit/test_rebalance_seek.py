"""A seek to the committed offsets during a rebalance loses no record (app/transport.py's Consumer).

After a rebalance Faust's Recovery resumes the stream partitions, then seeks them to their committed
offsets (``Consumer.perform_seek``), then resumes its flow control, which empties every stream queue.
The drain loop keeps delivering while the seek runs. Before the fix, the rest of a batch fetched
before the seek was delivered after it: Faust recorded a gap from the committed offset to that
record, and dropped the records fetched again after the seek as "already delivered", so the records
the cleared queues never processed were committed unprocessed (and the partition's commits crawled,
one offset per commit: tests/integration/test_migration.py's kill test).
"""
from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import List

from faust.types import TP

from tests.unit.test_transport import new_consumer

TP0 = TP("orders.commands", 0)
END = 10  # offsets 0..9 in the partition
BATCH = 6  # records per fetch
COMMITTED = 0


async def test_records_delivered_while_seeking_to_the_committed_offset_are_delivered_again():
    consumer = new_consumer()
    fetcher = SimpleNamespace(_stopped=asyncio.Event())
    position = {TP0: 0}  # aiokafka's fetch position
    queue: List[int] = []  # the stream queue of the agent
    seeks: List[asyncio.Task] = []

    async def fetched_batches(timeout: float):
        start = position[TP0]
        batch = list(range(start, min(start + BATCH, END)))  # fetched now, handed over one by one
        position[TP0] = start + len(batch)
        yield TP0, [SimpleNamespace(offset=offset, topic=TP0.topic, tp=TP0) for offset in batch]
        if position[TP0] >= END:
            fetcher._stopped.set()

    async def seek_to_committed():
        await asyncio.sleep(0.01)  # a round trip to the consumer thread and the broker
        position[TP0] = COMMITTED
        return {TP0: COMMITTED}

    async def recovery_completes():  # Recovery.on_recovery_completed, after resume_partitions
        await consumer.perform_seek()
        queue.clear()  # app.flow_control.resume() empties the stream queues

    async def callback(message) -> None:
        queue.append(message.offset)
        if message.offset == 2 and not seeks:
            seeks.append(asyncio.create_task(recovery_completes()))
        await asyncio.sleep(0.005)  # the conductor decodes and hands over

    consumer.fetched_batches = fetched_batches
    consumer.callback = callback
    consumer.seek_to_committed = seek_to_committed
    consumer._read_offset.clear()

    await asyncio.wait_for(consumer._drain_messages(fetcher), timeout=10)
    await seeks[0]

    assert queue == list(range(END))  # every record from the committed offset, in order, once
    assert not consumer._gap.get(TP0)  # no gap: nothing is committed without being processed
    assert consumer._read_offset[TP0] == END - 1


async def test_a_seek_without_a_running_drain_loop_does_not_wait():
    consumer = new_consumer()

    async def seek_to_committed():
        return {TP0: 5}

    consumer.seek_to_committed = seek_to_committed
    await asyncio.wait_for(consumer.perform_seek(), timeout=1)

    assert consumer._read_offset[TP0] == 5 and consumer._seek_done.is_set()
