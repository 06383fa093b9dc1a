"""The pure recommendation functions: parsing, sessions, co-occurrence with dedupe and decay, scorers,
the item model and its persistence, blending and exclusions, and the synthetic click-stream."""
from __future__ import annotations

import json
from typing import List

import pytest

from models.clickstream import ClickstreamConfig, read_csv_events, synthetic_events
from models.recommendations import (
    HALF_LIFE,
    SESSION_LENGTH,
    TREND_STEP,
    Catalogue,
    InvalidEvent,
    UserEvent,
    add_decayed,
    add_purchase,
    apply_item_update,
    decayed_value,
    fit_item_embeddings,
    item_updates,
    load_latest_model,
    model_from_bytes,
    model_to_bytes,
    parse_item,
    parse_user_event,
    recommend,
    save_model,
    update_session,
    windowed_popularity,
)

T0 = 1767225600.0


def event(item: str, ts: float, kind: str = "view", user: str = "u1", session_id=None) -> UserEvent:
    return UserEvent(user_id=user, item_id=item, event=kind, ts=ts, session_id=session_id)


def raw(**fields) -> bytes:
    return json.dumps({"user_id": "u1", "item_id": "sku-1", "event": "view", "ts": T0, **fields}).encode()


class Replica:
    """The agents' data flow in memory: sessions -> item updates -> item stats -> catalogue."""

    def __init__(self) -> None:
        self.catalogue = Catalogue(clock=lambda: 0.0, trending_refresh=0.0)
        self.sessions, self.purchased, self.offset = {}, {}, 0

    def consume(self, user_event: UserEvent) -> None:
        self.offset += 1
        update = update_session(self.sessions.get(user_event.user_id, {}), user_event, self.offset)
        self.sessions[user_event.user_id] = update.session
        if user_event.event == "purchase":
            self.purchased[user_event.user_id] = add_purchase(self.purchased.get(user_event.user_id, {}), user_event.item_id)
        for item, update_of_item in item_updates(user_event, update.previous_items, (0, self.offset)).items():
            stats = apply_item_update(self.catalogue.stats.get(item), update_of_item)
            if stats is not None:
                self.catalogue.put_stats(item, stats)

    def session(self, user: str):
        return self.sessions.get(user, {}).get("items", [])

    def recommend(self, user: str, k: int = 10, model=None):
        return recommend(self.session(user), self.purchased.get(user, {}).get("items", []), self.catalogue, model, k)


def co_viewing_replica() -> Replica:
    """Other users view sku-a then sku-c and sku-b then sku-d; sku-pop is the most viewed item."""
    replica = Replica()
    for number in range(20):
        replica.consume(event("sku-pop", T0 + number, user=f"p{number}"))
    for number in range(10):
        user, ts = f"h{number}", T0 + number * 10
        first, second = ("sku-a", "sku-c") if number % 2 else ("sku-b", "sku-d")
        for offset, item in enumerate(["sku-pop", first, second]):
            replica.consume(event(item, ts + offset, user=user))
    return replica


# --- parsing ---------------------------------------------------------------------------------------


def test_a_valid_event_is_parsed_and_weighted_by_type():
    parsed = parse_user_event(raw(event="add_to_cart", session_id="s1"), "u1", now=T0)
    assert (parsed.user_id, parsed.item_id, parsed.event, parsed.session_id, parsed.ts) == ("u1", "sku-1", "add_to_cart", "s1", T0)
    weights = [parse_user_event(raw(event=kind), "u1", now=T0).weight for kind in ("view", "click", "add_to_cart", "purchase")]
    assert weights == sorted(weights) and len(set(weights)) == 4


