"""The worker's memory bounds (docs/memory.md) and the opt-in heap profiler (app/memory.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tracemalloc
from types import SimpleNamespace
from typing import List, NamedTuple, Optional

import faust
import orjson
import pytest
from pydantic import ValidationError

from app import app, memory, stores
from app.gauges import flat_values, gauge, register_value
from app.memory import MemoryProfiler, MemorySettings, profile_memory
from app.stores import ARENA_BLOCK_BYTES, MIB, Store
from app.transport import ProducerBuffer, record_bytes

# --- settings ----------------------------------------------------------------------------------------


def test_memory_settings_defaults_bound_rocksdb_and_the_producer_buffer_and_profile_nothing():
    settings = MemorySettings()
    assert settings.memory_profile == 0
    assert (settings.rocksdb_cache_mb, settings.rocksdb_write_buffers_mb, settings.producer_buffer_mb) == (128, 64, 32)


def test_write_buffers_must_leave_room_in_the_cache_they_are_charged_to(monkeypatch):
    monkeypatch.setenv("ROCKSDB_CACHE_MB", "64")
    monkeypatch.setenv("ROCKSDB_WRITE_BUFFERS_MB", "64")
    with pytest.raises(ValidationError, match="ROCKSDB_WRITE_BUFFERS_MB must be less than ROCKSDB_CACHE_MB"):
        MemorySettings()


def test_stream_buffer_maxsize_sets_the_events_each_agent_stream_may_buffer(monkeypatch):
    import app.memory
    from app.settings import Settings, faust_settings

    monkeypatch.setenv("STREAM_BUFFER_MAXSIZE", "4096")
    monkeypatch.setattr(app.memory, "memory_settings", MemorySettings())

    assert faust_settings(Settings())["stream_buffer_maxsize"] == 4096
    monkeypatch.setenv("STREAM_BUFFER_MAXSIZE", "8")
    with pytest.raises(ValidationError, match="stream_buffer_maxsize"):
        MemorySettings()


# --- RocksDB: one cache and one memtable budget for every database of the worker --------------------


@pytest.fixture
def small_rocksdb_bounds(monkeypatch):
    """8 MiB of memtables in a 16 MiB cache (the worker's defaults are 64 in 128)."""
    settings = MemorySettings(rocksdb_cache_mb=16, rocksdb_write_buffers_mb=8)
    monkeypatch.setattr(memory, "memory_settings", settings)
    return settings


def table_stores(tmp_path, tables: int) -> List[Store]:
    worker = faust.App("memory-bounds-test", store="streamspine-rocksdb://", datadir=str(tmp_path), topic_partitions=2)
    return [worker.Table(f"t{i}", partitions=2).data for i in range(tables)]


def memtable_bytes(dbs) -> int:
    return sum(db.property_int_value("rocksdb.size-all-mem-tables") for db in dbs)


def test_every_database_shares_one_block_cache_and_one_memtable_budget(tmp_path, small_rocksdb_bounds):
    dbs = [store._db_for_partition(partition) for store in table_stores(tmp_path, 3) for partition in (0, 1)]
    for db in dbs:
        db.put(b"key", b"value")
    capacities = {db.property_int_value("rocksdb.block-cache-capacity") for db in dbs}
    assert capacities == {16 * MIB}  # Faust: a 2 GiB cache per database
    shared = stores.worker_shared_memory()
    assert shared.write_buffers.get_buffer_size() == 8 * MIB
    assert 0 < shared.write_buffers.get_usage() <= len(dbs) * ARENA_BLOCK_BYTES * 2  # Faust: 1 MiB a database


async def flushes_done(dbs) -> None:
    """Wait until no database has a full memtable waiting for its flush (RocksDB flushes in
    background threads; the bound applies to the memtables being written)."""
    for _ in range(1000):
        if not any(db.property_int_value("rocksdb.num-immutable-mem-table") for db in dbs):
            return
        await asyncio.sleep(0.01)


async def test_memtables_stay_within_the_budget_however_much_is_written(tmp_path, small_rocksdb_bounds):
    """Overwrites of the same keys fill a memtable like new keys do: Faust's 64 MiB memtables kept
    all 48 MiB written here in memory."""
    dbs = [store._db_for_partition(partition) for store in table_stores(tmp_path, 2) for partition in (0, 1)]
    value = os.urandom(500)
    for round_ in range(24_000):  # 12 MiB into each of the 4 databases, 1,000 keys each
        for db in dbs:
            db.put(b"key-%d" % (round_ % 1000), value)
    await flushes_done(dbs)
    assert memtable_bytes(dbs) <= 8 * MIB + len(dbs) * ARENA_BLOCK_BYTES
    assert all(db.get(b"key-999") == value for db in dbs)


# --- the producer buffer: bounded in bytes as well as records ---------------------------------------


class Channel:
    """Stands in for a topic: publishing only counts the record (the sending is not under test)."""

    def __init__(self) -> None:
        self.published = 0

    async def publish_message(self, fut, wait: bool = False) -> None:
        self.published += 1


class Pending(NamedTuple):
    """The fields of Faust's PendingMessage the buffer reads."""

    channel: Channel
    key: Optional[bytes]
    value: Optional[bytes]


def pending(channel: Channel, size: int) -> SimpleNamespace:
    return SimpleNamespace(message=Pending(channel, b"k", b"v" * (size - 1)))


async def buffer_with_bounds(max_messages: int, max_bytes: int) -> ProducerBuffer:
    buffer = ProducerBuffer(loop=asyncio.get_running_loop())
    buffer.app, buffer.max_messages, buffer.max_bytes = app, max_messages, max_bytes
    return buffer


async def test_the_stream_waits_while_the_unsent_records_exceed_the_byte_bound():
    buffer, channel = await buffer_with_bounds(max_messages=20_000, max_bytes=1000), Channel()
    records = [pending(channel, 400) for _ in range(4)]  # 1,600 bytes in 4 records
    for record in records:
        buffer.put(record)
    assert buffer.bytes == 1600
    waiting = asyncio.ensure_future(buffer.wait_until_ebb())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done()  # Faust's wait only looks at the count: 4 of 20,000
    for _ in range(2):  # the producer sends two: 800 bytes left
        await buffer._send_pending(await buffer.pending.get())
        buffer.message_sent.set()
        await asyncio.sleep(0)
    await waiting
    assert buffer.bytes == 800 and channel.published == 2


async def test_a_record_that_fails_to_send_leaves_the_byte_count():
    class Refusing(Channel):
        async def publish_message(self, fut, wait: bool = False) -> None:
            raise RuntimeError("broker refused")

    buffer = await buffer_with_bounds(max_messages=10, max_bytes=1000)
    buffer.put(pending(Refusing(), 300))
    with pytest.raises(RuntimeError):
        await buffer._send_pending(await buffer.pending.get())
    assert buffer.bytes == 0


async def test_the_stream_goes_on_at_once_under_both_bounds():
    buffer, channel = await buffer_with_bounds(max_messages=3, max_bytes=1000), Channel()
    for _ in range(3):
        buffer.put(pending(channel, 100))
    await buffer.wait_until_ebb()  # returns without any send
    assert buffer.size == 3


async def test_a_buffered_record_holds_its_own_bytes_not_the_4_kib_orjson_allocated():
    buffer, channel = await buffer_with_bounds(max_messages=20_000, max_bytes=32 * MIB), Channel()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1000):
            buffer.put(SimpleNamespace(message=Pending(channel, b"k", orjson.dumps({"count": i, "service": "cart"}))))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        if not was_tracing:
            tracemalloc.stop()
    assert held < 1000 * 1024  # orjson's own bytes: over 4 MiB
    assert orjson.loads((await buffer.pending.get()).message.value) == {"count": 0, "service": "cart"}


