"""Realtime recommendations: events, session state, item co-occurrence, scorers and the item model.

Everything here is pure (no Kafka, no Faust tables): the agents (``agents/recommendations.py``)
and the offline evaluation (``bench/recs_eval.py``) run the same functions.

State is plain JSON-able dicts, because it lives in Faust tables:

- a *session* (per user): ``{"session_id", "last_ts", "offset", "items": [[item, weight, ts, offset], ...]}``,
  oldest item first, at most ``SESSION_LENGTH`` items;
- *item stats* (per item): ``{"total": [score, ts], "neighbours": {item: [score, ts]}, "panes": {start: weight},
  "applied": {source partition: offset}}``: the time-decayed weight of the item, its time-decayed
  co-occurrence with its top-N neighbours, its popularity per pane of ``TREND_STEP`` seconds (a hopping
  window of ``TREND_WINDOW`` is the sum of its panes) and the last source offset applied per partition;
- an *item update* (what one user event adds to one item): ``{"item", "source": [partition, offset],
  "ts", "weight", "pairs": {neighbour: weight}}``; a ``recs-item-updates`` record carries the updates
  of a batch of events for one item: ``{"item", "updates": [...]}``.
"""

from __future__ import annotations

import heapq
import io
import logging
import math
import os
import reprlib
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import faust
import numpy as np
import orjson
from scipy import sparse
from sklearn.decomposition import TruncatedSVD

from models import windows
from models.metrics import InvalidRecord

log = logging.getLogger(__name__)


class InvalidEvent(InvalidRecord):
    """A user event or item record that cannot be decoded or validated; the message is the
    dead-letter reason."""