@pytest.mark.parametrize("record, reason", [
    (b"", "empty record"),
    (b"{nope", "not JSON"),
    (b"[1]", "JSON object"),
    (raw(event="like"), "'event' must be one of"),
    (raw(item_id=""), "'item_id'"),
    (raw(item_id=7), "'item_id'"),
    (raw(user_id="u2"), "does not match the record key"),
    (raw(ts="yesterday"), "'ts' must be a finite number"),
    (raw(ts=T0 / 1000), "plausible event time"),
])
def test_an_invalid_event_is_refused_with_a_reason(record, reason):
    with pytest.raises(InvalidEvent, match=reason):
        parse_user_event(record, "u1", now=T0)


def test_a_keyless_event_takes_its_user_from_the_body():
    assert parse_user_event(raw(user_id="u9"), None, now=T0).user_id == "u9"


def test_item_metadata_is_parsed_and_checked_against_its_key():
    item = parse_item(json.dumps({"item_id": "sku-1", "category": "shoes", "price": 9.5, "available": False}).encode(), "sku-1")
    assert (item.category, item.price, item.available) == ("shoes", 9.5, False)
    with pytest.raises(InvalidEvent, match="available"):
        parse_item(json.dumps({"item_id": "sku-1", "available": "no"}).encode(), "sku-1")
    with pytest.raises(InvalidEvent, match="does not match"):
        parse_item(json.dumps({"item_id": "sku-1"}).encode(), "sku-2")


# --- sessions --------------------------------------------------------------------------------------


def test_a_session_keeps_recent_items_in_order_and_pairs_new_items_with_the_previous_ones():
    first = update_session({}, event("a", T0), offset=1)
    second = update_session(first.session, event("b", T0 + 60), offset=2)
    assert [entry[0] for entry in second.session["items"]] == ["a", "b"]
    assert [entry[0] for entry in second.previous_items] == ["a"]
    assert second.session["session_id"] == first.session["session_id"]


def test_thirty_minutes_of_inactivity_or_a_new_session_id_start_a_new_session():
    session = update_session({}, event("a", T0), offset=1).session
    late = update_session(session, event("b", T0 + 1801), offset=2)
    assert [entry[0] for entry in late.session["items"]] == ["b"] and late.previous_items == []
    other = update_session(session, event("b", T0 + 60, session_id="s2"), offset=2)
    assert other.session["session_id"] == "s2" and [entry[0] for entry in other.session["items"]] == ["b"]


def test_a_repeated_item_moves_to_the_end_keeps_its_highest_weight_and_pairs_nothing():
    session = update_session({}, event("a", T0, "add_to_cart"), offset=1).session
    session = update_session(session, event("b", T0 + 1), offset=2).session
    again = update_session(session, event("a", T0 + 2), offset=3)
    assert [entry[0] for entry in again.session["items"]] == ["b", "a"]
    assert again.session["items"][-1][1] == 4.0
    assert again.previous_items == []


def test_a_session_is_bounded():
    session = {}
    for number in range(SESSION_LENGTH + 5):
        session = update_session(session, event(f"i{number}", T0 + number), offset=number).session
    assert len(session["items"]) == SESSION_LENGTH and session["items"][-1][0] == f"i{SESSION_LENGTH + 4}"


def test_a_replayed_event_changes_nothing_and_re_derives_the_same_pairs():
    session = update_session({}, event("a", T0), offset=1).session
    first = update_session(session, event("b", T0 + 1), offset=2)
    replay = update_session(first.session, event("b", T0 + 1), offset=2)
    assert replay.replayed and replay.session == first.session
    assert replay.previous_items == first.previous_items


def test_purchases_are_remembered_once_and_bounded():
    purchased = add_purchase(add_purchase({}, "a"), "a")
    assert purchased == {"items": ["a"]}


# --- co-occurrence ---------------------------------------------------------------------------------


def test_an_event_updates_its_item_and_each_previous_item_with_the_pair_weighted_by_distance():
    updates = item_updates(event("c", T0), [["a", 1.0, T0, 1], ["b", 1.0, T0, 2]], (3, 7))
    assert set(updates) == {"a", "b", "c"}
    assert updates["b"]["pairs"] == {"c": 1.0} and updates["a"]["pairs"] == {"c": 0.5}
    assert updates["c"]["pairs"] == {"b": 0.5, "a": 0.25} and updates["c"]["weight"] == 1.0
    assert all(update["source"] == [3, 7] for update in updates.values())


