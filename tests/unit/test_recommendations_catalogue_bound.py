"""The Catalogue's bound: it never holds more than its cap plus the slack, drops the items with
metadata only first and then the lightest, and still serves recommendations, trending and refits
from the items it keeps."""

from __future__ import annotations

import random
from typing import Any, Dict

from models.recommendations import (
    HALF_LIFE,
    Catalogue,
    UserEvent,
    apply_item_update,
    fit_item_embeddings,
    item_updates,
    recommend,
    update_session,
)

T0 = 1767225600.0
CAP = 100


def stats_of(weight: float, ts: float = T0) -> Dict[str, Any]:
    """The stats of an item after one event of ``weight`` at ``ts``, as the item table holds them."""
    stats = apply_item_update(None, {"item": "x", "source": [0, 0], "ts": ts, "weight": weight, "pairs": {}})
    assert stats is not None
    return stats


def held(catalogue: Catalogue) -> set:
    return set(catalogue.stats) | set(catalogue.meta)


def test_the_catalogue_never_holds_more_than_its_cap_and_slack_however_many_items_arrive():
    catalogue = Catalogue(max_items=CAP)
    rng = random.Random(7)
    most = 0
    for number in range(20_000):
        item = f"sku-{rng.randrange(5_000)}"
        operation = rng.random()
        if operation < 0.45:
            catalogue.put_stats(item, stats_of(rng.uniform(0.1, 8.0), T0 + number))
        elif operation < 0.9:
            catalogue.put_meta(item, {"category": "c", "price": 1.0, "available": rng.random() < 0.8})
        elif operation < 0.95:
            catalogue.put_stats(item, None)
        else:
            catalogue.put_meta(item, None)
        assert len(catalogue) == len(held(catalogue)) <= CAP + CAP // 10
        most = max(most, len(catalogue))
    assert most == CAP + CAP // 10, "trimmed only once past the slack, not on every update"