def test_record_bytes_counts_key_and_value_only_when_serialized():
    assert record_bytes(SimpleNamespace(key=b"abc", value=b"12345")) == 8
    assert record_bytes(SimpleNamespace(key=None, value=None)) == 0


# --- the profiler ------------------------------------------------------------------------------------


async def test_the_profiler_is_off_by_default(tmp_path):
    was_tracing = tracemalloc.is_tracing()
    await profile_memory(tmp_path, MemorySettings())  # returns at once
    assert tracemalloc.is_tracing() == was_tracing
    assert not (tmp_path / memory.PROFILE_FILE).exists()


def test_a_failing_gauge_reads_minus_one_instead_of_stopping_the_report():
    register_value("test_broken", "fails", lambda: 1 / 0)
    register_value("test_records", "a size", lambda: 42)
    gauge("test_by_state", "labelled", ["state"])(lambda: {("firing",): 2.0})
    values = flat_values()
    assert values["test_broken"] == -1.0 and values["test_records"] == 42.0
    assert values['test_by_state{state="firing"}'] == 2.0


grown: List[bytes] = []


def grow_here() -> None:
    grown.extend(bytes(1024) + bytes([i % 256]) for i in range(3000))  # ~3 MiB allocated on this line


async def test_the_profiler_reports_the_line_that_grew_since_its_baseline(tmp_path):
    path = tmp_path / "profile.jsonl"
    profiler = MemoryProfiler(path, interval=3600, top=10, frames=1)
    was_tracing = tracemalloc.is_tracing()
    profiler.start_tracing()
    try:
        baseline = await profiler.report()
        grow_here()
        report = await profiler.report()
    finally:
        grown.clear()
        if not was_tracing:
            tracemalloc.stop()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [baseline, report] and baseline["baseline"] and baseline["sites"] == []
    top = report["sites"][0]
    assert top["site"].endswith(f"{__file__}:{grow_here.__code__.co_firstlineno + 1}")
    assert top["size_diff"] > 3 * 1024 * 1024 and top["count_diff"] >= 3000
    assert report["rss"] > 0 and "streamspine_rocksdb_memtables_bytes" in report["gauges"]


async def test_without_tracing_a_report_holds_rss_and_the_gauges(tmp_path):
    was_tracing = tracemalloc.is_tracing()
    profiler = MemoryProfiler(tmp_path / "profile.jsonl", interval=3600, top=10, frames=1, trace=False)
    profiler.start_tracing()
    assert tracemalloc.is_tracing() == was_tracing  # MEMORY_PROFILE_TRACE=false starts no tracing
    report = await profiler.report()
    assert report["rss"] > 0 and report["sites"] == [] and "streamspine_rocksdb_databases" in report["gauges"]


async def test_sigusr2_asks_the_running_profiler_for_a_report(tmp_path):
    settings = MemorySettings(memory_profile=3600)
    was_tracing = tracemalloc.is_tracing()
    task = asyncio.ensure_future(profile_memory(tmp_path, settings))
    path = tmp_path / memory.PROFILE_FILE
    try:
        for _ in range(100):
            await asyncio.sleep(0.01)  # the profiler installs its handler
            if asyncio.get_running_loop()._signal_handlers.get(signal.SIGUSR2):
                break
        os.kill(os.getpid(), signal.SIGUSR2)
        for _ in range(1000):
            if path.exists() and path.read_text().endswith("\n"):
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if not was_tracing:
            tracemalloc.stop()
    assert json.loads(path.read_text().splitlines()[0])["baseline"] is True
    assert signal.SIGUSR2 not in asyncio.get_running_loop()._signal_handlers  # given back when it stops
