"""agents/logs.py: the bulk writes that run while the next batch is parsed."""
from __future__ import annotations

import asyncio

import orjson
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


def test_a_batch_sends_each_services_newest_lines_once_oldest_first():
    from agents.logs import ParsedBatch, newest_lines

    def line(n: int, second: int) -> tuple:
        return f"logs-0-{n}-0", {"@timestamp": f"2024-11-01T12:00:{second:02d}.000Z", "message": f"m{n}",
                                 "log": {"level": "info"}}

    batch = ParsedBatch()
    batch.recent[("cart", 0)] = [line(1, 10), line(2, 30), line(3, 50)]
    batch.recent[("cart", 1)] = [line(4, 20), line(5, 40)]
    batch.recent[("order", 0)] = [line(6, 59)]

    newest = newest_lines(batch, "cart", limit=3)

    assert [entry["id"] for entry in newest] == ["logs-0-2-0", "logs-0-5-0", "logs-0-3-0"]
    assert newest[0] == {"id": "logs-0-2-0", "@timestamp": "2024-11-01T12:00:30.000Z", "level": "info", "message": "m2"}


async def test_finished_steps_are_forgotten_so_a_worker_without_elasticsearch_keeps_no_backlog():
    writes = BulkWrites(2)
    for _ in range(100):
        writes.track(asyncio.sleep(0))
        await asyncio.sleep(0.001)
    assert len(writes.tasks) <= 2
    await writes.finish(cancel=False)


async def test_parts_are_released_in_the_order_they_were_read(monkeypatch):
    """Faust's commit lets a one-offset gap at the head pass, so a later part must not be released
    before an earlier one whose lines are still being written."""
    import agents.logs as logs

    released = []
    monkeypatch.setattr(logs, "release", lambda stream, events: released.extend(events))
    order, counted = logs.ReleaseOrder(), asyncio.get_running_loop().create_future()
    first, second = order.next_turn(), order.next_turn()
    later = asyncio.ensure_future(logs.release_in_order(None, ["offset 8"], counted, second))
    counted.set_result(None)
    await asyncio.sleep(0.01)
    assert released == []  # its write is done, but the part before is not released yet

    await logs.release_in_order(None, ["offset 7"], counted, first)
    await asyncio.wait_for(later, 1)
    assert released == ["offset 7", "offset 8"]


async def test_a_part_never_released_holds_every_later_one(monkeypatch):
    import agents.logs as logs

    released = []
    monkeypatch.setattr(logs, "release", lambda stream, events: released.extend(events))
    order, counted = logs.ReleaseOrder(), asyncio.get_running_loop().create_future()
    counted.set_result(None)
    first, second, third = order.next_turn(), order.next_turn(), order.next_turn()
    stuck = asyncio.ensure_future(logs.release_in_order(None, ["a"], asyncio.get_running_loop().create_future(), first))
    rest = [asyncio.ensure_future(logs.release_in_order(None, [name], counted, turn)) for name, turn in (("b", second), ("c", third))]
    await asyncio.sleep(0.01)
    stuck.cancel()  # e.g. shutdown while its counts were not acknowledged
    results = await asyncio.gather(stuck, *rest, return_exceptions=True)
    assert released == [] and all(isinstance(result, asyncio.CancelledError) for result in results)


async def test_a_batchs_counts_wait_for_the_batch_befores_and_are_not_sent_if_those_failed(monkeypatch):
    """Statistics skip a partition's records up to the newest offset counted: a later batch's counts
    acknowledged before an earlier batch's redelivery would lose the earlier batch's lines."""
    import agents.logs as logs

    sent = []

    async def send_counts(batch) -> None:  # stands in for Kafka's acknowledgement
        sent.append(batch)

    monkeypatch.setattr(logs, "send_counts", send_counts)
    loop = asyncio.get_running_loop()
    order = logs.ReleaseOrder()
    first, second, third = loop.create_future(), loop.create_future(), loop.create_future()
    assert order.counts_turn(first).done()  # nothing before the first batch
    after_first = asyncio.ensure_future(logs.send_counts_in_turn("batch 2", order.counts_turn(second), second))
    after_second = asyncio.ensure_future(logs.send_counts_in_turn("batch 3", order.counts_turn(third), third))
    await asyncio.sleep(0.01)
    assert sent == []  # the first batch's counts are not acknowledged yet

    first.set_exception(ConnectionError("request timed out"))
    results = await asyncio.gather(after_first, after_second, return_exceptions=True)
    assert sent == [] and all(isinstance(result, ConnectionError) for result in results)
    assert isinstance(second.exception(), ConnectionError) and isinstance(third.exception(), ConnectionError)

    ok, fourth = loop.create_future(), loop.create_future()
    ok.set_result(None)
    await logs.send_counts_in_turn("batch 4", ok, fourth)
    assert sent == ["batch 4"] and fourth.result() is None


