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
import logging
from typing import Any, Dict, List, Optional, Set, Tuple

import faust
import orjson
from faust import web
from faust.types import EventT, StreamT

from app import app, settings
from app.aggregation import BATCH_MAX, by_partition, enter_partition, fold_deltas, latest, write_values
from app.follower import TopicFollower
from app.gauges import register_value
from app.runtime import Decoded, decoded_batches, require_encodable, until_applied
from app.settings import Settings
from app.topics import key_text, raw_topic
from models.recommendations import (
    Catalogue,
    InvalidModel,
    Item,
    ItemEmbeddings,
    UserEvent,
    add_purchase,
    apply_item_update,
    fit_item_embeddings,
    item_updates,
    load_latest_model,
    model_from_bytes,
    model_to_bytes,
    parse_item,
    parse_item_updates,
    parse_user_event,
    recommend,
    save_model,
    update_session,
)
from tables.recommendations import recs_item_meta, recs_item_stats, recs_purchased, recs_sessions

log = logging.getLogger(__name__)


user_events_topic = raw_topic("user-events")
items_topic = raw_topic("items")
item_updates_topic = raw_topic("recs-item-updates")  # re-keys a user's event by the items it touches
models_topic = raw_topic("recs-models", partitions=1)  # the leader's item models (.npz of numbers, checked on load)

MODEL_DIR = settings.data_dir / "recommendations"
MAX_K = 100
MODEL_BYTES_BUDGET = 800_000  # Kafka's default largest record is 1 MB
RECS_BATCH_WITHIN = 0.02  # seconds take_events waits for company (a stream without a batch channel)


# --- read replicas -------------------------------------------------------------------------------


class ModelHolder:
    """The latest item model: loaded from DATA_DIR at start, replaced by newer versions from recs-models."""

    def __init__(self) -> None:
        self.current: Optional[ItemEmbeddings] = None

    def load_saved(self) -> None:
        """Serve the newest valid model saved under MODEL_DIR, if any (at worker start)."""
        saved = load_latest_model(MODEL_DIR)
        if saved is not None and (self.current is None or saved.version > self.current.version):
            self.current = saved
            log.info("serving item model version %s from %s", saved.version, MODEL_DIR)

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
    return None if value is None else orjson.loads(value)


catalogue = Catalogue(max_items=settings.recs_catalogue_max_items)
model_holder = ModelHolder()
item_follower = TopicFollower(
    {
        recs_item_stats.changelog_topic.get_topic_name: (
            settings.topic_partitions,
            lambda key, value: catalogue.put_stats(key.decode(), json_value(value)),
        ),
        recs_item_meta.changelog_topic.get_topic_name: (
            settings.topic_partitions,
            lambda key, value: catalogue.put_meta(key.decode(), json_value(value)),
        ),
    }
)
register_value(
    "streamspine_recs_catalogue_items",
    "Items in this worker's recommendations catalogue (RECS_CATALOGUE_MAX_ITEMS, 10 % more before a trim).",
    lambda: len(catalogue),
)
# Models are rare: a long fetch wait keeps this consumer from polling the broker 50 times a second
# when the worker runs with a short one (the local broker: app/local_broker.py WORKER_ENV).
model_follower = TopicFollower({models_topic.get_topic_name: (1, model_holder.receive)}, latest_only=True, fetch_wait_ms=500)


def catalogue_fingerprint() -> str:
    """Which item-table records the replica has read: the same data gives the same fingerprint."""
    return ",".join(f"{topic}:{partition}:{offset}" for (topic, partition), offset in sorted(item_follower.positions.items()))


# --- agents --------------------------------------------------------------------------------------


# Each agent: decoded_batches (a record that fails decoding or validation -> <topic>.dlq with the
# reason), then the batch body under until_applied (a failure retries the batch, never skips it).
# Bodies are idempotent: sessions keep their last offset, item stats the last source offset per
# partition, and keyless events already forwarded are not forwarded again.


def decode_user_event(event: EventT) -> UserEvent:
    """A ``user-events`` record as a valid event; raises for a record to dead-letter."""
    return require_encodable_record(parse_user_event(event.value, key_text(event.key)))


def decode_item_updates(event: EventT) -> Tuple[str, List[Dict[str, Any]]]:
    """A ``recs-item-updates`` record as (item, updates); raises for a record to dead-letter."""
    item = key_text(event.key)
    if item is None:
        raise ValueError("a recs-item-updates record needs its item id as the key")
    updates = require_encodable(parse_item_updates(event.value, item))
    return item, updates


def decode_item(event: EventT) -> Item:
    """An ``items`` record as valid item metadata; raises for a record to dead-letter."""
    return require_encodable_record(parse_item(event.value, key_text(event.key)))


def require_encodable_record(record: Any) -> Any:
    """``record`` if the tables can store what it holds (app.runtime.require_encodable)."""
    require_encodable(record.asdict())
    return record


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


def observe_user_event(event: EventT, parsed: UserEvent, batch: UserBatch) -> None:
    """One keyed user event: session and purchases (this partition), item updates (re-keyed by item)."""
    user, message = parsed.user_id, event.message
    update = update_session(batch.session(user), parsed, message.offset, settings.recs_session_timeout)
    for item, item_update in item_updates(parsed, update.previous_items, (message.partition, message.offset)).items():
        batch.item_updates.setdefault(item, []).append(item_update)
    if not update.replayed:
        batch.sessions[user] = (event, update.session)
    if parsed.event == "purchase":
        batch.purchases[user] = (event, add_purchase(batch.purchased(user), parsed.item_id))


