"""agents/logs.py: the bulk writes that run while the next batch is parsed."""
from __future__ import annotations

import asyncio

import pytest

from agents.logs import BulkWrites


async def test_no_more_than_the_limit_of_writes_run_at_once():
    writes, gates, running = BulkWrites(2), [asyncio.Event() for _ in range(3)], []

    async def write(n: int) -> None:
        running.append(n)
        await gates[n].wait()

    await writes.start(write(0))
    await writes.start(write(1))
    third = asyncio.ensure_future(writes.start(write(2)))
    await asyncio.sleep(0.02)
    assert running == [0, 1] and not third.done()  # the third waits for a slot
    gates[0].set()
    await asyncio.wait_for(third, 1)
    await asyncio.sleep(0)
    assert running == [0, 1, 2]
    gates[1].set(), gates[2].set()
    await writes.finish(cancel=False)


async def test_a_failed_write_fails_the_next_batch():
    writes = BulkWrites(4)

    async def broken() -> None:
        raise KeyError("no such record")

    await writes.start(broken())
    await asyncio.sleep(0)
    with pytest.raises(KeyError):
        await writes.start(asyncio.sleep(0))


async def test_on_shutdown_writes_are_dropped_and_after_an_error_they_finish():
    finished = []

    async def write(n: int) -> None:
        await asyncio.sleep(0.05)
        finished.append(n)

    after_error = BulkWrites(4)
    await after_error.start(write(1))
    await after_error.finish(cancel=False)
    on_shutdown = BulkWrites(4)
    await on_shutdown.start(write(2))
    await on_shutdown.finish(cancel=True)

    assert finished == [1]  # the first batch was written (and released); the second was not
