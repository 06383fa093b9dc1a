"""The tables of the worker: Faust's tables with their changelog written in batches, and Faust's
RocksDB store without a full garbage collection per table on every rebalance.

``Table`` (the app's ``Table`` setting, so ``app.Table`` makes one) reads a key with one store
lookup instead of two, and hands each write's changelog
record to the producer buffer of app/transport.py, which sends the records of one turn of the
event loop as one record batch per changelog partition, and records the persisted offset once per
batch; Faust sends each as its own message (a ``FutureMessage``, a buffer entry, an aiokafka
``send`` and a RocksDB write of the offset each: about half of a table write). The records are
the bytes Faust would send (the changelog topic's own key and value serialization), so recovery,
standbys and Faust's changelog readers see the same. A producer that is not started (Faust's
``test_context``), a threaded producer or transactions keep Faust's path.

Registered through Faust's own extension point (the ``faust.stores`` entry point in
pyproject.toml) under the URL scheme ``streamspine-rocksdb://``; ``STORE=rocksdb://`` selects it
(app/settings.py). ``STORE=memory://`` is unchanged.

Faust's ``rocksdb.Store.revoke_partitions`` ends with ``gc.collect()``, on every rebalance, for
every table, whether or not it gave up a partition (it drops revoked databases and relies on the
collector to release their file locks). A full collection of this worker's heap takes 0.3 s on an
idle core (200k objects: scikit-learn, the Elasticsearch and PostgreSQL clients...) and up to 0.6 s
on a busy one, so with 16 tables one rebalance blocked the event loop 5-9 s: longer than the 6 s
session timeout, so the group expelled the worker, which rejoined, rebalanced again, and so on
(measured: two workers after a SIGKILL did not settle in 120 s). Here a store collects only when it
actually released a database, and the whole worker at most once per rebalance generation. A
released database has no other reference, so reference counting frees it (and its lock) at once;
the one collection per generation keeps Faust's safety net for a database caught in a cycle.

Memory (docs/memory.md): Faust opens every table partition's database with its own 2 GiB block
cache and memtables of 64 MiB (up to 3). A memtable takes every write, an overwrite of the same key
too, until it is full, so with 16 tables x 8 partitions the worker's RSS grew with the bytes
written, by tens of MiB a minute, towards 128 x 64 MiB (bench/RESULTS.md, "Memory"). Here all
databases of the worker share ONE block cache of ``ROCKSDB_CACHE_MB``, which also holds the index
and filter blocks (otherwise kept per open file) and is charged with the memtables, whose sum a
write buffer manager keeps under ``ROCKSDB_WRITE_BUFFERS_MB`` by flushing the memtable of the
database being written. A database's own memtable flushes at ``WRITE_BUFFER_BYTES``, and grows in
arena blocks of ``ARENA_BLOCK_BYTES`` (RocksDB's default is 1 MiB: one per written database).
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional, Set, cast

import faust
from faust.stores import rocksdb
from faust.types import TP, CollectionT
from faust.utils import json as faust_json
from mode import Service
from mode.utils.compat import want_bytes

from app import memory
from app.gauges import register_value
from app.transport import ProducerBuffer

MIB = 1024 * 1024
WRITE_BUFFER_BYTES = 8 * MIB  # one database's memtable flushes at this size (Faust: 64 MiB)
MAX_WRITE_BUFFERS = 2  # the memtable being written and one being flushed (Faust: 3)
MEMTABLE_FLUSH_INTERVAL = 300.0  # seconds between flushes of every database (Store.flush_memtables)
ARENA_BLOCK_BYTES = 256 * 1024  # memtable allocation unit (RocksDB: 1 MiB per written database)


class SharedMemory(NamedTuple):
    """The block cache and write buffer manager every database of this process uses."""

    cache: Any
    write_buffers: Any


@lru_cache(maxsize=1)
def shared_memory(cache_bytes: int, write_buffer_bytes: int) -> SharedMemory:
    """Created once per process: the cache must outlive every database that uses it."""
    cache = rocksdb.rocksdict.Cache(cache_bytes)
    manager = rocksdb.rocksdict.WriteBufferManager.new_write_buffer_manager_with_cache(write_buffer_bytes, False, cache)
    return SharedMemory(cache, manager)


def worker_shared_memory() -> SharedMemory:
    settings = memory.memory_settings
    return shared_memory(settings.rocksdb_cache_mb * MIB, settings.rocksdb_write_buffers_mb * MIB)


class BoundedRocksDBOptions(rocksdb.RocksDBOptions):
    """Faust's RocksDB options, with the worker-wide memory bounds of the module docstring."""

    write_buffer_size = WRITE_BUFFER_BYTES
    max_write_buffer_number = MAX_WRITE_BUFFERS

    def open(self, path: Path, *, read_only: bool = False) -> Any:
        """Faust's database, written without RocksDB's write-ahead log (see ``Store``)."""
        db = super().open(path, read_only=read_only)
        if self.use_rocksdict:
            write_options = rocksdb.rocksdict.WriteOptions()
            write_options.disable_wal = True  # type: ignore[method-assign,assignment]  # a property; the stub says method
            db.set_write_options(write_options)
        return db

    def as_options(self) -> Any:
        if not self.use_rocksdict:  # python-rocksdb (not installed here): Faust's options
            return super().as_options()
        rocksdict = rocksdb.rocksdict
        shared = worker_shared_memory()
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        options.set_max_open_files(cast(int, self.max_open_files))  # Faust's default is a number
        options.set_write_buffer_size(self.write_buffer_size)
        options.set_max_write_buffer_number(self.max_write_buffer_number)
        options.set_arena_block_size(ARENA_BLOCK_BYTES)
        options.set_target_file_size_base(self.target_file_size_base)
        options.set_write_buffer_manager(shared.write_buffers)
        table = rocksdict.BlockBasedOptions()
        table.set_bloom_filter(self.bloom_filter_size, True)
        table.set_block_cache(shared.cache)
        table.set_cache_index_and_filter_blocks(True)
        table.set_pin_l0_filter_and_index_blocks_in_cache(True)
        table.set_index_type(rocksdict.BlockBasedIndexType.binary_search())
        options.set_block_based_table_factory(table)
        return options