def test_an_item_update_is_applied_once_per_source_offset():
    update = {"item": "a", "source": [0, 5], "ts": T0, "weight": 1.0, "pairs": {"b": 1.0}}
    stats = apply_item_update(None, update)
    assert apply_item_update(stats, update) is None
    assert apply_item_update(stats, {**update, "source": [1, 5]}) is not None  # another partition


def test_decay_halves_weights_per_half_life_in_any_arrival_order():
    assert decayed_value(add_decayed(None, 2.0, T0), T0 + HALF_LIFE) == pytest.approx(1.0)
    in_order = add_decayed(add_decayed(None, 1.0, T0), 1.0, T0 + HALF_LIFE)
    reversed_order = add_decayed(add_decayed(None, 1.0, T0 + HALF_LIFE), 1.0, T0)
    assert in_order == pytest.approx(reversed_order)
    assert in_order == pytest.approx([1.5, T0 + HALF_LIFE])


def test_only_the_top_neighbours_are_kept():
    stats = None
    for number in range(40):
        stats = apply_item_update(stats, {"item": "a", "source": [0, number], "ts": T0, "weight": 0.0, "pairs": {f"n{number}": 1.0 + number}}, max_neighbours=10)
    assert len(stats["neighbours"]) <= 15 and "n39" in stats["neighbours"] and "n0" not in stats["neighbours"]


def test_popularity_is_a_hopping_window_of_panes():
    stats = None
    for number, ts in enumerate([T0, T0 + 10, T0 + TREND_STEP, T0 + 30 * TREND_STEP]):
        stats = apply_item_update(stats, {"item": "a", "source": [0, number], "ts": ts, "weight": 1.0, "pairs": {}})
    assert len(stats["panes"]) == 1  # older panes than the window are dropped
    assert windowed_popularity({str(int(T0)): 2.0, str(int(T0 + TREND_STEP)): 1.0}, T0 + TREND_STEP) == 3.0


# --- scoring and blending --------------------------------------------------------------------------


def test_a_new_user_gets_trending_items():
    replica = co_viewing_replica()
    result = replica.recommend("newcomer", k=3)
    assert result.strategy == "trending" and result.items[0][0] == "sku-pop"


def test_after_viewing_a_and_b_the_items_co_viewed_with_them_lead():
    replica = co_viewing_replica()
    replica.consume(event("sku-a", T0 + 500, user="newcomer"))
    replica.consume(event("sku-b", T0 + 501, user="newcomer"))
    result = replica.recommend("newcomer", k=5)
    assert result.strategy == "session-knn"
    assert {item for item, _ in result.items[:2]} == {"sku-c", "sku-d"}
    assert [item for item, _ in result.items[:2]] == ["sku-d", "sku-c"]  # the latest item counts most
    assert not {"sku-a", "sku-b"} & {item for item, _ in result.items}


def test_purchased_and_unavailable_items_are_never_recommended():
    replica = co_viewing_replica()
    replica.consume(event("sku-a", T0 + 500, user="newcomer"))
    replica.consume(event("sku-c", T0 + 501, "purchase", user="buyer"))
    replica.catalogue.put_meta("sku-pop", {"available": False})
    replica.consume(event("sku-a", T0 + 502, user="buyer"))
    for user in ("newcomer", "buyer"):
        items = {item for item, _ in replica.recommend(user, k=10).items}
        assert "sku-pop" not in items
    assert "sku-c" not in {item for item, _ in replica.recommend("buyer", k=10).items}
    assert "sku-c" in {item for item, _ in replica.recommend("newcomer", k=10).items}


