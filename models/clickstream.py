"""A seeded synthetic click-stream with the structure of real e-commerce sessions, and a reader for
real datasets in the YOOCHOOSE / RetailRocket column layouts.

Structure of the synthetic stream:

- **power-law popularity**: item ``i`` of a category is drawn with weight ``1 / (rank + 1) ** zipf``;
- **category affinity**: each user prefers one to three categories; a session mostly stays in one;
- **sequential patterns**: each item has a few successors in its category (the case after the phone,
  the charger after the case); a session follows them with probability ``p_follow``;
- event types: mostly views, then clicks, add-to-carts and purchases (purchases after add-to-cart).
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, TypeVar

T0 = 1767225600.0  # 2026-01-01 UTC


@dataclass(frozen=True)
class ClickstreamConfig:
    """Knobs of the synthetic stream; the defaults are what README's figures use."""

    seed: int = 7
    items: int = 3000
    categories: int = 30
    users: int = 4000
    sessions: int = 12000
    days: float = 14.0
    zipf: float = 1.1
    successors: int = 3
    p_follow: float = 0.55  # next item is a successor of the current one
    p_category: float = 0.30  # ... else a popular item of the session's category (rest: any popular item)
    mean_length: float = 6.0


Choice = TypeVar("Choice")


def _weighted_choice(rng: random.Random, population: Sequence[Choice], cumulative: List[float]) -> Choice:
    return rng.choices(population, cum_weights=cumulative, k=1)[0]


def _cumulative(weights: List[float]) -> List[float]:
    total, out = 0.0, []
    for weight in weights:
        total += weight
        out.append(total)
    return out


class _Catalogue:
    """Items by category with power-law popularity and fixed successors."""

    def __init__(self, config: ClickstreamConfig, rng: random.Random) -> None:
        self.by_category: Dict[int, List[str]] = {c: [] for c in range(config.categories)}
        items = [f"sku-{i}" for i in range(config.items)]
        rng.shuffle(items)
        for position, item in enumerate(items):
            self.by_category[position % config.categories].append(item)
        self.category_cum = {
            c: _cumulative([1 / (r + 1) ** config.zipf for r in range(len(members))]) for c, members in self.by_category.items()
        }
        # Categories themselves are unequally popular.
        self.categories = list(self.by_category)
        self.categories_cum = _cumulative([1 / (c + 1) ** 0.7 for c in self.categories])
        self.successors = {
            item: [_weighted_choice(rng, members, self.category_cum[c]) for _ in range(config.successors)]
            for c, members in self.by_category.items()
            for item in members
        }

    def popular_in(self, rng: random.Random, category: int) -> str:
        return _weighted_choice(rng, self.by_category[category], self.category_cum[category])

    def any_popular(self, rng: random.Random) -> str:
        return self.popular_in(rng, _weighted_choice(rng, self.categories, self.categories_cum))


def _event_type(rng: random.Random, carted: bool) -> str:
    roll = rng.random()
    if carted and roll < 0.35:
        return "purchase"
    if roll < 0.08:
        return "add_to_cart"
    if roll < 0.28:
        return "click"
    return "view"


def synthetic_events(config: ClickstreamConfig = ClickstreamConfig()) -> List[Dict]:
    """The whole stream, ordered by event time: ``{"user_id", "item_id", "event", "session_id", "ts"}``."""
    rng = random.Random(config.seed)
    catalogue = _Catalogue(config, rng)
    users = [f"u{i}" for i in range(config.users)]
    affinity = {user: rng.sample(catalogue.categories, rng.randint(1, 3)) for user in users}
    events: List[Dict] = []
    for number in range(config.sessions):
        user = rng.choice(users)
        start = T0 + rng.random() * config.days * 86400
        category = rng.choice(affinity[user]) if rng.random() < 0.8 else rng.choice(catalogue.categories)
        length = min(20, 2 + int(rng.expovariate(1 / max(config.mean_length - 2, 0.1))))
        events.extend(_session(rng, catalogue, config, user, f"s{number}", start, category, length))
    events.sort(key=lambda event: (event["ts"], event["session_id"]))
    return events


def _session(
    rng, catalogue: _Catalogue, config: ClickstreamConfig, user: str, session_id: str, start: float, category: int, length: int
) -> Iterator[Dict]:
    item, seen, carted, ts = catalogue.popular_in(rng, category), set(), False, start
    for _ in range(length):
        seen.add(item)
        event = _event_type(rng, carted)
        carted = carted or event == "add_to_cart"
        yield {"user_id": user, "item_id": item, "event": event, "session_id": session_id, "ts": round(ts, 3)}
        ts += rng.uniform(5, 120)
        for _attempt in range(5):  # sessions rarely return to an item
            roll = rng.random()
            if roll < config.p_follow:
                candidate = rng.choices(catalogue.successors[item], weights=[0.6, 0.3, 0.1][: config.successors] or None, k=1)[0]
            elif roll < config.p_follow + config.p_category:
                candidate = catalogue.popular_in(rng, category)
            else:
                candidate = catalogue.any_popular(rng)
            if candidate not in seen:
                break
        item = candidate


# --- real datasets ---------------------------------------------------------------------------------

RETAILROCKET_EVENTS = {"view": "view", "addtocart": "add_to_cart", "transaction": "purchase"}


def read_csv_events(path: Path, limit: int = 0) -> List[Dict]:
    """Events of a RetailRocket ``events.csv`` (header ``timestamp,visitorid,event,itemid,...``, ms) or a
    YOOCHOOSE ``clicks.dat`` (no header: ``session_id,timestamp ISO-8601,item_id,category``), by time."""
    events: List[Dict] = []
    with open(path, newline="") as handle:
        rows: Iterator[List[str]] = csv.reader(handle)
        first = next(rows, None)
        if first is None:
            return []
        retailrocket = "visitorid" in first
        if not retailrocket:
            rows = _chain([first], rows)
        for row in rows:
            events.append(_retailrocket_event(row) if retailrocket else _yoochoose_event(row))
            if limit and len(events) >= limit:
                break
    events.sort(key=lambda event: event["ts"])
    return events


def _chain(head: List[List[str]], rest) -> Iterator[List[str]]:
    yield from head
    yield from rest


def _retailrocket_event(row: List[str]) -> Dict:
    # RetailRocket has visitors, not sessions: sessions are cut by 30 minutes of inactivity.
    return {
        "user_id": f"v{row[1]}",
        "item_id": row[3],
        "event": RETAILROCKET_EVENTS.get(row[2], "view"),
        "session_id": None,
        "ts": int(row[0]) / 1000,
    }


def _yoochoose_event(row: List[str]) -> Dict:
    ts = datetime.fromisoformat(row[1].replace("Z", "+00:00")).timestamp()
    return {"user_id": f"s{row[0]}", "item_id": row[2], "event": "view", "session_id": row[0], "ts": ts}