async def test_a_cancelled_write_or_count_fails_the_next_batch():
    writes = BulkWrites(2)

    async def cancelled() -> None:
        raise asyncio.CancelledError

    writes.track(cancelled())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="cancelled"):
        writes.raise_failed()


def test_recent_lines_fit_in_a_kafka_record_however_long_the_lines():
    from agents.logs import RECENT_BYTES, RECENT_MESSAGE_CHARS, ParsedBatch, merge_recent, newest_lines

    stack_trace = "java.lang.IllegalStateException: boom\n" + "\tat com.shop.Cart.add(Cart.java:42)\n" * 400
    batch = ParsedBatch()
    batch.recent[("cart", 0)] = [
        (f"logs-0-{n}-0", {"@timestamp": f"2024-11-01T12:{n // 60:02d}:{n % 60:02d}.000Z", "message": stack_trace,
                           "log": {"level": "error"}})
        for n in range(200)
    ]

    newest = newest_lines(batch, "cart", limit=200)

    assert 0 < len(newest) < 200 and len(orjson.dumps(newest)) <= RECENT_BYTES
    assert newest[-1]["id"] == "logs-0-199-0"  # the newest are the ones kept
    assert all(len(entry["message"]) == RECENT_MESSAGE_CHARS and entry["truncated"] for entry in newest)
    merged = merge_recent(newest, newest_lines(batch, "cart", limit=200), limit=200)
    assert len(orjson.dumps(merged)) <= RECENT_BYTES and merged[0]["id"] == "logs-0-199-0"
    short = [{"id": f"x-{n}", "@timestamp": f"2024-11-01T13:00:{n:02d}.000Z", "level": "info", "message": "ok"} for n in range(50)]
    assert len(merge_recent(merged, short, limit=200)) > 50  # short lines leave room for older ones


def test_a_record_read_twice_in_one_batch_counts_once_and_is_released_with_its_part():
    from faust.types import Message

    from agents.logs import ParsedBatch, parse_parts

    class Event:  # what parse_parts reads of a faust Event
        def __init__(self, offset: int) -> None:
            value = orjson.dumps({"message": f"line {offset}", "level": "info", "ts": 1730462400})
            self.message = Message("logs", 0, offset, 1730462400.0, 0, [], b"cart", value, None)

    events = [Event(5), Event(6), Event(5), Event(7)]  # a seek back read offset 5 again
    batch = ParsedBatch()

    parts = list(parse_parts(batch, events, 100))

    assert [len(part.events) for part in parts] == [4]  # every event is released
    assert [pair[0]["index"]["_id"] for pair in parts[0].actions] == ["logs-0-5-0", "logs-0-6-0", "logs-0-7-0"]
    assert sum(len(offsets) for offsets in batch.counts[("cart", 0)].values()) == 3 and batch.lines == 3


async def test_shutdown_while_counts_are_in_flight_leaves_kafkas_acknowledgements_alone(monkeypatch):
    """The producer settles its futures later: a cancelled one would make it fail (InvalidStateError)."""
    import agents.logs as logs

    loop = asyncio.get_running_loop()
    acknowledgement = loop.create_future()
    monkeypatch.setattr(logs, "send_counts", lambda batch: acknowledgement)
    done, counted = loop.create_future(), loop.create_future()
    done.set_result(None)
    task = asyncio.ensure_future(logs.send_counts_in_turn("batch", done, counted))
    await asyncio.sleep(0.01)

    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    assert counted.cancelled() and not acknowledgement.cancelled()
    acknowledgement.set_result(None)