EVENT_WEIGHTS: Dict[str, float] = {"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0}

SESSION_TIMEOUT = 1800.0  # seconds of inactivity (event time) after which a new session starts
SESSION_LENGTH = 20  # items kept per session
PAIR_WINDOW = 10  # an event pairs its item with this many of the session's previous items
BACKWARD_WEIGHT = 0.5  # weight of "a then b" on b's neighbour a, relative to a's neighbour b (order matters)
MAX_NEIGHBOURS = 50  # neighbours kept per item; pruned when 1.5 x as many
HALF_LIFE = 7 * 86400.0  # seconds: co-occurrence and item weights halve in a week of event time
TREND_STEP = 3600.0  # pane of the trending window
TREND_WINDOW = 24 * 3600.0  # trending = the sum of the panes of the last day (event time)
MAX_PURCHASES = 500  # purchased items remembered per user
EARLIEST_TS = 946684800.0  # 2000-01-01: an event time before it is a unit or clock mistake
MAX_CLOCK_SKEW = 3600.0
MAX_TEXT_CHARS = 256  # ids, session ids and categories
CATALOGUE_MAX_ITEMS = 100_000  # items a Catalogue holds (RECS_CATALOGUE_MAX_ITEMS)
CATALOGUE_SLACK = 0.1  # a Catalogue is trimmed back to its cap once it holds this share more


# --- records ---------------------------------------------------------------------------------------


class UserEvent(faust.Record, serializer="json"):
    """One interaction: ``{"user_id", "item_id", "event", "session_id"?, "ts"}`` on ``user-events``."""

    user_id: str
    item_id: str
    event: str
    ts: float
    session_id: Optional[str] = None

    @property
    def weight(self) -> float:
        return EVENT_WEIGHTS[self.event]


class Item(faust.Record, serializer="json"):
    """Item metadata on ``items``: ``{"item_id", "category", "price", "available"}``."""

    item_id: str
    category: Optional[str] = None
    price: Optional[float] = None
    available: bool = True


def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()
    short.maxstring = short.maxother = 80
    short.maxlist = short.maxdict = 4
    short.maxlevel = 2
    return short


_shown = _short_repr().repr  # a value in a dead letter's reason: short, whatever its size


def _decode_object(raw: Optional[bytes]) -> Dict[str, Any]:
    """A JSON object. orjson refuses what the stdlib would take and fail on later: NaN and Infinity,
    lone surrogates, non-UTF-8 bytes, nesting over 1,024 levels, integers beyond 64 bits or float range."""
    if not raw:
        raise InvalidEvent("empty record")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise InvalidEvent(f"not JSON: {error}") from None
    if not isinstance(data, dict):
        raise InvalidEvent(f"must be a JSON object, got {type(data).__name__}")
    return data


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _text(data: Mapping[str, Any], name: str, required: bool = True) -> Optional[str]:
    value = data.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT_CHARS:
        raise InvalidEvent(f"field {name!r} must be a non-empty string of at most {MAX_TEXT_CHARS} characters, got {_shown(value)}")
    return value.strip()


def _event_time(data: Mapping[str, Any], now: float) -> float:
    ts = data.get("ts", now)
    if not _is_number(ts):
        raise InvalidEvent(f"field 'ts' must be a finite number, got {_shown(ts)}")
    if ts < EARLIEST_TS or ts > now + MAX_CLOCK_SKEW:
        raise InvalidEvent(f"field 'ts' is not a plausible event time in epoch seconds: {_shown(ts)}")
    return float(ts)


def parse_user_event(raw: Optional[bytes], user_key: Optional[str], now: Optional[float] = None) -> UserEvent:
    """Validate a ``user-events`` record; the record key, when there is one, must be the user id."""
    data = _decode_object(raw)
    user_id = _text(data, "user_id") if "user_id" in data or user_key is None else user_key
    if user_key is not None and user_id != user_key:
        raise InvalidEvent(f"user_id {user_id!r} does not match the record key {user_key!r}")
    event = data.get("event")
    if not isinstance(event, str) or event not in EVENT_WEIGHTS:
        raise InvalidEvent(f"field 'event' must be one of {', '.join(EVENT_WEIGHTS)}, got {_shown(event)}")
    return UserEvent(
        user_id=user_id,
        item_id=_text(data, "item_id"),
        event=event,
        ts=_event_time(data, time.time() if now is None else now),
        session_id=_text(data, "session_id", required=False),
    )


def parse_item(raw: Optional[bytes], item_key: Optional[str]) -> Item:
    """Validate an ``items`` record; the record key, when there is one, must be the item id."""
    data = _decode_object(raw)
    item_id = _text(data, "item_id")
    if item_key is not None and item_id != item_key:
        raise InvalidEvent(f"item_id {item_id!r} does not match the record key {item_key!r}")
    price = data.get("price")
    if price is not None and not _is_number(price):
        raise InvalidEvent(f"field 'price' must be a finite number, got {_shown(price)}")
    available = data.get("available", True)
    if not isinstance(available, bool):
        raise InvalidEvent(f"field 'available' must be true or false, got {_shown(available)}")
    category = data.get("category")
    if category is not None and (not (isinstance(category, str) or _is_number(category)) or len(str(category)) > MAX_TEXT_CHARS):
        raise InvalidEvent(f"field 'category' must be a string or number of at most {MAX_TEXT_CHARS} characters, got {_shown(category)}")
    return Item(item_id=item_id, category=None if category is None else str(category), price=price, available=available)


ITEM_UPDATE_KEYS = {"item", "source", "ts", "weight", "pairs"}
MAX_WEIGHT = max(EVENT_WEIGHTS.values())  # an item or pair weight never exceeds the heaviest event's


def _checked_item_update(update: Any, item: str, now: float) -> Dict[str, Any]:
    """One update as ``item_updates`` writes it; raises InvalidEvent naming the first wrong field."""
    if not isinstance(update, dict) or set(update) != ITEM_UPDATE_KEYS:
        raise InvalidEvent(f"an update must be an object with the keys {sorted(ITEM_UPDATE_KEYS)}, got {_shown(update)}")
    if update["item"] != item:
        raise InvalidEvent(f"an update of item {_shown(update['item'])} in a record of {item!r}")
    source = update["source"]
    if not (
        isinstance(source, list)
        and len(source) == 2
        and all(type(x) is int for x in source)
        and 0 <= source[0] < 2**31
        and 0 <= source[1] < 2**63
    ):
        raise InvalidEvent(f"'source' must be [partition, offset] of non-negative integers, got {_shown(source)}")
    _event_time(update, now)
    if not _is_number(update["weight"]) or not 0 <= update["weight"] <= MAX_WEIGHT:
        raise InvalidEvent(f"'weight' must be a number in 0..{MAX_WEIGHT:g}, got {_shown(update['weight'])}")
    pairs = update["pairs"]
    if not isinstance(pairs, dict) or len(pairs) > PAIR_WINDOW:
        raise InvalidEvent(f"'pairs' must be an object of at most {PAIR_WINDOW} items, got {_shown(pairs)}")
    for other, weight in pairs.items():
        if not 0 < len(other) <= MAX_TEXT_CHARS or not _is_number(weight) or not 0 <= weight <= MAX_WEIGHT:
            raise InvalidEvent(f"'pairs' must map item ids to weights in 0..{MAX_WEIGHT:g}, got {_shown(other)}: {_shown(weight)}")
    return update


def parse_item_updates(raw: Optional[bytes], item_key: Optional[str], now: Optional[float] = None) -> List[Dict[str, Any]]:
    """Decode a ``recs-item-updates`` record ``{"item", "updates": [...]}`` of the key's item.
    Written by the worker, checked all the same: an update that passed would be applied to the
    item's stats, and a value that cannot be stored there would stop the agent."""
    if item_key is None:
        raise InvalidEvent("item updates need the item id as their key")
    data = _decode_object(raw)
    updates = data.get("updates")
    if set(data) != {"item", "updates"} or data["item"] != item_key or not isinstance(updates, list):
        raise InvalidEvent(
            f"not item updates of {item_key!r}: {{item, updates: [{{item, source: [partition, offset], ts, weight, pairs}}]}}"
        )
    now = time.time() if now is None else now
    for position, update in enumerate(updates):
        try:
            _checked_item_update(update, item_key, now)
        except InvalidEvent as error:
            raise InvalidEvent(f"update {position}: {error}") from None
    return updates


# --- sessions --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionUpdate:
    """The user's session after an event, and the session items that came before the event."""

    session: Dict[str, Any]
    previous_items: List[List[Any]]
    replayed: bool = False


def is_new_session(session: Mapping[str, Any], event: UserEvent, timeout: float = SESSION_TIMEOUT) -> bool:
    """A new session after ``timeout`` seconds of inactivity or when the event names another session id."""
    if not session.get("items"):
        return True
    if event.session_id is not None and event.session_id != session.get("session_id"):
        return True
    return event.ts - session.get("last_ts", event.ts) > timeout


def update_session(
    session: Mapping[str, Any],
    event: UserEvent,
    offset: int,
    timeout: float = SESSION_TIMEOUT,
) -> SessionUpdate:
    """Add an event to the user's session; idempotent: an offset already applied changes nothing.

    A replayed event (offset at or below the session's) gets the items that preceded it in the stored
    session, so the pairs it emits are the ones the first delivery emitted.
    """
    if offset <= session.get("offset", -1):
        earlier = [entry for entry in session.get("items", []) if entry[3] < offset and entry[0] != event.item_id]
        return SessionUpdate(dict(session), earlier, replayed=True)
    if is_new_session(session, event, timeout):
        session_id = event.session_id or f"{event.user_id}@{event.ts:.3f}"
        items: List[List[Any]] = []
    else:
        session_id = session["session_id"]
        items = [list(entry) for entry in session["items"]]
    repeats = [entry for entry in items if entry[0] == event.item_id]
    previous = [entry for entry in items if entry[0] != event.item_id]
    weight = max([event.weight] + [entry[1] for entry in repeats])
    items = (previous + [[event.item_id, weight, event.ts, offset]])[-SESSION_LENGTH:]
    # Pairs are counted the first time an item enters the session; a repeat only raises its weight.
    paired_with = [] if repeats else previous
    last_ts = max(entry[2] for entry in items)
    new_session = {"session_id": session_id, "last_ts": last_ts, "offset": offset, "items": items}
    return SessionUpdate(new_session, paired_with)


def add_purchase(purchased: Mapping[str, Any], item_id: str) -> Dict[str, Any]:
    """The user's purchased items with one more; idempotent, bounded to the latest ``MAX_PURCHASES``."""
    items = [item for item in purchased.get("items", []) if item != item_id] + [item_id]
    return {"items": items[-MAX_PURCHASES:]}


# --- co-occurrence ---------------------------------------------------------------------------------


def item_updates(event: UserEvent, previous_items: Sequence[Sequence[Any]], source: Tuple[int, int]) -> Dict[str, Dict[str, Any]]:
    """What one event adds to each item's stats, keyed by item (one record per item on the re-key topic).

    The event's item gains its event weight (popularity) and each of the last ``PAIR_WINDOW`` session
    items as neighbour; each of those gains the event's item. Pair weight: the geometric mean of the
    two event weights over their distance in the session (1 = adjacent).
    """
    item = event.item_id
    updates: Dict[str, Dict[str, Any]] = {item: {"item": item, "source": list(source), "ts": event.ts, "weight": event.weight, "pairs": {}}}
    recent = list(previous_items)[-PAIR_WINDOW:]
    for distance, (other, other_weight, *_rest) in enumerate(reversed(recent), start=1):
        pair = math.sqrt(event.weight * other_weight) / distance
        updates[item]["pairs"][other] = round(pair * BACKWARD_WEIGHT, 6)
        updates[other] = {"item": other, "source": list(source), "ts": event.ts, "weight": 0.0, "pairs": {item: round(pair, 6)}}
    return updates


def decay(seconds: float, half_life: float = HALF_LIFE) -> float:
    """Factor by which a weight shrinks over ``seconds`` of event time."""
    return 0.5 ** (max(seconds, 0.0) / half_life)


def add_decayed(entry: Optional[Sequence[float]], weight: float, ts: float, half_life: float = HALF_LIFE) -> List[float]:
    """``[score, ts]`` plus ``weight`` at ``ts``; the result does not depend on arrival order."""
    if entry is None:
        return [weight, ts]
    score, at = entry
    if ts >= at:
        return [score * decay(ts - at, half_life) + weight, ts]
    return [score + weight * decay(at - ts, half_life), at]


def decayed_value(entry: Optional[Sequence[float]], now: float, half_life: float = HALF_LIFE) -> float:
    """The score of ``[score, ts]`` at event time ``now``."""
    return 0.0 if entry is None else entry[0] * decay(now - entry[1], half_life)


def prune_neighbours(neighbours: Dict[str, List[float]], now: float, keep: int, half_life: float = HALF_LIFE) -> Dict[str, List[float]]:
    """The ``keep`` strongest neighbours at ``now`` (ties by item id, so every replica keeps the same)."""
    ranked = sorted(neighbours.items(), key=lambda kv: (-decayed_value(kv[1], now, half_life), kv[0]))
    return dict(ranked[:keep])


def apply_item_update(
    stats: Optional[Mapping[str, Any]],
    update: Mapping[str, Any],
    *,
    max_neighbours: int = MAX_NEIGHBOURS,
    half_life: float = HALF_LIFE,
    trend_step: float = TREND_STEP,
    trend_window: float = TREND_WINDOW,
) -> Optional[Dict[str, Any]]:
    """The item's stats with ``update`` applied, or None when its source offset was applied already."""
    stats = stats or {}
    partition, offset = update["source"]
    applied = dict(stats.get("applied", {}))
    if offset <= applied.get(str(partition), -1):
        return None
    applied[str(partition)] = offset
    ts = float(update["ts"])
    neighbours = dict(stats.get("neighbours", {}))
    for other, weight in update["pairs"].items():
        neighbours[other] = add_decayed(neighbours.get(other), float(weight), ts, half_life)
    total = stats.get("total")
    if update["weight"] or total is None:
        total = add_decayed(total, float(update["weight"]), ts, half_life)
    if len(neighbours) > max_neighbours + max_neighbours // 2:
        neighbours = prune_neighbours(neighbours, max(ts, total[1]), max_neighbours, half_life)
    panes = dict(stats.get("panes", {}))
    if update["weight"]:
        pane = trend_pane_key(windows.pane_start(ts, trend_step))
        panes[pane] = panes.get(pane, 0.0) + float(update["weight"])
        newest = max(windows.key_start(start) for start in panes)
        panes = {start: weight for start, weight in panes.items() if windows.retained(windows.key_start(start), newest, trend_window)}
    return {"total": total, "neighbours": neighbours, "panes": panes, "applied": applied}


def trend_pane_key(start: float) -> str:
    """The key of a trending pane in an item's stats: whole seconds (``"1700000000"``), as stored."""
    return windows.pane_key(start, decimals=0)


def windowed_popularity(panes: Mapping[str, float], now: float, window: float = TREND_WINDOW) -> float:
    """Sum of the panes of the hopping window ending at ``now``."""
    return sum(weight for start, weight in panes.items() if windows.in_window(windows.key_start(start), now, window))


# --- the in-memory view every worker serves from -----------------------------------------------------


class Catalogue:
    """The stats and metadata of the items that count (a read replica of the item tables); ranks candidates.

    ``now`` is the latest event time seen, so decays and windows depend only on the data, never on
    the wall clock: two replicas with the same data give the same scores.

    At most ``max_items`` items (plus ``CATALOGUE_SLACK``): past that, the lightest are dropped
    (``evict_lightest``). An item dropped comes back whole with its next stats, which the tables
    write in full; its metadata comes back with its next ``items`` record.
    """

    def __init__(
        self,
        half_life: float = HALF_LIFE,
        trend_window: float = TREND_WINDOW,
        clock: Callable[[], float] = time.monotonic,
        trending_refresh: float = 0.5,
        max_items: int = CATALOGUE_MAX_ITEMS,
    ) -> None:
        if max_items < 1:
            raise ValueError(f"a catalogue holds at least one item, not {max_items}")
        self.stats: Dict[str, Dict[str, Any]] = {}
        self.meta: Dict[str, Dict[str, Any]] = {}
        self.now = 0.0
        self.half_life = half_life
        self.trend_window = trend_window
        self.clock = clock
        self.trending_refresh = trending_refresh
        self.max_items = max_items
        self.trim_above = max_items + max(1, int(max_items * CATALOGUE_SLACK))
        self._meta_only = 0  # items with metadata and no stats, so len() needs no set union
        self._trending: List[Tuple[str, float]] = []
        self._trending_at: Optional[float] = None
        self._changed = False

    def __len__(self) -> int:
        """Items held: with stats, metadata or both."""
        return len(self.stats) + self._meta_only

    def put_stats(self, item: str, stats: Optional[Dict[str, Any]]) -> None:
        if stats is None:
            if item in self.stats:
                del self.stats[item]
                self._meta_only += item in self.meta
        else:
            if item not in self.stats:
                self._meta_only -= item in self.meta
            self.stats[item] = stats
            self.now = max(self.now, stats.get("total", [0.0, 0.0])[1])
        self._changed = True
        self._trim_if_over()

    def put_meta(self, item: str, meta: Optional[Dict[str, Any]]) -> None:
        if meta is None:
            if item in self.meta:
                del self.meta[item]
                self._meta_only -= item not in self.stats
        else:
            if item not in self.meta:
                self._meta_only += item not in self.stats
            self.meta[item] = meta
        self._changed = True
        self._trim_if_over()

    def _trim_if_over(self) -> None:
        # Trimmed by a tenth of the cap at once: the ranking of every item runs once per that many new items.
        if len(self) > self.trim_above:
            self.evict_lightest(len(self) - self.max_items)

    def evict_lightest(self, count: int) -> None:
        """Drop ``count`` items: first those with metadata only (weight 0; available ones first, as
        an item without metadata reads as available), then the stats of those of least weight
        with their metadata, unless it says unavailable: that stays (as metadata only, dropped
        last), so a view after the drop cannot make a withdrawn item recommendable. Ties go by
        item id, so replicas with the same data keep the same items."""
        meta_only = (item for item in self.meta if item not in self.stats)
        dropped_meta = heapq.nsmallest(count, meta_only, key=lambda item: (not self.is_available(item), item))
        for item in dropped_meta:
            del self.meta[item]
        self._meta_only -= len(dropped_meta)
        dropped = heapq.nsmallest(count - len(dropped_meta), self.stats, key=lambda item: (self.weight(item), item))
        for item in dropped:
            del self.stats[item]
            if self.is_available(item):
                self.meta.pop(item, None)
            else:
                self._meta_only += 1
        self._changed, self._trending_at = True, None  # trending must not name a dropped item
        log.debug(
            "catalogue: dropped %s items with metadata only and %s lightest items; %s held", len(dropped_meta), len(dropped), len(self)
        )

    def snapshot(self) -> "Catalogue":
        """A copy that later updates do not touch (values are replaced on update, never mutated)."""
        copy = Catalogue(self.half_life, self.trend_window, self.clock, self.trending_refresh, self.max_items)
        copy.stats, copy.meta, copy.now, copy._meta_only = dict(self.stats), dict(self.meta), self.now, self._meta_only
        return copy

    def is_available(self, item: str) -> bool:
        return bool(self.meta.get(item, {}).get("available", True))

    def weight(self, item: str) -> float:
        """The item's time-decayed interaction weight."""
        stats = self.stats.get(item)
        return decayed_value(stats.get("total"), self.now, self.half_life) if stats else 0.0

    def neighbours(self, item: str) -> Dict[str, float]:
        """Cosine-normalised, time-decayed co-occurrence of ``item`` with each of its top-N neighbours."""
        stats = self.stats.get(item)
        if not stats:
            return {}
        own = self.weight(item)
        if own <= 0:
            return {}
        similarities = {}
        for other, entry in stats.get("neighbours", {}).items():
            other_weight = self.weight(other)
            if other_weight > 0:
                similarities[other] = decayed_value(entry, self.now, self.half_life) / math.sqrt(own * other_weight)
        return similarities

    def trending(self) -> List[Tuple[str, float]]:
        """Items by popularity in the trending window, most popular first (recomputed at most every refresh)."""
        clock = self.clock()
        if self._trending_at is None or (self._changed and clock - self._trending_at >= self.trending_refresh):
            scores = (
                (item, windowed_popularity(stats.get("panes", {}), self.now, self.trend_window)) for item, stats in self.stats.items()
            )
            self._trending = sorted(((item, score) for item, score in scores if score > 0), key=lambda kv: (-kv[1], kv[0]))
            self._trending_at, self._changed = clock, False
        return self._trending


# --- scorers -------------------------------------------------------------------------------------


def recency_weights(session_items: Sequence[Sequence[Any]]) -> List[Tuple[str, float]]:
    """V-SKNN's linear decay over the session (the latest item 1, the first 1/n) times the event weight."""
    n = len(session_items)
    return [(entry[0], (position / n) * entry[1]) for position, entry in enumerate(session_items, start=1)]


def session_knn_scores(session_items: Sequence[Sequence[Any]], catalogue: Catalogue) -> Dict[str, float]:
    """Sum over the session's items of recency weight x similarity to each of their neighbours."""
    scores: Dict[str, float] = {}
    for item, weight in recency_weights(session_items):
        for other, similarity in catalogue.neighbours(item).items():
            scores[other] = scores.get(other, 0.0) + weight * similarity
    return scores


MODEL_MIN_COVERAGE = 0.05  # a session item whose row the components reproduce less than this is outside the model
MODEL_SCORE_FLOOR = 0.01  # an affinity below this share of the profile's norm is noise, not a score


@dataclass
class ItemEmbeddings:
    """Low-rank item-to-item model: TruncatedSVD of the (normalised) co-occurrence matrix.

    ``row_factors[i] . col_factors[j]`` reconstructs how strongly item j follows item i, also for
    pairs never seen together (two hops through shared neighbours). ``coverage[i]`` is the share of
    item i's co-occurrence row the components reproduce (0..1): near 0, the model knows nothing of i.
    """

    version: int
    fingerprint: str
    fitted_at: float
    items: List[str]
    row_factors: np.ndarray
    col_factors: np.ndarray
    coverage: np.ndarray
    explained_variance: float = 0.0
    index: Dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {item: position for position, item in enumerate(self.items)}
        # float16 on the wire and on disk; float32 copies for the arithmetic.
        self._rows32 = self.row_factors.astype(np.float32)
        self._cols32 = self.col_factors.astype(np.float32)

    def scores(self, session_items: Sequence[Sequence[Any]], limit: int = 200) -> Dict[str, float]:
        """Predicted affinity of the ``limit`` best items to the recency-weighted session profile.

        Only what the model knows counts: session items it covers (``MODEL_MIN_COVERAGE``) make the
        profile, and only affinities of at least ``MODEL_SCORE_FLOOR`` x the profile's norm are
        scores. Below that they are rounding noise or another cluster's leakage, which the
        normalisation before blending would otherwise lift up to 1.0.
        """
        weighted = [
            (self.index[item], weight)
            for item, weight in recency_weights(session_items)
            if item in self.index and self.coverage[self.index[item]] >= MODEL_MIN_COVERAGE
        ]
        if not weighted:
            return {}
        rows, weights = zip(*weighted, strict=True)
        profile = np.asarray(weights, dtype=np.float32) @ self._rows32[list(rows)]
        floor = MODEL_SCORE_FLOOR * float(np.linalg.norm(profile))
        if not floor > 0:
            return {}
        affinity = self._cols32 @ profile
        best = np.argpartition(-affinity, min(limit, len(affinity) - 1))[:limit]
        return {self.items[i]: float(affinity[i]) for i in best if affinity[i] >= floor}


def row_coverage(matrix: sparse.csr_matrix, row_factors: np.ndarray) -> np.ndarray:
    """Per item: the norm of its reconstructed row over the norm of its row in ``matrix`` (0..1)."""
    observed = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    reproduced = np.linalg.norm(row_factors, axis=1)
    coverage = np.divide(reproduced, observed, out=np.zeros_like(reproduced), where=observed > 0)
    return np.clip(coverage, 0.0, 1.0)


def fit_item_embeddings(
    catalogue: Catalogue,
    version: int,
    fingerprint: str,
    dims: int = 32,
    max_items: int = 3000,
    seed: int = 0,
) -> Optional[ItemEmbeddings]:
    """Fit the model on the ``max_items`` items with the most weight; None while there is too little data."""
    ranked = sorted(((item, catalogue.weight(item)) for item in catalogue.stats), key=lambda kv: (-kv[1], kv[0]))
    items = [item for item, weight in ranked[:max_items] if weight > 0]
    index = {item: position for position, item in enumerate(items)}
    rows, cols, values = [], [], []
    for item in items:
        for other, similarity in catalogue.neighbours(item).items():
            if other in index:
                rows.append(index[item])
                cols.append(index[other])
                values.append(similarity)
    if len(items) < 3 or not values:
        return None
    matrix = sparse.csr_matrix((values, (rows, cols)), shape=(len(items), len(items)), dtype=np.float64)
    svd = TruncatedSVD(n_components=min(dims, len(items) - 1), random_state=seed, n_iter=7)
    row_factors = svd.fit_transform(matrix)
    # float16 halves the model on the wire (it travels as one Kafka record) and ranks the same.
    return ItemEmbeddings(
        version=version,
        fingerprint=fingerprint,
        fitted_at=time.time(),
        items=items,
        row_factors=row_factors.astype(np.float16),
        col_factors=svd.components_.T.astype(np.float16),
        coverage=row_coverage(matrix, row_factors).astype(np.float16),
        explained_variance=float(svd.explained_variance_ratio_.sum()),
    )


# --- persistence: a format that holds numbers only ------------------------------------------------
#
# A model travels on recs-models and lies in DATA_DIR, both writable by more than the leader, so it is
# never unpickled: it is an .npz archive of exactly four members, each read with allow_pickle=False
# after its header was checked (dtype, shape, size), and refused whole on any deviation:
#
# - ``metadata.npy``: uint8, the UTF-8 JSON {"format", "format_version", "version", "fingerprint",
#   "fitted_at", "explained_variance", "items"};
# - ``row_factors.npy`` and ``col_factors.npy``: float16 (items x dims), finite;
# - ``coverage.npy``: float16 (items), each in 0..1.

MODEL_FORMAT = "streamspine.item-model"
MODEL_FORMAT_VERSION = 1
MODEL_SUFFIX = ".npz"
MODEL_GLOB = f"model-*{MODEL_SUFFIX}"
MAX_MODEL_BYTES = 16 * 1024 * 1024  # a model record or file; one on the topic is under 1 MB
MAX_MODEL_ITEMS = 20_000
MAX_MODEL_DIMS = 512
MAX_ITEM_ID_CHARS = MAX_TEXT_CHARS  # as user events allow
MAX_FINGERPRINT_CHARS = 1_000_000
MAX_METADATA_BYTES = 8 * 1024 * 1024
METADATA_KEYS = {"format", "format_version", "version", "fingerprint", "fitted_at", "explained_variance", "items"}
FACTOR_DTYPE = np.dtype("<f2")
METADATA_DTYPE = np.dtype("|u1")
MODEL_MEMBERS: Dict[str, Tuple[np.dtype, int, int]] = {  # name: dtype, dimensions, most elements
    "metadata": (METADATA_DTYPE, 1, MAX_METADATA_BYTES),
    "row_factors": (FACTOR_DTYPE, 2, MAX_MODEL_ITEMS * MAX_MODEL_DIMS),
    "col_factors": (FACTOR_DTYPE, 2, MAX_MODEL_ITEMS * MAX_MODEL_DIMS),
    "coverage": (FACTOR_DTYPE, 1, MAX_MODEL_ITEMS),
}
ZIP_MAGIC = b"PK\x03\x04"  # an .npz is a zip archive; anything else (a pickle, a bare .npy) is refused unread


class InvalidModel(ValueError):
    """A model record or file that is not a well-formed item model; the message says why."""


def model_path(directory: Path, version: int) -> Path:
    return directory / f"model-{version:08d}{MODEL_SUFFIX}"


def model_metadata(model: ItemEmbeddings) -> Dict[str, Any]:
    return {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "version": model.version,
        "fingerprint": model.fingerprint,
        "fitted_at": model.fitted_at,
        "explained_variance": model.explained_variance,
        "items": list(model.items),
    }


def model_to_bytes(model: ItemEmbeddings) -> bytes:
    """The model as an .npz archive of numbers and JSON (see above)."""
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        metadata=np.frombuffer(orjson.dumps(model_metadata(model)), dtype=METADATA_DTYPE),
        row_factors=np.ascontiguousarray(model.row_factors, dtype=FACTOR_DTYPE),
        col_factors=np.ascontiguousarray(model.col_factors, dtype=FACTOR_DTYPE),
        coverage=np.ascontiguousarray(model.coverage, dtype=FACTOR_DTYPE),
    )
    return buffer.getvalue()


