"""Dead-letter counts per source topic."""

from __future__ import annotations

from app import app, settings
from models.dead_letters import DeadLetterStats

dead_letter_counts = app.Table(
    "dead_letter_counts",
    # Raw UTF-8 keys, like the topic keys: a str key type would be JSON-encoded and hash to
    # another partition than the source record, so @app.table_route would ask the wrong worker.
    key_type=bytes,
    value_type=DeadLetterStats,
    default=DeadLetterStats,
    partitions=settings.topic_partitions,
    help="Per source topic: how many records were dead-lettered and the latest reason.",
)
