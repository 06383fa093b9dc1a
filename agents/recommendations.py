"""Realtime recommendations.

user-events -> record_user_events -> recs_sessions, recs_purchased       (keyed by user)
                       │ one item update per touched item, keyed by item
                       ▼
           recs-item-updates -> record_item_updates -> recs_item_stats    (keyed by item)
items -> record_items -> recs_item_meta                                   (keyed by item)
recs_item_stats + recs_item_meta changelogs -> every worker's Catalogue (read outside the group)
leader timer: Catalogue -> TruncatedSVD item model -> recs-models -> every worker (DATA_DIR/recommendations)
Page: /recommendations/{user_id}/?k=10, answered by the worker owning the user.

Serving a user needs the neighbours of items that live on other workers' partitions: every worker
keeps a read replica of the item tables by following their changelog topics (the tables stay the
source of truth, written co-partitioned and recovered by Faust). The request is routed to the
user's owner, which scores the session from its local user tables, its replica and the latest model.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

from aiokafka import AIOKafkaConsumer, TopicPartition
from faust import web
from faust.types import EventT, TableT

from app import app, settings
from app.aggregation import BATCH_MAX, enter_partition
from app.dead_letters import dead_letter
from app.settings import bootstrap_servers
from models.recommendations import (
    Catalogue, InvalidModel, ItemEmbeddings, UserEvent, add_purchase, apply_item_update, fit_item_embeddings,
    item_updates, load_latest_model, model_from_bytes, model_to_bytes, parse_item, parse_item_updates,
    parse_user_event, recommend, save_model, update_session,
)
from models.metrics import InvalidRecord, key_text
from tables.recommendations import recs_item_meta, recs_item_stats, recs_purchased, recs_sessions

log = logging.getLogger(__name__)


def raw_topic(name: str, partitions: int = settings.topic_partitions):
    """A topic of raw bytes (decoded in the agent, so bad records can be dead-lettered as they came)."""
    return app.topic(
        name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
        partitions=partitions, internal=True,  # the worker creates it when it does not exist yet
    )


user_events_topic = raw_topic("user-events")
items_topic = raw_topic("items")
item_updates_topic = raw_topic("recs-item-updates")  # re-keys a user's event by the items it touches
models_topic = raw_topic("recs-models", partitions=1)  # the leader's item models (.npz of numbers, checked on load)

MODEL_DIR = settings.data_dir / "recommendations"
MAX_K = 100
MODEL_BYTES_BUDGET = 800_000  # Kafka's default largest record is 1 MB
RECS_BATCH_WITHIN = 0.02  # seconds a lone event waits for company: the next request should see it


# --- read replicas -------------------------------------------------------------------------------


Apply = Callable[[bytes, Optional[bytes]], None]


class TopicFollower:
    """Reads topics from the beginning (or only their last record), outside the consumer group, in
    one consumer, and hands each record to its topic's ``apply``; reconnects on errors.
    ``positions`` are the next offsets read per (topic, partition)."""

    def __init__(self, topics: Dict[Callable[[], str], Tuple[int, Apply]], latest_only: bool = False, fetch_wait_ms: Optional[int] = None) -> None:
        self.topics = topics  # topic name (resolved at start) -> (partitions, apply)
        self.latest_only = latest_only
        self.fetch_wait_ms = fetch_wait_ms or settings.consumer_fetch_wait_ms
        self.positions: Dict[Tuple[str, int], int] = {}
        self.caught_up = asyncio.Event()

    async def wait_caught_up(self, timeout: float = 10.0) -> None:
        """Wait (a bounded time) until what existed at start has been read."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.caught_up.wait(), timeout)

    async def follow(self) -> None:
        while True:
            try:
                await self._read()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the broker may be away; try again
                log.exception("following %s failed; retrying", [name() for name in self.topics])
                await asyncio.sleep(1.0)

    async def _read(self) -> None:
        applies = {name(): apply for name, (_partitions, apply) in self.topics.items()}
        partitions = [TopicPartition(name(), number) for name, (count, _apply) in self.topics.items() for number in range(count)]
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers(settings.kafka_broker), group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest", fetch_max_wait_ms=self.fetch_wait_ms, max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await consumer.start()
        try:
            consumer.assign(partitions)
            ends = await consumer.end_offsets(partitions)
            for partition in partitions:
                consumer.seek(partition, max(ends[partition] - 1, 0) if self.latest_only else 0)
            self._check_caught_up(ends)
            while True:
                batch = await consumer.getmany(timeout_ms=1000)
                for partition, records in batch.items():
                    for record in records:
                        self._apply(applies[partition.topic], record)
                        self.positions[(partition.topic, partition.partition)] = record.offset + 1
                self._check_caught_up(ends)
        finally:
            await consumer.stop()

    @staticmethod
    def _apply(apply: Apply, record: Any) -> None:
        try:
            apply(record.key, record.value)
        except Exception as error:  # noqa: BLE001 - one bad record must not stop the replica
            log.warning("ignoring a malformed record of %s at offset %s: %r", record.topic, record.offset, error)

    def _check_caught_up(self, ends: Dict[TopicPartition, int]) -> None:
        if not self.caught_up.is_set() and all(self.positions.get((tp.topic, tp.partition), 0) >= end for tp, end in ends.items()):
            self.caught_up.set()