def model_from_bytes(data: bytes) -> ItemEmbeddings:
    """Read a model written by ``model_to_bytes``; raises InvalidModel for anything else. Never
    unpickles: nothing in ``data`` can run code."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_MODEL_BYTES:
        raise InvalidModel(f"not a model: {type(data).__name__} of {len(data) if isinstance(data, (bytes, bytearray)) else '?'} bytes")
    try:
        return _read_model(bytes(data))
    except InvalidModel:
        raise
    except Exception as error:  # noqa: BLE001 - whatever a malformed archive raises, it is refused
        raise InvalidModel(f"not a readable model archive: {type(error).__name__}: {error}") from None


def _read_model(data: bytes) -> ItemEmbeddings:
    if not data.startswith(ZIP_MAGIC):
        raise InvalidModel(f"not an .npz archive: starts with {data[:8]!r}")
    archive = np.load(io.BytesIO(data), allow_pickle=False)
    with archive:
        if sorted(archive.files) != sorted(MODEL_MEMBERS) or len(archive.zip.namelist()) != len(MODEL_MEMBERS):
            raise InvalidModel(f"archive members must be {sorted(MODEL_MEMBERS)}, got {sorted(archive.zip.namelist())[:10]}")
        for name, (dtype, ndim, max_elements) in MODEL_MEMBERS.items():
            _check_array_header(archive.zip, name, dtype, ndim, max_elements)
        metadata = _model_metadata(archive["metadata"])
        rows, cols, coverage = archive["row_factors"], archive["col_factors"], archive["coverage"]
    items = metadata["items"]
    if rows.shape != cols.shape or rows.shape[0] != len(items) or not 1 <= rows.shape[1] <= MAX_MODEL_DIMS:
        raise InvalidModel(f"factors must both be ({len(items)} items x 1..{MAX_MODEL_DIMS} dims), got {rows.shape} and {cols.shape}")
    if not (np.isfinite(rows).all() and np.isfinite(cols).all()):
        raise InvalidModel("factors hold NaN or infinite values")
    if coverage.shape != (len(items),) or not ((coverage >= 0) & (coverage <= 1)).all():
        raise InvalidModel(f"coverage must be {len(items)} values in 0..1")
    return ItemEmbeddings(
        version=metadata["version"],
        fingerprint=metadata["fingerprint"],
        fitted_at=metadata["fitted_at"],
        items=items,
        row_factors=rows,
        col_factors=cols,
        coverage=coverage,
        explained_variance=metadata["explained_variance"],
    )


def _check_array_header(archive: zipfile.ZipFile, name: str, dtype: np.dtype, ndim: int, max_elements: int) -> None:
    """Refuse a member whose header is not ``dtype`` with ``ndim`` dimensions of a plausible size,
    before its data is read (an object array, or a shape that would allocate gigabytes)."""
    with archive.open(f"{name}.npy") as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _fortran, found = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, _fortran, found = np.lib.format.read_array_header_2_0(member)
        else:
            raise InvalidModel(f"{name}: unsupported .npy version {version}")
    if found != dtype or len(shape) != ndim:
        raise InvalidModel(f"{name} must be {dtype.str} with {ndim} dimension(s), got {found.str} {shape}")
    if math.prod(shape) > max_elements or (ndim == 2 and shape[0] > MAX_MODEL_ITEMS):
        raise InvalidModel(f"{name} is too large: {shape}")


def _model_metadata(raw: np.ndarray) -> Dict[str, Any]:
    metadata = orjson.loads(raw.tobytes())
    if not isinstance(metadata, dict) or set(metadata) != METADATA_KEYS:
        raise InvalidModel(f"metadata must be an object with the keys {sorted(METADATA_KEYS)}")
    if metadata["format"] != MODEL_FORMAT or metadata["format_version"] != MODEL_FORMAT_VERSION:
        raise InvalidModel(f"not {MODEL_FORMAT} version {MODEL_FORMAT_VERSION}: {metadata['format']!r} {metadata['format_version']!r}")
    version = metadata["version"]
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 2**63:
        raise InvalidModel(f"version must be a positive 64-bit integer, got {version!r}")
    if not isinstance(metadata["fingerprint"], str) or len(metadata["fingerprint"]) > MAX_FINGERPRINT_CHARS:
        raise InvalidModel("fingerprint must be a string")
    for name in ("fitted_at", "explained_variance"):
        value = metadata[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidModel(f"{name} must be a finite number, got {value!r}")
        metadata[name] = float(value)
    items = metadata["items"]
    if (
        not isinstance(items, list)
        or not 1 <= len(items) <= MAX_MODEL_ITEMS
        or not all(isinstance(item, str) and 0 < len(item) <= MAX_ITEM_ID_CHARS for item in items)
        or len(set(items)) != len(items)
    ):
        raise InvalidModel(f"items must be 1..{MAX_MODEL_ITEMS} distinct ids of 1..{MAX_ITEM_ID_CHARS} characters")
    return metadata


def save_model(model: ItemEmbeddings, directory: Path, keep: int = 3) -> Path:
    """Write the model atomically (temp file + rename), keeping the ``keep`` newest versions."""
    directory.mkdir(parents=True, exist_ok=True)
    path = model_path(directory, model.version)
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(model_to_bytes(model))
    os.replace(temporary, path)
    for old in sorted(directory.glob(MODEL_GLOB))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_latest_model(directory: Path) -> Optional[ItemEmbeddings]:
    """The newest valid model under ``directory``, or None; a file that is refused is logged and
    skipped (a torn write, a foreign file: the previous version serves)."""
    for path in sorted(directory.glob(MODEL_GLOB), reverse=True):
        try:
            return model_from_bytes(path.read_bytes())
        except (OSError, InvalidModel) as error:
            log.warning("not loading the item model %s: %s", path, error)
    return None


# --- blending ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlendWeights:
    """How much each normalised score counts (see README "Recommendations")."""

    session_knn: float = 1.0
    embeddings: float = 0.5
    trending: float = 0.05


@dataclass(frozen=True)
class Recommendation:
    items: List[Tuple[str, float]]
    strategy: str


@dataclass(frozen=True)
class SessionScores:
    """Each scorer's scores for one session, each divided by its best score (so in 0..1)."""

    session_knn: Dict[str, float]
    embeddings: Dict[str, float]
    trending: Dict[str, float]


