"""app/runtime.py: hostile records become dead letters, a failing batch is applied again, never skipped;
in pipelined mode, parts are released strictly in read order and a failed write holds back the rest."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, Awaitable, Callable, List, Tuple

import orjson
import pytest
from faust.types import Message

from app import app
from app.runtime import (
    PipelinedWrites,
    ReleaseOrder,
    decoded_batches,
    hold,
    reason_of,
    release_in_order,
    require_encodable,
    until_applied,
)

probe_topic = app.topic("runtime-probe", key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
applied: List[int] = []
failures = {"left": 0}


def decode_number(event) -> int:
    value = orjson.loads(event.value)
    if not isinstance(value, int):
        raise ValueError("not an integer")
    return require_encodable(value)


async def apply_numbers(numbers: List[int]) -> None:
    if failures["left"]:
        failures["left"] -= 1
        raise ConnectionError("sink away")
    applied.extend(numbers)


@app.agent(probe_topic)
async def sum_numbers(stream) -> None:
    async for batch in decoded_batches(stream, decode_number, max_=100, within=0.05):
        await until_applied(apply_numbers, [entry.value for entry in batch], what="probe")


async def settled(expected: int, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while len(applied) < expected and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)


async def test_hostile_records_become_dead_letters_and_the_good_ones_around_them_apply(monkeypatch):
    letters = []

    async def record_letter(reason, event=None):
        letters.append((event.message.offset, reason))

    monkeypatch.setattr("app.runtime.dead_letter", record_letter)
    applied.clear()
    hostile = [b"[" * 100_000 + b"]" * 100_000, b"9" * 5000, b"1e400", b'"text"', b"\xff\xfe", b"18446744073709551616"]
    async with sum_numbers.test_context() as agent:
        await agent.put(b"1")
        for value in hostile:
            await agent.put(value)
        await agent.put(b"2")
        await settled(2)
    assert applied == [1, 2]
    assert [offset for offset, _ in letters] == list(range(1, len(hostile) + 1))
    assert all(reason for _, reason in letters)


async def test_a_batch_whose_apply_fails_is_applied_again_not_skipped(monkeypatch):
    monkeypatch.setattr("app.runtime.MAX_BACKOFF", 0.01)
    applied.clear()
    failures["left"] = 3
    async with sum_numbers.test_context() as agent:
        await agent.put(b"7")
        await settled(1)
    assert applied == [7] and failures["left"] == 0


def test_reasons_name_the_error_type_even_when_its_message_is_empty():
    assert reason_of(RecursionError()) == "RecursionError"
    assert reason_of(ValueError("too deep")) == "ValueError: too deep"


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("value", [2**64, {"a": [2**70]}, {"deep": nested(300)}, {1: "non-str key"}])
def test_values_orjson_cannot_write_are_refused(value):
    with pytest.raises(ValueError):
        require_encodable(value)


# --- pipelined mode ------------------------------------------------------------------------------


class Consumed:
    """What release() reads of a stream: the offsets it makes committable, in the order it does."""

    def __init__(self) -> None:
        self.committable: List[int] = []
        self.app = SimpleNamespace(consumer=None, sensors=SimpleNamespace(on_message_out=self.on_message_out))

    def on_message_out(self, tp: Any, offset: int, message: Message) -> None:
        self.committable.append(offset)


def held(*offsets: int) -> List[Any]:
    """Events of real messages at ``offsets``, held as held_batches holds them."""
    events = [SimpleNamespace(message=Message("logs", 0, offset, 0.0, 0, [], b"k", b"v", None)) for offset in offsets]
    hold(events)
    return events


def ready_future() -> asyncio.Future:
    ready = asyncio.get_running_loop().create_future()
    ready.set_result(None)
    return ready


def released_after(
    stream: Consumed, events: List[Any], ready: asyncio.Future, turn: Tuple[asyncio.Future, asyncio.Future]
) -> Callable[[Any], Awaitable[None]]:
    """What a pipelined agent runs after a part's write: release the part in its turn."""
    return lambda _result: release_in_order(stream, events, ready, turn)


async def test_parts_are_released_in_the_order_they_were_read():
    """Faust's commit lets a one-offset gap at the head pass, so a later part whose write finished
    first must not be released before an earlier one whose write is still running."""
    stream, order, ready = Consumed(), ReleaseOrder(), ready_future()
    gates = {7: asyncio.Event(), 8: asyncio.Event()}

    async def write(offset: int) -> None:
        await gates[offset].wait()

    async with PipelinedWrites(2) as writes:
        for offset in (7, 8):
            await writes.start(write(offset), released_after(stream, held(offset), ready, order.next_turn()))
        gates[8].set()
        await asyncio.sleep(0.02)
        assert stream.committable == []  # its write is done, but the part before is not released yet
        gates[7].set()
    assert stream.committable == [7, 8]


