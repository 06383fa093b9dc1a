"""Topics every job may use, and the one way to declare a topic of raw bytes.

Input topics carry raw key and value bytes: each agent decodes them itself (app/runtime.py), so a
record that does not decode is dead-lettered as it came. ``metrics`` is the platform's metric
sample contract: monitoring consumes it, and any job (logging's error rates) may publish to it.
"""

from __future__ import annotations

from typing import Any, Optional

from faust.types import TopicT

from app import app, settings
from app.transport import BatchTopic


class InvalidKey(ValueError):
    """A record key that is not UTF-8 text."""


def raw_topic(*names: str, partitions: Optional[int] = None) -> TopicT:
    """A topic of raw key and value bytes, created with TOPIC_PARTITIONS partitions (or
    ``partitions``) when it does not exist yet, read by its agents in batches (app/runtime.py)."""
    return batch_topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw", partitions=partitions)


def batch_topic(*names: str, partitions: Optional[int] = None, **options: Any) -> TopicT:
    """A topic its agents read with app/runtime.py (``decoded_batches``, ``held_batches``): each
    partition's fetched records reach them at once (app/transport.py's ``BatchTopic``)."""
    return BatchTopic(app, topics=list(names), partitions=partitions or settings.topic_partitions, internal=True, **options)


def key_text(key: Optional[bytes]) -> Optional[str]:
    """A record key as text (None for a keyless record); raises InvalidKey for one not UTF-8."""
    if key is None:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidKey(f"record key is not UTF-8: {key!r}") from None


# {"service", "instance", "metric", "value", "ts"} (or an array of them), keyed by service.
metrics_topic = raw_topic("metrics")