def _normalised(scores: Mapping[str, float]) -> Dict[str, float]:
    top = max(scores.values(), default=0.0)
    return {item: score / top for item, score in scores.items()} if top > 0 else {}


def score_session(
    session_items: Sequence[Sequence[Any]],
    catalogue: Catalogue,
    model: Optional[ItemEmbeddings],
    trending_pool: int = 200,
    recent: int = PAIR_WINDOW,
) -> SessionScores:
    """Run the scorers on the session's ``recent`` latest items."""
    latest = list(session_items)[-recent:]
    return SessionScores(
        session_knn=_normalised(session_knn_scores(latest, catalogue)) if latest else {},
        embeddings=_normalised(model.scores(latest)) if model is not None and latest else {},
        trending=_normalised(dict(catalogue.trending()[:trending_pool])),
    )


def blend(scores: SessionScores, weights: BlendWeights) -> Tuple[Dict[str, float], str]:
    """Weighted sum of the normalised scores, and the strategy that produced it."""
    if not (scores.session_knn and weights.session_knn) and not (scores.embeddings and weights.embeddings):
        return dict(scores.trending), "trending"
    strategy = "blended" if scores.embeddings and weights.embeddings else "session-knn"
    blended: Dict[str, float] = {}
    for part, weight in (
        (scores.session_knn, weights.session_knn),
        (scores.embeddings, weights.embeddings),
        (scores.trending, weights.trending),
    ):
        if weight:
            for item, score in part.items():
                blended[item] = blended.get(item, 0.0) + weight * score
    return blended, strategy