_collected_in_generation: Optional[int] = None


def collect_once_per_generation(generation_id: int) -> bool:
    """Run a full collection unless one already ran for this rebalance generation."""
    global _collected_in_generation
    if _collected_in_generation == generation_id:
        return False
    _collected_in_generation = generation_id
    gc.collect()
    return True


_stores: "weakref.WeakSet[Store]" = weakref.WeakSet()


def open_databases() -> Iterator[Any]:
    """Every RocksDB database the worker's tables have open."""
    for store in list(_stores):
        yield from list(store._dbs.values())


def rocksdb_property_total(name: str) -> int:
    """The sum of an integer RocksDB property over every open database."""
    return sum(db.property_int_value(name) or 0 for db in open_databases())


register_value("streamspine_rocksdb_databases", "Open RocksDB databases.", lambda: sum(1 for _ in open_databases()))
register_value(
    "streamspine_rocksdb_memtables_bytes",
    "Bytes in the memtables of every open database.",
    lambda: rocksdb_property_total("rocksdb.size-all-mem-tables"),
)
register_value(
    "streamspine_rocksdb_table_readers_bytes",
    "Bytes of table readers (indexes, filters) of every open database.",
    lambda: rocksdb_property_total("rocksdb.estimate-table-readers-mem"),
)
register_value(
    "streamspine_rocksdb_block_cache_bytes", "Bytes used of the shared block cache.", lambda: worker_shared_memory().cache.get_usage()
)
register_value(
    "streamspine_rocksdb_write_buffers_bytes",
    "Bytes counted by the shared write-buffer manager.",
    lambda: worker_shared_memory().write_buffers.get_usage(),
)


def encode_plain_json(value: Any) -> bytes:
    """What Faust's ``json`` serializer makes of a plain value."""
    return want_bytes(faust_json.dumps(value))


