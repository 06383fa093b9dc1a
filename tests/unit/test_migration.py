"""The V1 -> V2 mapping, comparison and routing rules (models/migration.py), without Kafka."""
from __future__ import annotations

from collections import Counter
from decimal import Decimal

import pytest

from models.migration import (
    CompareRules, InvalidRecord, answering_system, canary_bucket, check_phase_change, compare_results,
    parse_command, phase_at, translate, v1_event_id,
)

V1 = {"id": "o-1", "customer": "c-9", "total_cents": 1250, "status": "NEW", "created": "2024-11-01 10:00:00"}


def test_a_schema_1_event_translates_to_the_v2_format():
    order = translate(dict(V1))
    assert order.asdict() == {
        "order_id": "o-1", "customer_id": "c-9", "amount": {"value": "12.50", "currency": "USD"},
        "state": "created", "created_at": "2024-11-01T10:00:00Z", "source_version": 1,
        "event_id": v1_event_id(V1),
    }


def test_a_schema_2_event_needs_no_upcasting():
    v1 = {"schema_version": 2, "event_id": "e-7", "id": "o-2", "customer": "c-1", "total": "99.9",
          "currency": "eur", "status": "paid", "created_at": "2024-11-01T12:00:00+02:00"}
    order = translate(v1)
    assert (order.amount, order.state, order.created_at, order.source_version, order.event_id) == (
        {"value": "99.90", "currency": "EUR"}, "paid", "2024-11-01T10:00:00Z", 2, "e-7")


def test_the_same_event_has_the_same_id_and_a_changed_one_another():
    assert v1_event_id(dict(V1)) == v1_event_id(dict(reversed(list(V1.items()))))
    assert v1_event_id(dict(V1)) != v1_event_id({**V1, "status": "PAID"})


@pytest.mark.parametrize("change, reason", [
    ({"total_cents": -5}, "non-negative integer"),
    ({"total_cents": "12"}, "non-negative integer"),
    ({"status": "LOST"}, "unknown V1 status"),
    ({"created": "yesterday"}, "not a date-time"),
    ({"id": ""}, "'id' must be a non-empty string"),
    ({"schema_version": 9}, "unknown V1 schema_version"),
    ({"currency": "dollars"}, "ISO 4217"),
])
def test_invalid_v1_events_are_refused_with_a_reason(change, reason):
    with pytest.raises(InvalidRecord, match=reason):
        translate({**V1, **change})


def test_results_compare_after_normalisation_with_tolerance_and_ignored_fields():
    rules = CompareRules(ignore=frozenset({"source_version", "event_id"}), tolerance=Decimal("0.005"))
    v2_same = {"order_id": "o-1", "customer_id": "c-9", "amount": {"value": "12.5", "currency": "usd"},
               "state": "created", "created_at": "2024-11-01T10:00:00Z", "source_version": 2, "event_id": "x"}
    assert compare_results(V1, v2_same, rules) == {}
    v2_buggy = {**v2_same, "amount": {"value": "12.51", "currency": "USD"}, "state": "paid"}
    assert compare_results(V1, v2_buggy, rules) == {"amount.value": ("12.50", "12.51"), "state": ("created", "paid")}


def test_phase_walk_rules():
    assert check_phase_change("shadow", "canary", 10) == 10
    assert check_phase_change("canary", "cutover", None) == 0
    assert check_phase_change("cutover", "rollback", None) == 0
    for current, phase, percent, reason in [
        ("shadow", "cutover", None, "cannot go from shadow to cutover"),
        ("cutover", "canary", 5, "cannot go from cutover"),
        ("shadow", "canary", 0, "canary_percent"),
        ("shadow", "canary", 100, "canary_percent"),
        ("shadow", "live", None, "phase must be one of"),
    ]:
        with pytest.raises(ValueError, match=reason):
            check_phase_change(current, phase, percent)


def test_canary_takes_a_stable_share_of_keys():
    keys = [f"o-{i}" for i in range(10_000)]
    answered = Counter(answering_system("canary", 10, key) for key in keys)
    assert 900 <= answered["v2"] <= 1100
    assert [canary_bucket(key) for key in keys[:50]] == [canary_bucket(key) for key in keys[:50]]
    assert {answering_system("shadow", 0, key) for key in keys} == {"v1"}
    assert {answering_system("cutover", 0, key) for key in keys} == {"v2"}
    assert {answering_system("rollback", 0, key) for key in keys} == {"v1"}


def test_a_command_is_routed_by_the_phase_in_force_at_its_offset():
    history = [[10, "canary", 10], [20, "cutover", 0]]
    assert phase_at(history, 5) == ("shadow", 0)
    assert phase_at(history, 11) == ("canary", 10)
    assert phase_at(history, 25) == ("cutover", 0)


def test_commands_are_validated():
    assert parse_command({"command_id": "c1", "order_id": "o1", "action": "pay"})["payload"] == {}
    with pytest.raises(InvalidRecord, match="command_id"):
        parse_command({"order_id": "o1", "action": "pay"})
