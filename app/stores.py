"""The table store of the worker: Faust's RocksDB store without a full garbage collection per table
on every rebalance.

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
"""
from __future__ import annotations

import gc
from typing import Optional, Set

from faust.stores import rocksdb
from faust.types import TP, CollectionT

_collected_in_generation: Optional[int] = None


def collect_once_per_generation(generation_id: int) -> bool:
    """Run a full collection unless one already ran for this rebalance generation."""
    global _collected_in_generation
    if _collected_in_generation == generation_id:
        return False
    _collected_in_generation = generation_id
    gc.collect()
    return True


class Store(rocksdb.Store):
    """RocksDB store: see the module docstring."""

    async def on_rebalance(
        self, assigned: Set[TP], revoked: Set[TP], newly_assigned: Set[TP], generation_id: int = 0,
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
