"""Records of the dead-letter mechanism shared by every agent."""

from __future__ import annotations

import math
from typing import Any

import faust
import orjson


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


class InvalidNotice(ValueError):
    """A ``dead-letters`` record that is not a DeadLetter notice."""


def dead_letter_from_json(raw: Any) -> DeadLetter:
    """A DeadLetter read back from ``dead-letters``, every field checked (InvalidNotice otherwise)."""
    if not isinstance(raw, (bytes, str)):
        raise InvalidNotice("not a JSON document")
    data = orjson.loads(raw)
    if data.__class__ is not dict:
        raise InvalidNotice("not a JSON object")
    topic, partition, offset, reason, at = (data.get(name) for name in ("source_topic", "partition", "offset", "reason", "at"))
    if not isinstance(topic, str) or not topic:
        raise InvalidNotice("source_topic: not a non-empty string")
    if partition.__class__ is not int or offset.__class__ is not int:
        raise InvalidNotice("partition, offset: not integers")
    if not isinstance(reason, str):
        raise InvalidNotice("reason: not a string")
    if at.__class__ not in (int, float) or not math.isfinite(at):
        raise InvalidNotice("at: not a time")
    return DeadLetter(source_topic=topic, partition=partition, offset=offset, reason=reason, at=float(at))