class ModelHolder:
    """The latest item model: loaded from DATA_DIR at start, replaced by newer versions from recs-models."""

    def __init__(self) -> None:
        self.current: Optional[ItemEmbeddings] = load_latest_model(MODEL_DIR)
        if self.current is not None:
            log.info("serving item model version %s from %s", self.current.version, MODEL_DIR)

    def receive(self, key: Optional[bytes], value: Optional[bytes]) -> None:
        """A record of recs-models: a newer valid model replaces the current one; anything else is
        refused with the reason logged, and the current model goes on serving."""
        if not value:
            return
        try:
            model = model_from_bytes(value)
        except InvalidModel as error:
            serving = self.current.version if self.current else "none"
            log.error("refused a record of recs-models (%s bytes): %s; still serving model version %s", len(value), error, serving)
            return
        if self.current is None or model.version > self.current.version:
            save_model(model, MODEL_DIR)  # persisted before it serves: a restart serves it at once
            self.current = model
            log.info("item model version %s: %s items", model.version, len(model.items))


def json_value(value: Optional[bytes]) -> Optional[Dict[str, Any]]:
    return None if value is None else json.loads(value)


catalogue = Catalogue()
model_holder = ModelHolder()
item_follower = TopicFollower({
    recs_item_stats.changelog_topic.get_topic_name: (settings.topic_partitions, lambda key, value: catalogue.put_stats(key.decode(), json_value(value))),
    recs_item_meta.changelog_topic.get_topic_name: (settings.topic_partitions, lambda key, value: catalogue.put_meta(key.decode(), json_value(value))),
})
# Models are rare: a long fetch wait keeps this consumer from polling the broker 50 times a second
# when the worker runs with a short one (the local broker: app/local_broker.py WORKER_ENV).
model_follower = TopicFollower({models_topic.get_topic_name: (1, model_holder.receive)}, latest_only=True, fetch_wait_ms=500)


def catalogue_fingerprint() -> str:
    """Which item-table records the replica has read: the same data gives the same fingerprint."""
    return ",".join(f"{topic}:{partition}:{offset}" for (topic, partition), offset in sorted(item_follower.positions.items()))


# --- agents --------------------------------------------------------------------------------------


class UserBatch:
    """What a batch of user events changes: sessions and purchases per user (written once per user,
    under the user's latest event) and the item updates, grouped per item (one record per item)."""

    def __init__(self) -> None:
        self.sessions: Dict[str, Tuple[EventT, Dict[str, Any]]] = {}
        self.purchases: Dict[str, Tuple[EventT, Dict[str, Any]]] = {}
        self.item_updates: Dict[str, List[Dict[str, Any]]] = {}

    def session(self, user: str) -> Dict[str, Any]:
        return self.sessions[user][1] if user in self.sessions else recs_sessions[user]

    def purchased(self, user: str) -> Dict[str, Any]:
        return self.purchases[user][1] if user in self.purchases else recs_purchased[user]


async def observe_user_event(event: EventT, batch: UserBatch) -> None:
    """One user event: session and purchases (this partition), item updates (re-keyed by item)."""
    user = key_text(event.key)
    parsed: UserEvent = parse_user_event(event.value, user)
    if user is None:  # keyless: re-key by user, so the user's state lives in one partition
        await user_events_topic.send(key=parsed.user_id.encode(), value=event.value)
        return
    message = event.message
    update = update_session(batch.session(user), parsed, message.offset, settings.recs_session_timeout)
    for item, item_update in item_updates(parsed, update.previous_items, (message.partition, message.offset)).items():
        batch.item_updates.setdefault(item, []).append(item_update)
    if not update.replayed:
        batch.sessions[user] = (event, update.session)
    if parsed.event == "purchase":
        batch.purchases[user] = (event, add_purchase(batch.purchased(user), parsed.item_id))


async def guarded(event: EventT, handle: Callable[..., Any], *args: Any) -> None:
    """Run ``handle``; a record it refuses (or fails on) becomes a dead letter, the agent goes on."""
    try:
        await handle(event, *args)
    except InvalidRecord as error:
        await dead_letter(str(error), event)
    except Exception as error:  # noqa: BLE001 - bad input never kills the agent
        log.exception("failed on %s[%s]@%s", event.message.topic, event.message.partition, event.message.offset)
        await dead_letter(f"unexpected error: {error!r}", event)


def write_per_key(stream, table: TableT, pending: Dict[str, Tuple[EventT, Any]]) -> None:
    """``table[key] = value`` once per key, inside the key's latest event (its partition)."""
    for key, (event, value) in pending.items():
        enter_partition(stream, event)
        table[key] = value


