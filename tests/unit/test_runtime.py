"""app/runtime.py: hostile records become dead letters, a failing batch is applied again, never skipped."""
from __future__ import annotations

import asyncio
from typing import List

import orjson
import pytest

from app import app
from app.runtime import decoded_batches, reason_of, require_encodable, until_applied

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
