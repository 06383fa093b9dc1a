"""Recommendations state. User tables are co-partitioned with ``user-events`` (key: user id); item
tables with ``recs-item-updates`` and ``items`` (key: item id). Each is written only under an event of
its key's partition, so one worker owns all of a user's or an item's state."""

from __future__ import annotations

from app import app, settings

# Raw UTF-8 keys, like the topic keys: a str key type would be JSON-encoded and hash to another
# partition than the source record, so @app.table_route would ask the wrong worker.
recs_sessions = app.Table(
    "recs_sessions",
    key_type=bytes,
    default=dict,
    partitions=settings.topic_partitions,
    help="Per user: the current session's latest items [item, weight, ts, offset] (a new session after "
    "RECS_SESSION_TIMEOUT of inactivity or a new session_id) and the last source offset applied.",
)

recs_purchased = app.Table(
    "recs_purchased",
    key_type=bytes,
    default=dict,
    partitions=settings.topic_partitions,
    help="Per user: the latest purchased items, never recommended again.",
)

recs_item_stats = app.Table(
    "recs_item_stats",
    key_type=bytes,
    default=dict,
    partitions=settings.topic_partitions,
    help="Per item: time-decayed weight, time-decayed co-occurrence with its top RECS_NEIGHBOURS items, "
    "popularity panes of the trending window and the last source offset applied per partition.",
)

recs_item_meta = app.Table(
    "recs_item_meta",
    key_type=bytes,
    default=dict,
    partitions=settings.topic_partitions,
    help="Per item: category, price and availability from the 'items' topic.",
)