def recommend(
    session_items: Sequence[Sequence[Any]],
    purchased: Iterable[str],
    catalogue: Catalogue,
    model: Optional[ItemEmbeddings],
    k: int,
    weights: BlendWeights = BlendWeights(),
) -> Recommendation:
    """Top ``k`` items for a session: each scorer's scores divided by its best, weighted and summed.

    Never recommends an item of the session, a purchased item or an unavailable one; a user without a
    session (cold start) gets trending items, and any shortfall is filled from trending.
    """
    scores = score_session(session_items, catalogue, model)
    blended, strategy = blend(scores, weights)
    excluded = set(purchased) | {entry[0] for entry in session_items}
    return Recommendation(top_k(blended, excluded, catalogue, k, fill=scores.trending), strategy)


def top_k(scores: Mapping[str, float], excluded: set, catalogue: Catalogue, k: int, fill: Mapping[str, float]) -> List[Tuple[str, float]]:
    """The ``k`` best allowed items (ties by id), topped up from ``fill`` with lower scores."""

    def allowed(item: str) -> bool:
        return item not in excluded and catalogue.is_available(item)

    ranked = sorted(((item, score) for item, score in scores.items() if allowed(item)), key=lambda kv: (-kv[1], kv[0]))[:k]
    if len(ranked) < k:
        chosen = {item for item, _ in ranked}
        floor = min((score for _, score in ranked), default=1.0)
        extra = [item for item, _ in sorted(fill.items(), key=lambda kv: (-kv[1], kv[0])) if item not in chosen and allowed(item)]
        ranked += [(item, floor * 0.5 ** (position + 1)) for position, item in enumerate(extra[: k - len(ranked)])]
    return [(item, round(score, 6)) for item, score in ranked]
