"""Next-item evaluation of the recommendations: HR@20 and MRR@20 of most-popular, session kNN, blended.

    python bench/recs_eval.py                      # the seeded synthetic click-stream (models/clickstream.py)
    python bench/recs_eval.py --csv events.csv     # RetailRocket events.csv or YOOCHOOSE clicks.dat
    python bench/recs_eval.py --sessions 30000 --seed 3
    python bench/recs_eval.py --seed 3 --blend 1,1,0 --blend 1,0.25,0.05   # other blend weights too

Events are replayed in time order through the same functions the worker runs (models/recommendations.py):
before each event that continues a session, every strategy predicts its top ``k`` from the state so
far; then the event is consumed (session update, item updates with the same dedupe, trending panes).
The item model is refitted every ``--refit-every`` events, as the leader's timer does. A target item
already in the session is skipped (every strategy excludes the session's own items).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models.clickstream import ClickstreamConfig, read_csv_events, synthetic_events  # noqa: E402
from models.recommendations import (  # noqa: E402
    BlendWeights, Catalogue, InvalidEvent, ItemEmbeddings, UserEvent, add_purchase, apply_item_update, blend,
    fit_item_embeddings, is_new_session, item_updates, score_session, top_k, update_session,
)

STRATEGIES = {
    "most-popular": BlendWeights(session_knn=0.0, embeddings=0.0, trending=1.0),
    "session-knn": BlendWeights(session_knn=1.0, embeddings=0.0, trending=0.0),
    "blended": BlendWeights(),
}


@dataclass
class Score:
    hits: int = 0
    reciprocal_ranks: float = 0.0
    cases: int = 0

    def add(self, ranked: List[str], target: str) -> None:
        self.cases += 1
        if target in ranked:
            self.hits += 1
            self.reciprocal_ranks += 1 / (ranked.index(target) + 1)

    @property
    def hr(self) -> float:
        return self.hits / self.cases if self.cases else 0.0

    @property
    def mrr(self) -> float:
        return self.reciprocal_ranks / self.cases if self.cases else 0.0


@dataclass
class Replay:
    """The worker's state, in memory: sessions, purchases, the item catalogue and the model."""

    refit_every: int
    catalogue: Catalogue = field(default_factory=lambda: Catalogue(clock=lambda: 0.0))
    sessions: Dict[str, dict] = field(default_factory=dict)
    purchased: Dict[str, dict] = field(default_factory=dict)
    model: Optional[ItemEmbeddings] = None
    offset: int = 0
    fit_seconds: float = 0.0

    def predict(self, event: UserEvent, k: int) -> Optional[Dict[str, List[str]]]:
        """Each strategy's top ``k`` for the user's session as it is before ``event``."""
        session = self.sessions.get(event.user_id, {})
        if is_new_session(session, event) or any(entry[0] == event.item_id for entry in session["items"]):
            return None
        scores = score_session(session["items"], self.catalogue, self.model)
        excluded = set(self.purchased.get(event.user_id, {}).get("items", [])) | {entry[0] for entry in session["items"]}
        return {
            name: [item for item, _ in top_k(blend(scores, weights)[0], excluded, self.catalogue, k, fill=scores.trending)]
            for name, weights in STRATEGIES.items()
        }

    def consume(self, event: UserEvent) -> None:
        """What the agents do with one event."""
        self.offset += 1
        update = update_session(self.sessions.get(event.user_id, {}), event, self.offset)
        self.sessions[event.user_id] = update.session
        if event.event == "purchase":
            self.purchased[event.user_id] = add_purchase(self.purchased.get(event.user_id, {}), event.item_id)
        for item, item_update in item_updates(event, update.previous_items, (0, self.offset)).items():
            stats = apply_item_update(self.catalogue.stats.get(item), item_update)
            if stats is not None:
                self.catalogue.put_stats(item, stats)
        if self.offset % self.refit_every == 0:
            self.refit()

    def refit(self) -> None:
        started = time.perf_counter()
        version = (self.model.version if self.model else 0) + 1
        self.model = fit_item_embeddings(self.catalogue, version, fingerprint=str(self.offset)) or self.model
        self.fit_seconds += time.perf_counter() - started


def evaluate(events: List[dict], k: int, refit_every: int, trending_refresh: float) -> Dict[str, Score]:
    replay = Replay(refit_every)
    clock = [0.0]
    replay.catalogue.clock, replay.catalogue.trending_refresh = (lambda: clock[0]), trending_refresh
    scores = {name: Score() for name in STRATEGIES}
    for raw in events:
        try:
            event = UserEvent(**raw)
            event.weight  # noqa: B018 - unknown event types are refused like the worker does
        except (InvalidEvent, KeyError, TypeError):
            continue
        clock[0] = event.ts
        predictions = replay.predict(event, k)
        if predictions is not None:
            for name, ranked in predictions.items():
                scores[name].add(ranked, event.item_id)
        replay.consume(event)
    print(f"model: version {replay.model.version if replay.model else 0}, {len(replay.model.items) if replay.model else 0} items, "
          f"refits took {replay.fit_seconds:.1f} s in all")
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", type=Path, help="RetailRocket events.csv or YOOCHOOSE clicks.dat instead of synthetic data")
    parser.add_argument("--limit", type=int, default=0, help="read at most this many CSV rows")
    parser.add_argument("--seed", type=int, default=ClickstreamConfig.seed)
    parser.add_argument("--sessions", type=int, default=ClickstreamConfig.sessions)
    parser.add_argument("--items", type=int, default=ClickstreamConfig.items)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--refit-every", type=int, default=5000, help="events between model refits")
    parser.add_argument("--trending-refresh", type=float, default=600.0, help="event-time seconds between trending recomputes")
    parser.add_argument("--blend", action="append", default=[], metavar="KNN,MODEL,TRENDING",
                        help="also evaluate these blend weights (repeatable), e.g. --blend 1,1,0")
    args = parser.parse_args()
    for weights in args.blend:
        knn, model, trending = (float(part) for part in weights.split(","))
        STRATEGIES[f"blend {weights}"] = BlendWeights(session_knn=knn, embeddings=model, trending=trending)

    started = time.perf_counter()
    if args.csv:
        events = read_csv_events(args.csv, args.limit)
        source = f"{args.csv} ({len(events)} events)"
    else:
        config = ClickstreamConfig(seed=args.seed, sessions=args.sessions, items=args.items)
        events = synthetic_events(config)
        source = f"synthetic click-stream: seed {config.seed}, {config.items} items, {config.categories} categories, {config.users} users, {config.sessions} sessions, {len(events)} events"
    print(source)
    scores = evaluate(events, args.k, args.refit_every, args.trending_refresh)
    popular = scores["most-popular"].hr
    print(f"next-item predictions: {scores['blended'].cases}")
    width = max(len(name) for name in scores)
    print(f"{'strategy':<{width}} {'HR@' + str(args.k):>8} {'MRR@' + str(args.k):>8} {'HR x pop':>9}")
    for name, score in scores.items():
        ratio = f"{score.hr / popular:.2f}" if popular else "-"
        print(f"{name:<{width}} {score.hr:>8.4f} {score.mrr:>8.4f} {ratio:>9}")
    print(f"took {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
