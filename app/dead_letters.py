"""The one dead-letter mechanism every agent uses for records it cannot decode or validate.

The refused record is produced unchanged (original key and value bytes) to ``<source-topic>.dlq``
with the reason and its origin in headers, the convention of Kafka Connect's DLQ, so it can be
inspected or replayed as it was. A reason is cut at MAX_REASON_CHARS; a record whose copy would not
fit in a produce request (a value near Kafka's 1 MB limit plus the headers) goes without its value,
marked ``dlq.value-dropped``: its origin headers say where to read it while retention keeps it. A ``DeadLetter`` notice keyed by the source topic goes to the
``dead-letters`` topic, where one agent counts it (``agents/dead_letters.py``).
"""

from __future__ import annotations

import logging
import time
from typing import Dict, Optional, Tuple

import faust
from faust.types import EventT, TopicT

from app import app
from app.topics import batch_topic
from models.dead_letters import DeadLetter

log = logging.getLogger(__name__)

DLQ_SUFFIX = ".dlq"
MAX_REASON_CHARS = 4096
RECORD_OVERHEAD = 512  # bytes of a produce request besides the key, value and headers (generous)

# DeadLetter notices as JSON bytes, decoded (and checked) by agents/dead_letters.py.
dead_letter_notices = batch_topic("dead-letters", key_type=str, value_type=bytes, value_serializer="raw")

_dlq_topics: Dict[str, TopicT] = {}


async def _dlq_topic_for(source_topic: str) -> TopicT:
    topic = _dlq_topics.get(source_topic)
    if topic is None:
        topic = app.topic(
            source_topic + DLQ_SUFFIX,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
        )
        await topic.maybe_declare()
        _dlq_topics[source_topic] = topic
    return topic


def dead_letter_headers(event: EventT, reason: str) -> Dict[str, bytes]:
    """Headers that say where a dead letter came from and why it was refused."""
    message = event.message
    return {
        "dlq.reason": reason.encode("utf-8", "replace"),
        "dlq.topic": message.topic.encode(),
        "dlq.partition": str(message.partition).encode(),
        "dlq.offset": str(message.offset).encode(),
    }


def short_reason(reason: str) -> str:
    """A reason of at most MAX_REASON_CHARS (a record of thousands of refused lines has a long one)."""
    if len(reason) <= MAX_REASON_CHARS:
        return reason
    return f"{reason[:MAX_REASON_CHARS]}... ({len(reason) - MAX_REASON_CHARS} more characters)"


def dead_letter_record(event: EventT, reason: str, max_bytes: int) -> Tuple[Optional[bytes], Optional[bytes], Dict[str, bytes]]:
    """Key, value and headers of a refused record's DLQ copy (see the module docstring)."""
    message = event.message
    headers = dead_letter_headers(event, reason)
    key, value = message.key, message.value
    size = RECORD_OVERHEAD + len(key or b"") + len(value or b"") + sum(len(k) + len(v) for k, v in headers.items())
    if size > max_bytes:
        headers["dlq.value-dropped"] = f"{len(value or b'')} bytes: too large to copy with the headers".encode()
        value = None
    return key, value, headers


async def dead_letter(reason: str, event: Optional[EventT] = None) -> None:
    """Send the current (or given) event's original record to its DLQ topic and count it."""
    event = event or faust.current_event()
    if event is None:
        raise RuntimeError("dead_letter() needs an event: call it from inside an agent")
    message = event.message
    reason = short_reason(reason)
    log.warning("dead letter from %s[%s]@%s: %s", message.topic, message.partition, message.offset, reason)
    topic = await _dlq_topic_for(message.topic)
    key, value, headers = dead_letter_record(event, reason, app.conf.producer_max_request_size)
    await topic.send(key=key, value=value, headers=headers)
    await dead_letter_notices.send(
        key=message.topic,
        value=DeadLetter(
            source_topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            reason=reason,
            at=time.time(),
        ).dumps(),
    )
