"""app/stores.py: a rebalance runs at most one full garbage collection, and only when a table
actually released a database (Faust's store runs one per table on every rebalance)."""
from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path
from typing import List

import faust
from faust.types import TP

from app.stores import BoundedRocksDBOptions, Store


async def test_rebalance_collects_once_per_generation_and_only_after_releasing(tmp_path):
    app = faust.App("stores-test", store="streamspine-rocksdb://", datadir=str(tmp_path), topic_partitions=2)
    tables = [app.Table(f"t{i}", partitions=2) for i in range(3)]
    stores = [table.data for table in tables]
    assert all(isinstance(store, Store) for store in stores)
    for store in stores:
        store._db_for_partition(0)
        store._db_for_partition(1)

    async def rebalance(generation: int, revoked_partition=None):
        for table, store in zip(tables, stores):
            topic = table.changelog_topic.get_topic_name()
            revoked = {TP(topic, revoked_partition)} if revoked_partition is not None else set()
            await store.on_rebalance(set(), revoked, set(), generation_id=generation)

    count: List[int] = []
    gc.callbacks.append(lambda phase, info: count.append(1) if phase == "start" and info["generation"] == 2 else None)
    try:
        await rebalance(1)
        assert count == []  # nothing released: no collection (Faust's store: one per table)
        await rebalance(2, revoked_partition=0)  # every table releases partition 0
        assert len(count) == 1
        assert all(0 not in store._dbs and 1 in store._dbs for store in stores)
    finally:
        gc.callbacks.pop()


class Tagged(faust.Record, serializer="json"):
    name: str


def test_plain_json_values_are_stored_as_fausts_json_serializer_writes_them(tmp_path):
    app = faust.App("stores-codec-test", store="streamspine-rocksdb://", datadir=str(tmp_path), topic_partitions=1)
    store = app.Table("plain", partitions=1, key_type=bytes).data
    values = [{"ids": ["e-1", "é"], "at": 1.5, "n": 2**63 - 1, "nested": {"ok": True, "none": None}}, [1, "two"], "text", 7]
    for value in values:
        encoded = store._encode_value(value)
        assert encoded == app.serializers.dumps_value(None, value, serializer="json")
        assert store._decode_value(encoded) == value
    tagged = store._decode_value(Tagged(name="x").dumps())  # a model's tag: Faust's path rebuilds it
    assert tagged == Tagged(name="x")


WRITER = """
import os, sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from app.stores import BoundedRocksDBOptions
db = BoundedRocksDBOptions(use_rocksdict=True).open(Path({path!r}))
for n in range(100):
    db.put(b"key-%d" % n, b"value")
if {close}:
    db.close()
os._exit(0)
"""


def written_then_reopened(tmp_path, close: bool) -> int:
    """Keys a process wrote through the project's options and that a new process finds."""
    path = tmp_path / ("closed" if close else "killed")
    code = WRITER.format(repo=str(Path(__file__).resolve().parents[2]), path=str(path), close=close)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    db = BoundedRocksDBOptions(use_rocksdict=True).open(path)
    try:
        return sum(1 for _ in db.keys())
    finally:
        db.close()


def test_table_databases_have_no_write_ahead_log_and_keep_what_a_clean_stop_flushed(tmp_path):
    # The changelog topic is a table's durable copy (recovery reads it from the persisted offset,
    # which is in the same database): RocksDB's own log only cost a write call per table write.
    assert written_then_reopened(tmp_path, close=False) == 0  # a crash loses the memtable, not the changelog
    assert written_then_reopened(tmp_path, close=True) == 100


async def test_the_store_writes_its_memtables_to_disk_on_its_timer(tmp_path):
    app = faust.App("stores-flush-test", store="streamspine-rocksdb://", datadir=str(tmp_path), topic_partitions=2)
    store = app.Table("flushed", partitions=2, key_type=bytes).data
    for partition in (0, 1):
        store._db_for_partition(partition).put(b"key", b"value")

    def in_memtables() -> int:
        return sum(db.property_int_value("rocksdb.num-entries-active-mem-table") for db in store._dbs.values())

    assert in_memtables() == 2
    await store.flush_memtables()
    assert in_memtables() == 0


def test_a_table_read_asks_the_store_once(tmp_path, monkeypatch):
    app = faust.App("stores-read-test", store="streamspine-rocksdb://", Table="app.stores:Table", datadir=str(tmp_path),
                    topic_partitions=1)
    table = app.Table("reads", partitions=1, key_type=bytes, default=dict)
    store = table.data
    store._db_for_partition(0).put(b"order", store._encode_value({"ids": ["e-1"]}))
    monkeypatch.setattr("faust.stores.rocksdb.current_event", lambda: None)  # not an event an earlier test left current
    asked: List[bytes] = []
    monkeypatch.setattr(store, "_contains", lambda key: asked.append(key) or True)  # Faust's first of two lookups

    assert table[b"order"] == {"ids": ["e-1"]}
    assert table[b"no such order"] == {}  # the default
    assert asked == []