@app.agent(user_events_topic)
async def record_user_events(stream) -> None:
    """user-events -> recs_sessions, recs_purchased; item updates -> recs-item-updates.

    Batched (app/aggregation.py): one record per touched item and one table write per user per batch.
    Item updates are sent before the sessions are written: a crash in between replays the events,
    and the item table drops the updates it has (by source offset).
    """
    async for events in stream.take_events(BATCH_MAX, within=RECS_BATCH_WITHIN):
        batch = UserBatch()
        for event in events:
            enter_partition(stream, event)
            await guarded(event, observe_user_event, batch)
        for item, updates in batch.item_updates.items():
            await item_updates_topic.send(key=item.encode(), value=json.dumps({"item": item, "updates": updates}).encode())
        write_per_key(stream, recs_sessions, batch.sessions)
        write_per_key(stream, recs_purchased, batch.purchases)


async def observe_item_updates(event: EventT, pending: Dict[str, Tuple[EventT, Dict[str, Any]]]) -> None:
    """Apply a record's updates to the item's stats; an update whose source offset is in already is dropped."""
    item = key_text(event.key)
    updates = parse_item_updates(event.value, item)
    stats = pending[item][1] if item in pending else recs_item_stats.get(item)
    changed = False
    for update in updates:
        applied = apply_item_update(stats, update, max_neighbours=settings.recs_neighbours)
        if applied is not None:
            stats, changed = applied, True
    if changed:
        pending[item] = (event, stats)


@app.agent(item_updates_topic)
async def record_item_updates(stream) -> None:
    """recs-item-updates -> recs_item_stats (co-occurrence, weight, trending panes), one write per item per batch."""
    async for events in stream.take_events(BATCH_MAX, within=RECS_BATCH_WITHIN):
        pending: Dict[str, Tuple[EventT, Dict[str, Any]]] = {}
        for event in events:
            enter_partition(stream, event)
            await guarded(event, observe_item_updates, pending)
        write_per_key(stream, recs_item_stats, pending)


async def observe_item(event: EventT) -> None:
    item = parse_item(event.value, key_text(event.key))
    recs_item_meta[item.item_id] = {"category": item.category, "price": item.price, "available": item.available}


@app.agent(items_topic)
async def record_items(stream) -> None:
    """items -> recs_item_meta."""
    async for event in stream.events():
        await guarded(event, observe_item)


@app.task
async def follow_item_tables() -> None:
    """Keep this worker's replica of every item's stats and metadata."""
    await item_follower.follow()


@app.task
async def follow_models() -> None:
    """Keep this worker's item model the latest one the leader published."""
    await models_topic.maybe_declare()
    await model_follower.follow()


_published_fingerprint: Optional[str] = None


@app.timer(settings.recs_refit_interval, on_leader=True)
async def refit_item_model() -> None:
    """Leader only: refit the item model when the item tables changed, publish it to recs-models."""
    global _published_fingerprint
    if not item_follower.caught_up.is_set() or not model_follower.caught_up.is_set():
        return
    fingerprint = catalogue_fingerprint()
    current = model_holder.current
    if fingerprint in (_published_fingerprint, current.fingerprint if current else None):
        return
    snapshot = catalogue.snapshot()
    version = (current.version if current else 0) + 1
    dims = settings.recs_embedding_dims
    # The model travels as one record: float16 row and column factors and coverage stay under ~800 KB.
    max_items = min(3000, MODEL_BYTES_BUDGET // (dims * 2 * 2 + 2))
    model = await asyncio.to_thread(fit_item_embeddings, snapshot, version, fingerprint, dims, max_items)
    if model is None:
        return
    delivery = await models_topic.send(key=b"model", value=await asyncio.to_thread(model_to_bytes, model))
    await delivery
    _published_fingerprint = fingerprint
    log.info("published item model version %s (%s items)", version, len(model.items))


# --- pages ---------------------------------------------------------------------------------------


def requested_k(raw: Optional[str]) -> int:
    """``k`` of the query string: an integer in 1..100, 10 when absent."""
    if raw is None:
        return 10
    try:
        k = int(raw)
    except ValueError:
        raise ValueError(f"k must be an integer in 1..{MAX_K}, got {raw!r}") from None
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an integer in 1..{MAX_K}, got {k}")
    return k


@app.page("/recommendations/{user_id}/")
@app.table_route(table=recs_sessions, match_info="user_id")
async def recommendations_for_user(view: web.View, request: web.Request, user_id: str) -> web.Response:
    """Top k items for the user's current session, answered by the worker that owns the user."""
    try:
        k = requested_k(request.query.get("k"))
    except ValueError as error:
        raise view.ValidationError(str(error))
    await item_follower.wait_caught_up()
    session = recs_sessions.get(user_id) or {}
    purchased = (recs_purchased.get(user_id) or {}).get("items", [])
    model = model_holder.current
    result = recommend(session.get("items", []), purchased, catalogue, model, k)
    return view.json({
        "user_id": user_id,
        "items": [{"item_id": item, "score": score} for item, score in result.items],
        "model_version": model.version if model else 0,
        "strategy": result.strategy,
    })