async def forward_keyless_events(batch: List[Decoded[UserEvent]], forwarded: Set[int]) -> None:
    """Re-key events that came without a key by their user id, so a user's state lives in one
    partition. ``forwarded`` holds the batch positions sent already: a retry does not send them twice."""
    pending = [(position, entry) for position, entry in enumerate(batch) if entry.event.key is None and position not in forwarded]
    deliveries = [await user_events_topic.send(key=entry.value.user_id.encode(), value=entry.event.value) for _, entry in pending]
    outcomes = await asyncio.gather(*deliveries, return_exceptions=True)
    forwarded.update(position for (position, _), outcome in zip(pending, outcomes, strict=True) if not isinstance(outcome, BaseException))
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


async def apply_user_events(stream: StreamT, batch: List[Decoded[UserEvent]]) -> None:
    """Sessions, purchases and item updates of a batch's keyed events. Item updates are sent before
    the sessions are written: a retry or a crash in between derives the same updates again (the
    session's offset says the events are in), and the item stats drop those they have."""
    changes = UserBatch()
    for entry in batch:
        if entry.event.key is not None:
            enter_partition(stream, entry.event)
            observe_user_event(entry.event, entry.value, changes)
    for item, updates in changes.item_updates.items():
        await item_updates_topic.send(key=item.encode(), value=orjson.dumps({"item": item, "updates": updates}))
    write_values(stream, recs_sessions, by_partition(changes.sessions))
    write_values(stream, recs_purchased, by_partition(changes.purchases))


@app.agent(user_events_topic)
async def record_user_events(stream: StreamT) -> None:
    """user-events -> recs_sessions, recs_purchased; item updates -> recs-item-updates.

    One record per touched item and one table write per user per batch; keyless events are
    re-keyed by user and counted when they come back keyed.
    """
    async for batch in decoded_batches(stream, decode_user_event, max_=BATCH_MAX, within=RECS_BATCH_WITHIN):
        forwarded: Set[int] = set()
        await until_applied(forward_keyless_events, batch, forwarded, what="recommendations: re-keying user events")
        await until_applied(apply_user_events, stream, batch, what="recommendations: user events")


async def apply_item_updates(stream: StreamT, batch: List[Decoded[Tuple[str, List[Dict[str, Any]]]]]) -> None:
    """Each record's updates applied to its item's stats, one write per item; an update whose
    source offset the stats hold already is dropped (so a retry changes nothing twice)."""
    pending: Dict[str, Tuple[EventT, Dict[str, Any]]] = {}
    for entry in batch:
        item, updates = entry.value
        enter_partition(stream, entry.event)
        stats = pending[item][1] if item in pending else recs_item_stats.get(item)
        changed = False
        for update in updates:
            applied = apply_item_update(stats, update, max_neighbours=settings.recs_neighbours)
            if applied is not None:
                stats, changed = applied, True
        if changed and stats is not None:
            pending[item] = (entry.event, stats)
    write_values(stream, recs_item_stats, by_partition(pending))


@app.agent(item_updates_topic)
async def record_item_updates(stream: StreamT) -> None:
    """recs-item-updates -> recs_item_stats (co-occurrence, weight, trending panes)."""
    async for batch in decoded_batches(stream, decode_item_updates, max_=BATCH_MAX, within=RECS_BATCH_WITHIN):
        await until_applied(apply_item_updates, stream, batch, what="recommendations: item updates")


async def apply_items(stream: StreamT, batch: List[Decoded[Item]]) -> None:
    """Each item's latest metadata of the batch, one write per item."""
    pending = fold_deltas(
        (
            (
                entry.event,
                [(entry.value.item_id, {"category": entry.value.category, "price": entry.value.price, "available": entry.value.available})],
            )
            for entry in batch
        ),
        combine=latest,
    )
    write_values(stream, recs_item_meta, pending)


@app.agent(items_topic)
async def record_items(stream: StreamT) -> None:
    """items -> recs_item_meta."""
    async for batch in decoded_batches(stream, decode_item, max_=BATCH_MAX, within=RECS_BATCH_WITHIN):
        await until_applied(apply_items, stream, batch, what="recommendations: items")


@app.task
async def follow_item_tables() -> None:
    """Keep this worker's replica of every item's stats and metadata."""
    await item_follower.follow()


@app.task
async def follow_models() -> None:
    """Keep this worker's item model the latest one the leader published."""
    await models_topic.maybe_declare()
    await model_follower.follow()


def register(app: faust.App, settings: Settings) -> None:
    """Serve the model saved under DATA_DIR from the worker's start (importing this module reads nothing)."""

    @app.on_worker_init.connect
    def load_saved_model(sender: faust.App, /, *args: object, **kwargs: object) -> None:
        model_holder.load_saved()


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
        raise view.ValidationError(str(error)) from None
    await item_follower.wait_caught_up()
    session = recs_sessions.get(user_id) or {}
    purchased = (recs_purchased.get(user_id) or {}).get("items", [])
    model = model_holder.current
    result = recommend(session.get("items", []), purchased, catalogue, model, k)
    return view.json(
        {
            "user_id": user_id,
            "items": [{"item_id": item, "score": score} for item, score in result.items],
            "model_version": model.version if model else 0,
            "strategy": result.strategy,
        }
    )
