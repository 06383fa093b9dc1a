"""Counts dead letters per source topic and serves the counts."""

from __future__ import annotations

import faust
from faust import web
from faust.types import EventT, StreamT

from app import app
from app.aggregation import BATCH_MAX, BATCH_WITHIN, enter_partition
from app.dead_letters import dead_letter_notices
from app.runtime import DecodedBatch, decoded_batches, until_applied
from app.settings import Settings
from models.dead_letters import DeadLetter, DeadLetterStats, dead_letter_from_json
from tables.dead_letters import dead_letter_counts


def decode_notice(event: EventT) -> DeadLetter:
    return dead_letter_from_json(event.value)


async def count_notices(stream: StreamT, batch: DecodedBatch[DeadLetter]) -> None:
    """dead_letter_counts[source topic] for each notice of a batch, in its partition."""
    for entry in batch:
        enter_partition(stream, entry.event)
        notice = entry.value
        stats = dead_letter_counts[notice.source_topic]
        dead_letter_counts[notice.source_topic] = DeadLetterStats(
            count=stats.count + 1,
            last_reason=notice.reason,
            last_partition=notice.partition,
            last_offset=notice.offset,
            last_at=notice.at,
        )


@app.agent(dead_letter_notices)
async def count_dead_letters(stream: StreamT) -> None:
    """dead-letters -> dead_letter_counts[source topic], on the runtime: a notice it cannot read is
    itself a dead letter (of ``dead-letters``), counted like any other."""
    async for batch in decoded_batches(stream, decode_notice, max_=BATCH_MAX, within=BATCH_WITHIN):
        await until_applied(count_notices, stream, batch, what="dead-letter counts")


@app.page("/dead-letters/{topic}/")
@app.table_route(table=dead_letter_counts, match_info="topic")
async def dead_letters_of_topic(view: web.View, request: web.Request, topic: str) -> web.Response:
    """How many records of ``topic`` went to ``<topic>.dlq``, and the latest reason."""
    if topic not in dead_letter_counts:
        raise view.NotFound("no dead letters for this topic", topic=topic)
    return view.json({"topic": topic, "dlq_topic": topic + ".dlq", **dead_letter_counts[topic].asdict()})


def register(app: faust.App, settings: Settings) -> None:
    """Nothing to set up: counting dead letters needs no file, client or setting."""