class Table(faust.Table):
    """Faust's table, its changelog records sent in batches (see the module docstring), and read
    with one store lookup: Faust's ``table[key]`` asks the store ``key in data`` and then
    ``data[key]``, two RocksDB reads of the key."""

    def __getitem__(self, key: Any) -> Any:
        self.on_key_get(key)
        try:
            return self.data[key]
        except KeyError:
            return self.__missing__(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        """A write encoded once: the bytes the store keeps are the changelog record's (recovery
        puts the changelog's bytes into the store as they are)."""
        store = self.data
        if not isinstance(store, Store) or (partition := self._batched_partition(key)) is None:
            return super().__setitem__(key, value)
        key_bytes, value_bytes = store._encode_key(key), store._encode_value(value)
        self._send_changelog_bytes(partition, key_bytes, value_bytes)
        self._maybe_set_key_ttl(key, partition)
        self._sensor_on_set(self, key, value)
        store._set(key_bytes, value_bytes)

    def on_key_set(self, key: Any, value: Any) -> None:
        partition = self._batched_partition(key)
        if partition is None:
            return super().on_key_set(key, value)
        self._send_batched(partition, key, value, self.value_serializer)
        self._maybe_set_key_ttl(key, partition)
        self._sensor_on_set(self, key, value)

    def on_key_del(self, key: Any) -> None:
        partition = self._batched_partition(key)
        if partition is None:
            return super().on_key_del(key)
        self._send_batched(partition, key, None, "raw")
        self._maybe_del_key_ttl(key, partition)
        self._sensor_on_del(self, key)

    changelog_buffer: Optional[ProducerBuffer] = None  # set once this worker's writes may go in batches

    def _batched_partition(self, key: Any) -> Optional[int]:
        """The changelog partition of a write that can go in a batch, else None (Faust's path)."""
        if self.changelog_buffer is None:
            self.changelog_buffer = self._batching_buffer()
            if self.changelog_buffer is None:
                return None
        return self.partition_for_key(key)  # the current event's (raises outside an event, as Faust)

    def _batching_buffer(self) -> Optional[ProducerBuffer]:
        app = self.app
        buffer = app.producer.buffer
        if not isinstance(buffer, ProducerBuffer) or buffer.threaded or app.in_transaction:
            return None
        if getattr(app.producer, "_producer", None) is None:  # not started: Faust's test_context
            return None
        return buffer

    def _send_batched(self, partition: int, key: Any, value: Any, value_serializer: Any) -> None:
        key_bytes, _ = self.changelog_topic.prepare_key(key, self.key_serializer)
        value_bytes, _ = self.changelog_topic.prepare_value(value, value_serializer)
        self._send_changelog_bytes(partition, key_bytes, value_bytes)

    def _send_changelog_bytes(self, partition: int, key: Optional[bytes], value: Optional[bytes]) -> None:
        tp = TP(self.changelog_topic.get_topic_name(), partition)
        cast(ProducerBuffer, self.changelog_buffer).send_changelog(tp, key, value, self._on_changelog_batch_sent)

    def _on_changelog_batch_sent(self, tp: TP, offset: int) -> None:
        self.data.set_persisted_offset(tp, offset)


PLAIN_JSON_TYPES = (dict, list, str, int, float, bool, type(None))


class Store(rocksdb.Store):
    """RocksDB store: see the module docstring. A table of schemaless JSON values (no value type,
    the ``json`` serializer: every table here) encodes and decodes them with Faust's own JSON
    functions directly, not through its serializer registry (codec lookup, payload preparation,
    the model-tag check: most of a table read's cost); a value that is a model, or that carries
    Faust's model tag, takes Faust's path.

    Its databases are written without RocksDB's write-ahead log: a table's durable copy is its
    changelog topic, and each database keeps the changelog offset it holds (Faust's persisted
    offset, written after the records up to it), so after a crash RocksDB reopens at its last
    flushed memtable, a consistent prefix of the writes with an older offset, and Faust's recovery
    reads the changelog from there. The log cost a ``write`` call per table write, 12 us each
    under load here (a sixth of the migration comparison). A clean stop flushes the memtables, and
    so does ``flush_memtables`` every MEMTABLE_FLUSH_INTERVAL."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rocksdb_options = BoundedRocksDBOptions(**(self.options or {}), use_rocksdict=self.use_rocksdict)
        self.plain_json = self.value_type is None and (self.value_serializer or self.app.conf.value_serializer) == "json"
        self.raw_keys = self.key_type is bytes  # Faust's registry passes such keys through as they are
        _stores.add(self)

    def _encode_key(self, key: Any) -> bytes:
        if self.raw_keys and type(key) is bytes:
            return key
        return super()._encode_key(key)

    def _encode_value(self, value: Any) -> Optional[bytes]:
        if self.plain_json and type(value) in PLAIN_JSON_TYPES:
            return encode_plain_json(value)
        return super()._encode_value(value)

    def _decode_value(self, value: Optional[bytes]) -> Any:
        if self.plain_json and value is not None:
            try:
                decoded = faust_json.loads(cast(str, value))  # orjson reads bytes
            except ValueError:
                return super()._decode_value(value)  # Faust's error
            if type(decoded) is not dict or faust.Record._blessed_key not in decoded:
                return decoded
        return super()._decode_value(value)

    @Service.timer(MEMTABLE_FLUSH_INTERVAL)
    async def _flush_memtables_now_and_then(self) -> None:
        await self.flush_memtables()

    async def flush_memtables(self) -> None:
        """Write every database's memtable to disk (in a thread: RocksDB is thread-safe). Without a
        write-ahead log a crash loses what they hold and recovery replays it from the changelog;
        kept to minutes, that replay never reaches back past what compaction keeps of the
        changelog (a deleted key's tombstone lives ``delete.retention.ms``, a day by default)."""
        for db in list(self._dbs.values()):
            await asyncio.to_thread(db.flush)

    async def on_rebalance(
        self,
        assigned: Set[TP],
        revoked: Set[TP],
        newly_assigned: Set[TP],
        generation_id: int = 0,
    ) -> None:
        self.rebalance_ack = False
        async with self.db_lock:
            if self.release_partitions(self.table, revoked):
                collect_once_per_generation(generation_id)
            await self.assign_partitions(self.table, newly_assigned, generation_id)

    def release_partitions(self, table: CollectionT, tps: Set[TP]) -> int:
        """Drop the databases of revoked partitions; returns how many were open."""
        released = 0
        for tp in tps:
            if tp.topic in table.changelog_topic.topics and self._dbs.pop(tp.partition, None) is not None:
                self.logger.info("released db %s partition %s", tp.topic, tp.partition)
                released += 1
        return released

    def revoke_partitions(self, table: CollectionT, tps: Set[TP]) -> None:
        """Faust's entry point, kept for callers outside a rebalance: release, then collect."""
        if self.release_partitions(table, tps):
            gc.collect()