def test_the_item_model_generalises_co_occurrence_and_is_blended():
    replica = co_viewing_replica()
    model = fit_item_embeddings(replica.catalogue, version=1, fingerprint="f")
    assert model is not None and model.version == 1 and set(model.items) == {"sku-pop", "sku-a", "sku-b", "sku-c", "sku-d"}
    replica.consume(event("sku-a", T0 + 500, user="newcomer"))
    result = replica.recommend("newcomer", k=3, model=model)
    assert result.strategy == "blended" and result.items[0][0] == "sku-c"


def test_the_model_round_trips_through_bytes_and_disk_newest_version_first(tmp_path):
    replica = co_viewing_replica()
    models = [fit_item_embeddings(replica.catalogue, version=version, fingerprint=str(version)) for version in (1, 2, 3, 4)]
    for model in models:
        save_model(model, tmp_path, keep=2)
    loaded = load_latest_model(tmp_path)
    assert loaded.version == 4 and loaded.items == models[-1].items
    assert len(list(tmp_path.glob("model-*.npz"))) == 2
    (tmp_path / "model-00000009.npz").write_bytes(b"torn")
    assert load_latest_model(tmp_path).version == 4
    assert model_from_bytes(model_to_bytes(models[0])).fingerprint == "1"


def test_too_little_data_gives_no_model():
    assert fit_item_embeddings(Catalogue(), version=1, fingerprint="") is None


def test_answers_are_deterministic_for_the_same_data():
    first, second = co_viewing_replica(), co_viewing_replica()
    for replica in (first, second):
        replica.consume(event("sku-b", T0 + 500, user="newcomer"))
    assert first.recommend("newcomer", k=5) == second.recommend("newcomer", k=5)


# --- click-stream ----------------------------------------------------------------------------------


def test_the_synthetic_click_stream_is_seeded_time_ordered_and_power_law():
    config = ClickstreamConfig(sessions=400, users=200, items=300)
    events = synthetic_events(config)
    assert events == synthetic_events(config)
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)
    counts: dict = {}
    for e in events:
        counts[e["item_id"]] = counts.get(e["item_id"], 0) + 1
    ranked: List[int] = sorted(counts.values(), reverse=True)
    assert sum(ranked[: len(ranked) // 10]) > 0.3 * len(events)  # the top 10 % of items take a large share


def test_csv_layouts_of_retailrocket_and_yoochoose_are_read(tmp_path):
    retailrocket = tmp_path / "events.csv"
    retailrocket.write_text("timestamp,visitorid,event,itemid,transactionid\n1433221332117,257597,view,355908,\n1433221332000,1,addtocart,5,\n")
    events = read_csv_events(retailrocket)
    assert [(e["user_id"], e["item_id"], e["event"]) for e in events] == [("v1", "5", "add_to_cart"), ("v257597", "355908", "view")]
    yoochoose = tmp_path / "clicks.dat"
    yoochoose.write_text("1,2014-04-07T10:51:09.277Z,214536502,0\n1,2014-04-07T10:54:09.868Z,214536500,0\n")
    events = read_csv_events(yoochoose)
    assert [(e["session_id"], e["item_id"]) for e in events] == [("1", "214536502"), ("1", "214536500")]


def test_table_keys_are_the_raw_topic_keys_so_table_routes_find_the_owner():
    from tables.recommendations import recs_item_meta, recs_item_stats, recs_purchased, recs_sessions

    # A str key would be JSON-encoded ('"u42"') and hash to another partition than the record key.
    for table in (recs_sessions, recs_purchased, recs_item_stats, recs_item_meta):
        assert table.changelog_topic.prepare_key("u42", None)[0] == b"u42", table.name


@pytest.mark.parametrize("raw, k", [(None, 10), ("1", 1), ("100", 100)])
def test_k_defaults_to_ten_and_accepts_1_to_100(raw, k):
    from agents.recommendations import requested_k

    assert requested_k(raw) == k


@pytest.mark.parametrize("raw", ["0", "101", "-3", "ten", "2.5"])
def test_k_outside_1_to_100_is_refused(raw):
    from agents.recommendations import requested_k

    with pytest.raises(ValueError, match="k must be an integer in 1..100"):
        requested_k(raw)