def test_the_heaviest_items_survive_and_the_lightest_go():
    catalogue = Catalogue(max_items=CAP)
    weights = {f"sku-{number:03d}": 1.0 + number for number in range(CAP + CAP // 10)}
    for item in random.Random(3).sample(sorted(weights), len(weights)):
        catalogue.put_stats(item, stats_of(weights[item]))
        catalogue.put_meta(item, {"available": True})
    assert len(catalogue) == CAP + CAP // 10, "nothing dropped within the slack"

    catalogue.put_stats("sku-light", stats_of(0.5))

    heaviest = sorted(weights, key=weights.__getitem__)[-CAP:]
    assert set(catalogue.stats) == set(heaviest)
    assert set(catalogue.meta) == set(heaviest), "a dropped item's metadata goes with it"


def test_the_weight_that_counts_is_the_time_decayed_one():
    catalogue = Catalogue(max_items=CAP)
    catalogue.put_stats("old-purchase", stats_of(8.0, T0))  # 8 four half-lives ago: 0.5 now
    for number in range(CAP + CAP // 10):
        catalogue.put_stats(f"sku-{number:03d}", stats_of(1.0, T0 + 4 * HALF_LIFE))

    assert "old-purchase" not in catalogue.stats
    assert len(catalogue) == CAP


def test_items_with_metadata_only_go_first_the_unavailable_ones_last():
    catalogue = Catalogue(max_items=CAP)
    with_stats = [f"sku-{number:03d}" for number in range(60)]
    for item in with_stats:
        catalogue.put_meta(item, {"available": True})
        catalogue.put_stats(item, stats_of(0.01))  # lighter than any event, heavier than metadata alone
    unavailable = [f"gone-{number}" for number in range(6)]
    for item in unavailable:
        catalogue.put_meta(item, {"available": False})
    for number in range(10_000):  # an item catalogue import
        catalogue.put_meta(f"new-{number:05d}", {"available": True})

    assert len(catalogue) <= CAP + CAP // 10
    assert set(catalogue.stats) == set(with_stats), "no item with stats dropped while one with metadata only is left"
    assert set(with_stats) <= set(catalogue.meta), "the metadata of an item with stats stays"
    assert set(unavailable) <= set(catalogue.meta), "an item without metadata reads as available: the unavailable stay longest"
    assert not catalogue.is_available("gone-0")


def test_a_withdrawn_item_dropped_for_its_weight_stays_unavailable_when_viewed_again():
    catalogue = Catalogue(max_items=CAP)
    catalogue.put_meta("sku-withdrawn", {"available": False})
    catalogue.put_stats("sku-withdrawn", stats_of(0.5))
    for number in range(CAP + CAP // 10):
        catalogue.put_stats(f"sku-{number:03d}", stats_of(2.0))
    assert "sku-withdrawn" not in catalogue.stats

    catalogue.put_stats("sku-withdrawn", stats_of(0.5, T0 + 60))  # a view after the drop, no new metadata

    assert not catalogue.is_available("sku-withdrawn")
    assert len(catalogue) <= CAP + CAP // 10


def test_a_dropped_item_comes_back_with_its_next_update():
    catalogue = Catalogue(max_items=CAP)
    catalogue.put_stats("sku-light", stats_of(0.5))
    for number in range(CAP + CAP // 10):
        catalogue.put_stats(f"sku-{number:03d}", stats_of(2.0))
    assert "sku-light" not in catalogue.stats

    catalogue.put_stats("sku-light", stats_of(0.5, T0 + 60))
    catalogue.put_meta("sku-light", {"available": False})

    assert catalogue.weight("sku-light") > 0 and not catalogue.is_available("sku-light")


def test_trending_names_no_dropped_item_even_before_its_refresh():
    catalogue = Catalogue(clock=lambda: 0.0, trending_refresh=3600.0, max_items=CAP)
    catalogue.put_stats("sku-light", stats_of(0.5))
    assert [item for item, _ in catalogue.trending()] == ["sku-light"]

    for number in range(CAP + CAP // 10):
        catalogue.put_stats(f"sku-{number:03d}", stats_of(2.0))

    trending = [item for item, _ in catalogue.trending()]
    assert "sku-light" not in trending and set(trending) == set(catalogue.stats)


def consume(catalogue: Catalogue, sessions: Dict[str, Any], offset: int, user: str, item: str, ts: float) -> None:
    """The agents' data flow in memory: session -> item updates -> item stats -> catalogue."""
    user_event = UserEvent(user_id=user, item_id=item, event="view", ts=ts)
    update = update_session(sessions.get(user, {}), user_event, offset)
    sessions[user] = update.session
    for other, item_update in item_updates(user_event, update.previous_items, (0, offset)).items():
        stats = apply_item_update(catalogue.stats.get(other), item_update)
        if stats is not None:
            catalogue.put_stats(other, stats)


def test_recommendations_trending_and_refits_are_served_from_the_items_kept():
    catalogue = Catalogue(clock=lambda: 0.0, trending_refresh=0.0, max_items=CAP)
    sessions: Dict[str, Any] = {}
    offset = 0
    for number in range(40):  # 40 users view a cluster of six items, one after another
        for step, item in enumerate(f"hot-{(number + shift) % 6}" for shift in range(3)):
            offset += 1
            consume(catalogue, sessions, offset, f"h{number}", item, T0 + number * 10 + step)
    for number in range(2_000):  # the long tail: items viewed once, each by another user
        offset += 1
        consume(catalogue, sessions, offset, f"t{number}", f"tail-{number:04d}", T0 + 500 + number)

    assert len(catalogue) <= CAP + CAP // 10
    assert {f"hot-{number}" for number in range(6)} <= set(catalogue.stats)
    assert all(item in catalogue.stats for item, _ in catalogue.trending())

    result = recommend([["hot-0", 1.0, T0, 1]], [], catalogue, None, k=10)
    assert result.strategy == "session-knn"
    assert {"hot-1", "hot-2", "hot-4", "hot-5"} <= {item for item, _ in result.items[:5]}
    assert len(result.items) == 10 and all(item in catalogue.stats for item, _ in result.items)

    snapshot = catalogue.snapshot()
    assert len(snapshot) == len(catalogue) and snapshot.max_items == CAP
    model = fit_item_embeddings(snapshot, version=1, fingerprint="bounded", dims=4)
    assert model is not None and set(model.items) <= set(catalogue.stats)
