"""Change data capture state. Both tables are written only under an event of a CDC topic, so each
entry lives in the partition of the records it summarises (all CDC topics have TOPIC_PARTITIONS).

``cdc_rows`` is keyed by the record key bytes (the primary key as JSON, as on the topic), so
``@app.table_route``-style routing by that key reaches the worker that owns the row. Two tables
can share a primary key value, so the value maps ``schema.table`` to that table's row.
"""

from __future__ import annotations

from app import app, settings

cdc_rows = app.Table(
    "cdc_rows",
    key_type=bytes,
    default=dict,
    partitions=settings.topic_partitions,
    help="Per primary key (JSON bytes): {schema.table: {lsn, op, ts_ms, row}}; row is null after a delete.",
)

cdc_table_stats = app.Table(
    "cdc_table_stats",
    key_type=bytes,
    default=dict,
    partitions=settings.topic_partitions,
    help="Per schema.table#partition: change counts by op, last applied LSN per sink, last lag in ms.",
)
