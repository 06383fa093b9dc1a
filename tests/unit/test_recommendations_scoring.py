"""The item model's scores on planted structure: a session in one cluster gets that cluster's items,
and items of another cluster or of noise never outrank the trending fill, whatever the number of
components (a session outside them gives no model scores at all)."""
from __future__ import annotations

import random
from typing import List, Tuple

import pytest

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
CLUSTER_A = ["a0", "a1", "a2", "a3"]
CLUSTER_B = [f"b{i}" for i in range(6)]
NOISE = [f"n{i}" for i in range(8)]
TRENDING = ["t0", "t1", "t2"]
SESSION = [["a0", 1.0, T0 + 9000, 1]]  # a visitor who just viewed a0


def planted_sessions() -> List[Tuple[float, List[str]]]:
    """Known co-occurrence: cluster A's items are viewed together (6 sessions), cluster B's (40,
    more popular); noise items are dropped into random B sessions; one session long ago (ten
    half-lives: decayed to noise) is the only link between the clusters."""
    rng = random.Random(0)
    sessions = [(T0 - 10 * HALF_LIFE, ["a3", "n0", "b0"])]
    for number, items in enumerate([["a0", "a1", "a2"], ["a1", "a2", "a3"], ["a0", "a2", "a3"],
                                    ["a0", "a1", "a3"], ["a2", "a0", "a1"], ["a3", "a1", "a0"]]):
        sessions.append((T0 + number * 100, items))
    sessions += [(T0 + 1000 + number * 100, rng.sample(CLUSTER_B, 4)) for number in range(40)]
    for noise in NOISE:
        for _ in range(3):
            _ts, items = sessions[rng.randrange(7, len(sessions))]
            items.insert(rng.randrange(len(items) + 1), noise)
    return sorted(sessions, key=lambda session: session[0])


def planted_catalogue() -> Catalogue:
    """The item stats the agents build from the planted sessions, plus three items trending alone."""
    catalogue = Catalogue(clock=lambda: 0.0, trending_refresh=0.0)
    events = [(f"u{number}", item, ts + step) for number, (ts, items) in enumerate(planted_sessions()) for step, item in enumerate(items)]
    events += [(f"t{number}", TRENDING[number % 3], T0 + 6000 + number) for number in range(60)]
    sessions: dict = {}
    for offset, (user, item, ts) in enumerate(events):
        event = UserEvent(user_id=user, item_id=item, event="view", ts=ts)
        update = update_session(sessions.get(user, {}), event, offset)
        sessions[user] = update.session
        for other, item_update in item_updates(event, update.previous_items, (0, offset)).items():
            catalogue.put_stats(other, apply_item_update(catalogue.stats.get(other), item_update))
    return catalogue


@pytest.mark.parametrize("dims", [1, 2, 3, 8, 32])
def test_items_unrelated_to_the_session_never_outrank_the_trending_fill(dims):
    catalogue = planted_catalogue()
    model = fit_item_embeddings(catalogue, version=1, fingerprint="planted", dims=dims)

    ranked = [item for item, _score in recommend(SESSION, [], catalogue, model, k=20).items]

    assert set(ranked[:3]) == {"a1", "a2", "a3"}
    fill = [item for item, _score in catalogue.trending() if item not in CLUSTER_A]
    assert ranked[3:] == fill[:17], "after cluster A, the trending order"


@pytest.mark.parametrize("dims", [2, 3, 8, 32])
def test_the_model_scores_the_sessions_cluster_and_nothing_else(dims):
    model = fit_item_embeddings(planted_catalogue(), version=1, fingerprint="planted", dims=dims)

    scored = set(model.scores(SESSION))

    assert {"a1", "a2", "a3"} <= scored <= set(CLUSTER_A)


def test_a_session_outside_the_models_components_gets_no_model_scores():
    # One component: cluster B's. Cluster A's rows are float noise, which normalised to 1.0
    # would put B's items first.
    model = fit_item_embeddings(planted_catalogue(), version=1, fingerprint="planted", dims=1)

    assert model.coverage[model.index["a0"]] < 0.01 < model.coverage[model.index["b0"]]
    assert model.scores(SESSION) == {}
