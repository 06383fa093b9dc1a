"""Migration state. Keys are raw bytes like the topics' keys (order ids, request ids), so each
table is co-partitioned with the topic whose agent writes it. ``migration_partitions`` holds one
record per source partition (``bridge:<n>``, ``compare:<n>``, ``router:<n>``, ``phase:<n>``),
written under an event of partition n, so it lives in that partition's store.

Three tables, not one per concern: every table partition is a RocksDB database that a worker
opens on each rebalance (about 30 ms each here), so tables are kept few."""

from __future__ import annotations

from app import app, settings

order_events = app.Table(
    "migration_orders",
    key_type=bytes,
    default=dict,
    partitions=settings.topic_partitions,
    help="Per order id: the latest V1 event ids already translated to orders.v2 (the bridge's "
    "idempotency), V1 ids not yet seen on orders.v2 and V2 ids not yet seen on orders.v1 with when "
    "they were first seen, and how many ids were reconciled.",
)

pending_results = app.Table(
    "migration_pending_results",
    key_type=bytes,
    default=dict,
    partitions=settings.topic_partitions,
    help="Per request id: the result of the system that answered first, waiting for the other within "
    "MIGRATION_COMPARE_WINDOW, then a short-lived 'compared' marker so a replayed result is not compared twice.",
)

partition_state = app.Table(
    "migration_partitions",
    key_type=bytes,
    default=dict,
    partitions=settings.topic_partitions,
    help="Per source partition: bridge, router and comparison counters, per-field mismatch counts and "
    "recent mismatch samples, and (phase:<n>) the phase markers seen on orders.commands with their "
    "offsets, so a replayed command is routed by the phase in force at its offset.",
)
