"""Counts dead letters per source topic and serves the counts."""

from __future__ import annotations

import faust
from faust import web
from faust.types import StreamT

from app import app
from app.dead_letters import dead_letter_notices
from app.settings import Settings
from models.dead_letters import DeadLetter, DeadLetterStats
from tables.dead_letters import dead_letter_counts


@app.agent(dead_letter_notices)
async def count_dead_letters(notices: StreamT[DeadLetter]) -> None:
    """dead-letters -> dead_letter_counts[source topic]."""
    async for notice in notices:
        stats = dead_letter_counts[notice.source_topic]
        dead_letter_counts[notice.source_topic] = DeadLetterStats(
            count=stats.count + 1,
            last_reason=notice.reason,
            last_partition=notice.partition,
            last_offset=notice.offset,
            last_at=notice.at,
        )


@app.page("/dead-letters/{topic}/")
@app.table_route(table=dead_letter_counts, match_info="topic")
async def dead_letters_of_topic(view: web.View, request: web.Request, topic: str) -> web.Response:
    """How many records of ``topic`` went to ``<topic>.dlq``, and the latest reason."""
    if topic not in dead_letter_counts:
        raise view.NotFound("no dead letters for this topic", topic=topic)
    return view.json({"topic": topic, "dlq_topic": topic + ".dlq", **dead_letter_counts[topic].asdict()})


def register(app: faust.App, settings: Settings) -> None:
    """Nothing to set up: counting dead letters needs no file, client or setting."""