async def test_a_failed_write_holds_its_part_and_every_later_one_and_fails_the_next_write():
    stream, order, ready = Consumed(), ReleaseOrder(), ready_future()
    first, second = held(7), held(8)

    async def broken() -> None:
        raise ConnectionError("sink away")

    writes = PipelinedWrites(4)
    await writes.start(broken(), released_after(stream, first, ready, order.next_turn()))
    await writes.start(asyncio.sleep(0), released_after(stream, second, ready, order.next_turn()))
    await asyncio.sleep(0.02)
    with pytest.raises(ConnectionError):
        await writes.start(asyncio.sleep(0))
    await writes.finish(cancel=True)

    assert stream.committable == []
    assert [event.message.refcount for event in first + second] == [1, 1]  # still held: read again


async def test_after_a_failed_write_the_agent_stops_instead_of_waiting_for_its_release():
    stream, order, ready = Consumed(), ReleaseOrder(), ready_future()
    first, second = held(7), held(8)

    async def broken() -> None:
        raise ConnectionError("sink away")

    async def agent() -> None:
        async with PipelinedWrites(4) as writes:  # leaving lets the writes end: none may wait for ever
            first_turn = order.next_turn()
            await writes.start(broken(), released_after(stream, first, ready, first_turn), released=first_turn[1])
            second_turn = order.next_turn()
            await writes.start(asyncio.sleep(0), released_after(stream, second, ready, second_turn), released=second_turn[1])
            await asyncio.sleep(0.02)
            await writes.start(asyncio.sleep(0))

    with pytest.raises(ConnectionError):
        await asyncio.wait_for(agent(), timeout=10)  # it hung here when the failed part's turn stayed open

    assert stream.committable == []
    assert [event.message.refcount for event in first + second] == [1, 1]


async def test_a_part_never_released_holds_every_later_one():
    stream, order, ready = Consumed(), ReleaseOrder(), ready_future()
    first, second, third = order.next_turn(), order.next_turn(), order.next_turn()
    stuck = asyncio.ensure_future(release_in_order(stream, held(1), asyncio.get_running_loop().create_future(), first))
    rest = [asyncio.ensure_future(release_in_order(stream, held(offset), ready, turn)) for offset, turn in ((2, second), (3, third))]
    await asyncio.sleep(0.01)
    stuck.cancel()  # e.g. shutdown while its batch was not ready
    results = await asyncio.gather(stuck, *rest, return_exceptions=True)
    assert stream.committable == [] and all(isinstance(result, asyncio.CancelledError) for result in results)


async def test_no_more_than_the_limit_of_writes_run_at_once():
    writes, gates, running = PipelinedWrites(2), [asyncio.Event() for _ in range(3)], []

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


async def test_the_next_batch_is_taken_only_once_a_write_slot_is_free():
    """While every slot is busy the agent leaves its records in the queue: one longer batch later."""
    writes, gate = PipelinedWrites(1), asyncio.Event()

    async def write() -> None:
        await gate.wait()

    await writes.start(write())
    free = asyncio.ensure_future(writes.slot_free())
    await asyncio.sleep(0.02)
    assert not free.done()
    gate.set()
    await asyncio.wait_for(free, 1)
    await writes.finish(cancel=False)
    await asyncio.wait_for(writes.slot_free(), 1)  # and it takes no slot itself


async def test_a_failed_write_fails_the_next_batch():
    writes = PipelinedWrites(4)

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

    with pytest.raises(KeyError):
        async with PipelinedWrites(4) as after_error:
            await after_error.start(write(1))
            raise KeyError("a bug in the agent")
    with pytest.raises(asyncio.CancelledError):
        async with PipelinedWrites(4) as on_shutdown:
            await on_shutdown.start(write(2))
            raise asyncio.CancelledError

    assert finished == [1]  # the first batch was written (and released); the second was not


async def test_finished_steps_are_forgotten_so_writes_without_a_sink_keep_no_backlog():
    writes = PipelinedWrites(2)
    for _ in range(100):
        writes.track(asyncio.sleep(0))
        await asyncio.sleep(0.001)
    assert len(writes.tasks) <= 2
    await writes.finish(cancel=False)


async def test_a_cancelled_write_or_step_fails_the_next_batch():
    writes = PipelinedWrites(2)

    async def cancelled() -> None:
        raise asyncio.CancelledError

    writes.track(cancelled())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="cancelled"):
        writes.raise_failed()
