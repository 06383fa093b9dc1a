"""app/stores.py: a rebalance runs at most one full garbage collection, and only when a table
actually released a database (Faust's store runs one per table on every rebalance)."""
from __future__ import annotations

import gc
from typing import List

import faust
from faust.types import TP

from app.stores import Store


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
