"""The worker's consumer hands records over inline and polls in short waits (app/transport.py).

These guard the two changes that lift a bare agent from ~13k to ~38k records/s on this machine:
if a Faust upgrade or a refactor brings back the per-record task hand-off or the 1 s poll, they fail.
"""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from faust.types import TP

from app import app, settings
from app.transport import GETMANY_TIMEOUT, Consumer, Transport


def test_the_worker_consumes_through_this_projects_transport():
    assert isinstance(app.transport, Transport)
    assert isinstance(app.consumer, Consumer)
    assert str(app.conf.broker_consumer[0]).startswith("streamspine://")
    assert str(app.conf.broker_producer[0]).startswith("kafka://")


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

    async def getmany(timeout: float):
        timeouts.append(timeout)
        for offset in records:
            yield tp, SimpleNamespace(offset=offset, topic=tp.topic)
        fetcher._stopped.set()

    async def callback(message) -> None:
        callback_tasks.append(asyncio.current_task())

    consumer.getmany = getmany
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

    assert aiokafka_consumer._fetch_max_wait_ms == settings.consumer_fetch_wait_ms == 20
