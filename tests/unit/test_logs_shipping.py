"""agents/logs.py: what ship_logs sends besides its bulk writes (counts, newest lines), and its parts.

The pipelined writes and the ordered release themselves are tested in test_runtime.py."""

from __future__ import annotations

import asyncio

import orjson
from faust.types import Message

from app.runtime import ReleaseOrder


def test_a_batch_sends_each_services_newest_lines_once_oldest_first():
    from agents.logs import ParsedBatch, newest_lines

    def line(n: int, second: int) -> tuple:
        return f"logs-0-{n}-0", {"@timestamp": f"2024-11-01T12:00:{second:02d}.000Z", "message": f"m{n}", "log": {"level": "info"}}

    batch = ParsedBatch()
    batch.recent[("cart", 0)] = [line(1, 10), line(2, 30), line(3, 50)]
    batch.recent[("cart", 1)] = [line(4, 20), line(5, 40)]
    batch.recent[("order", 0)] = [line(6, 59)]

    newest = newest_lines(batch, "cart", limit=3)

    assert [entry["id"] for entry in newest] == ["logs-0-2-0", "logs-0-5-0", "logs-0-3-0"]
    assert newest[0] == {"id": "logs-0-2-0", "@timestamp": "2024-11-01T12:00:30.000Z", "level": "info", "message": "m2"}


async def test_a_batchs_counts_wait_for_the_batch_befores_and_are_not_sent_if_those_failed(monkeypatch):
    """Statistics skip a partition's records up to the newest offset counted: a later batch's counts
    acknowledged before an earlier batch's redelivery would lose the earlier batch's lines."""
    import agents.logs as logs

    sent = []

    async def send_counts(batch) -> None:  # stands in for Kafka's acknowledgement
        sent.append(batch)

    monkeypatch.setattr(logs, "send_counts", send_counts)
    loop = asyncio.get_running_loop()
    order = ReleaseOrder()
    first, second, third = loop.create_future(), loop.create_future(), loop.create_future()
    assert order.batch_turn(first).done()  # nothing before the first batch
    after_first = asyncio.ensure_future(logs.send_counts_in_turn("batch 2", order.batch_turn(second), second))
    after_second = asyncio.ensure_future(logs.send_counts_in_turn("batch 3", order.batch_turn(third), third))
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


def test_recent_lines_fit_in_a_kafka_record_however_long_the_lines():
    from agents.logs import RECENT_BYTES, RECENT_MESSAGE_CHARS, ParsedBatch, merge_recent, newest_lines

    stack_trace = "java.lang.IllegalStateException: boom\n" + "\tat com.shop.Cart.add(Cart.java:42)\n" * 400
    batch = ParsedBatch()
    batch.recent[("cart", 0)] = [
        (
            f"logs-0-{n}-0",
            {"@timestamp": f"2024-11-01T12:{n // 60:02d}:{n % 60:02d}.000Z", "message": stack_trace, "log": {"level": "error"}},
        )
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


async def test_a_bulk_write_that_fails_for_a_reason_nobody_planned_is_retried_and_its_lines_released(monkeypatch):
    """The runtime's one policy for unexpected errors: retry (never skip, never stall the agent)."""
    import agents.logs as logs
    from app.runtime import PipelinedWrites, hold
    from tests.unit.test_runtime import Consumed

    class FailsOnce:  # a sink whose first write raises what no retry rule expects
        def __init__(self) -> None:
            self.calls, self.stored = 0, []

        async def write(self, actions):
            self.calls += 1
            if self.calls == 1:
                raise KeyError("a bug in the sink")
            self.stored.extend(action[0]["index"]["_id"] for action in actions)
            return []

    sink, stream = FailsOnce(), Consumed()
    acknowledged = asyncio.get_running_loop().create_future()
    acknowledged.set_result(None)
    monkeypatch.setattr(logs, "writer", sink)
    monkeypatch.setattr(logs, "send_counts", lambda batch: acknowledged)
    events = [Message("logs", 0, offset, 1730462400.0, 0, [], b"cart", orjson.dumps({"message": f"line {offset}"}), None)
              for offset in (3, 4)]
    events = [type("Event", (), {"message": message})() for message in events]
    hold(events)

    async with PipelinedWrites(2) as writes:
        await logs.ship_batch(stream, events, writes, ReleaseOrder())

    assert sink.calls == 2 and sink.stored == ["logs-0-3-0", "logs-0-4-0"]
    assert stream.committable == [3, 4]
