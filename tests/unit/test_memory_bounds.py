"""The worker's memory bounds (docs/memory.md) and the opt-in heap profiler (app/memory.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tracemalloc
from typing import List

import faust
import pytest
from pydantic import ValidationError

from app import memory, stores
from app.memory import MemoryProfiler, MemorySettings, gauge_values, profile_memory, register_gauge
from app.stores import ARENA_BLOCK_BYTES, MIB, Store

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


# --- the profiler ------------------------------------------------------------------------------------


async def test_the_profiler_is_off_by_default(tmp_path):
    was_tracing = tracemalloc.is_tracing()
    await profile_memory(tmp_path, MemorySettings())  # returns at once
    assert tracemalloc.is_tracing() == was_tracing
    assert not (tmp_path / memory.PROFILE_FILE).exists()


def test_a_failing_gauge_reads_minus_one_instead_of_stopping_the_report():
    register_gauge("test.broken", lambda: 1 / 0)
    register_gauge("test.records", lambda: 42)
    values = gauge_values()
    assert values["test.broken"] == -1.0 and values["test.records"] == 42.0


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
    assert report["rss"] > 0 and "rocksdb.memtables_bytes" in report["gauges"]


async def test_without_tracing_a_report_holds_rss_and_the_gauges(tmp_path):
    was_tracing = tracemalloc.is_tracing()
    profiler = MemoryProfiler(tmp_path / "profile.jsonl", interval=3600, top=10, frames=1, trace=False)
    profiler.start_tracing()
    assert tracemalloc.is_tracing() == was_tracing  # MEMORY_PROFILE_TRACE=false starts no tracing
    report = await profiler.report()
    assert report["rss"] > 0 and report["sites"] == [] and "rocksdb.databases" in report["gauges"]


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
