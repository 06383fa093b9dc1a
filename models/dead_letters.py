"""Records of the dead-letter mechanism shared by every agent."""

from __future__ import annotations

import faust


class DeadLetter(faust.Record, serializer="json"):
    """Notice that a record was refused; the record itself went to ``<topic>.dlq``."""

    source_topic: str
    partition: int
    offset: int
    reason: str
    at: float


class DeadLetterStats(faust.Record, serializer="json"):
    """How many records of one source topic were dead-lettered, and the latest reason."""

    count: int = 0
    last_reason: str = ""
    last_partition: int = -1
    last_offset: int = -1
    last_at: float = 0.0
