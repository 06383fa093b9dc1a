"""Log statistics. Both tables are co-partitioned with the internal ``log-counts`` topic (key:
service name as raw bytes), so one worker owns all of a service's statistics."""

from __future__ import annotations

from app import app, settings

log_stats = app.Table(
    "log_stats",
    key_type=bytes,
    default=dict,
    partitions=settings.topic_partitions,
    help="Per service: tumbling LOG_STATS_WINDOW windows of line counts per level, the last counted "
    "offset per source partition (so redelivered records are not counted twice) and the last window "
    "whose log_error_rate sample was sent.",
)

recent_lines = app.Table(
    "log_recent",
    key_type=bytes,
    default=list,
    partitions=settings.topic_partitions,
    help="Per service: the latest LOG_RECENT_LIMIT lines, newest first.",
)
