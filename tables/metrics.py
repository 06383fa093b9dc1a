"""Monitoring state, keyed by service name (the key of the ``metrics`` topic)."""
from __future__ import annotations

from app import app, settings

latest_samples = app.Table(
    "metrics_latest",
    # Raw UTF-8 keys, like the topic keys: a str key type would be JSON-encoded and hash to
    # another partition than the source record, so @app.table_route would ask the wrong worker.
    key_type=bytes,
    default=dict,
    partitions=settings.topic_partitions,
    help="Per service: the latest value of each metric per instance, and the sample count.",
)
