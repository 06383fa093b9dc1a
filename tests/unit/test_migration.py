"""The V1 -> V2 mapping, comparison and routing rules (models/migration.py), without Kafka."""
from __future__ import annotations

import json
import re
from collections import Counter
from decimal import Decimal

import pytest
from hypothesis import given, settings, strategies as st

from models.migration import (
    CompareRules, InvalidRecord, PhaseMarker, RoutedCommand, answering_system, canary_bucket, check_phase_change,
    compare_results, decode_json, equal, message_bytes, parse_command, parse_commands_record, phase_at, translate,
    v1_event_id, with_marker,
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


# --- hostile values: refused with a reason (InvalidRecord), never another exception ---------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=8)
# Values that overflow a conversion: quantize, float(), astimezone, Decimal arithmetic.
HOSTILE_SCALARS = st.sampled_from([10**40, 10**400, 2**64, -1, 1e308, "1e999999", "-9e999999", "1e-999999", "sNaN", "NaN", "-0",
                                   "0001-01-01T00:30:00+01:00", "9999-12-31T23:30:00-01:00", "0999-01-01 00:00:00", "\ud800", "", " ",
                                   "ÄÖÜ", True, None, [], {}])


def field(valid):
    return st.one_of(st.just(valid), HOSTILE_SCALARS, JSON_VALUES)


ANY_V1_EVENT = st.fixed_dictionaries(
    {"id": field("o-1"), "customer": field("c-9"), "status": field("PAID"), "currency": field("EUR")},
    optional={"schema_version": st.sampled_from([1, 2, 3, "2", True]), "event_id": field("e-1"), "total_cents": field(1250),
              "total": field("12.50"), "created": field("2024-11-01 10:00:00"), "created_at": field("2024-11-01T10:00:00Z")})


@settings(max_examples=1000, deadline=None)
@given(ANY_V1_EVENT)
def test_any_v1_event_translates_or_is_refused_with_a_reason(event):
    try:
        order = translate(event)
    except InvalidRecord as error:
        assert str(error)
    else:
        assert re.fullmatch(r"\d+\.\d\d", order.amount["value"]) and re.fullmatch(r"[A-Z]{3}", order.amount["currency"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", order.created_at)


@settings(max_examples=1000, deadline=None)
@given(st.one_of(HOSTILE_SCALARS, JSON_VALUES), st.one_of(HOSTILE_SCALARS, JSON_VALUES))
def test_comparing_any_two_values_never_raises(v1, v2):
    rules = CompareRules()
    assert isinstance(equal(v1, v2, rules), bool)
    assert isinstance(compare_results({"total": v1, "status": v1}, {"total": v2, "state": v2}, rules), dict)


def test_huge_numbers_of_opposite_signs_are_not_equal():
    assert not equal("9e999999", "-9e999999", CompareRules())
    assert equal("9e999999", "9E+999999", CompareRules())


@pytest.mark.parametrize("change, reason", [
    ({"total_cents": 10**40}, "too large an amount"),
    ({"schema_version": 2, "total": "1e999999", "currency": "EUR", "created_at": "2024-11-01T10:00:00Z"}, "too large an amount"),
    ({"schema_version": 2, "total": 10**400, "currency": "EUR", "created_at": "2024-11-01T10:00:00Z"}, "too large an amount"),
    ({"created": "0001-01-01T00:30:00+01:00"}, "out of range in UTC"),
    ({"created": "9999-12-31T23:30:00-01:00"}, "out of range in UTC"),
    ({"event_id": "e" * 300}, "more than 256"),
    ({"currency": "ÄÖÜ"}, "ISO 4217"),
])
def test_values_that_overflow_a_conversion_are_refused_with_a_reason(change, reason):
    with pytest.raises(InvalidRecord, match=reason):
        translate({**V1, **change})


def test_dates_before_year_1000_keep_four_digits():
    assert translate({**V1, "created": "0999-03-01 10:00:00"}).created_at == "0999-03-01T10:00:00Z"


@pytest.mark.parametrize("value, reason", [
    (b"[" * 10_000 + b"]" * 10_000, "deeper than 64"),
    (b'{"a": ' + b"[" * 65 + b"]" * 65 + b"}", "deeper than 64"),
    (b"9" * 5000, "not JSON"),
    (b'{"a": NaN}', "NaN is not a number"),
    (b'{"a": -Infinity}', "-Infinity is not a number"),
    (b'{"a": 1e400}', "out of a number's range"),
    (b"\xff\xfe", "not JSON"),
    (None, "no value"),
])
def test_hostile_json_is_refused_with_a_reason(value, reason):
    with pytest.raises(InvalidRecord, match=reason):
        decode_json(value)


def test_json_as_deep_as_allowed_is_read():
    assert decode_json(b"[" * 64 + b"]" * 64) is not None


@pytest.mark.parametrize("marker, reason", [
    ({"phase": "live", "canary_percent": 0, "change_id": "c", "changed_at": 1}, "unknown phase"),
    ({"phase": "canary", "canary_percent": 100, "change_id": "c", "changed_at": 1}, "canary_percent"),
    ({"phase": "cutover", "canary_percent": 5, "change_id": "c", "changed_at": 1}, "canary_percent"),
    ({"phase": "cutover", "canary_percent": 0, "change_id": "", "changed_at": 1}, "change_id"),
    ({"phase": "cutover", "canary_percent": 0, "change_id": "c", "changed_at": 10**400}, "finite number"),
    ({"phase": "cutover", "canary_percent": 0, "change_id": "c", "changed_at": "now"}, "must be a number"),
    ([1], "JSON object"),
])
def test_phase_markers_are_validated(marker, reason):
    with pytest.raises(InvalidRecord, match=reason):
        parse_commands_record({"phase_marker": marker})


def test_a_marker_read_again_is_not_added_twice():
    marker = PhaseMarker(phase="cutover", canary_percent=0, change_id="c-1", changed_at=1.0)
    history = with_marker([[3, "canary", 10, "c-0"]], 7, marker, keep=100)
    assert history == [[3, "canary", 10, "c-0"], [7, "cutover", 0, "c-1"]]
    assert with_marker(history, 7, marker, keep=100) == history
    assert phase_at(history, 8) == ("cutover", 0) and phase_at([[3, "canary", 10]], 4) == ("canary", 10)


# --- messages carry exactly their documented fields ------------------------------------------------

V2_FIELDS = {"order_id", "customer_id", "amount", "state", "created_at", "source_version", "event_id"}


def message_bytes_keys(record) -> set:
    return set(json.loads(record.dumps()))


def test_v2_orders_routed_commands_and_markers_serialize_without_faust_metadata():
    assert message_bytes_keys(translate(dict(V1))) == V2_FIELDS
    routed = RoutedCommand(command_id="c", order_id="o", action="pay", payload={}, system="v1", answers=True,
                           phase="shadow", canary_percent=0)
    assert message_bytes_keys(routed) == {"command_id", "order_id", "action", "payload", "system", "answers", "phase", "canary_percent"}
    assert json.loads(message_bytes(routed)) == routed.asdict()
    marker = PhaseMarker(phase="shadow", canary_percent=0, change_id="c", changed_at=1.0)
    assert message_bytes_keys(marker) == {"phase", "canary_percent", "change_id", "changed_at"}


def test_the_comparison_rules_come_from_the_settings_given_to_register(monkeypatch):
    import agents.migration
    from app.settings import Settings

    monkeypatch.setenv("MIGRATION_IGNORE_FIELDS", " processed_at, ,note ")
    monkeypatch.setenv("MIGRATION_TOLERANCE", "0.25")
    monkeypatch.setattr(agents.migration, "RULES", agents.migration.RULES)  # restored after the test

    agents.migration.register(agents.migration.app, Settings())

    assert agents.migration.RULES.ignore == frozenset({"processed_at", "note"})
    assert agents.migration.RULES.tolerance == Decimal("0.25")
