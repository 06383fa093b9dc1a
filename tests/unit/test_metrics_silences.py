"""POST /alerts/silences bodies: JSON's NaN and Infinity literals, huge integers and other times a
silence cannot use are refused (the page answers 400), never stored."""
from __future__ import annotations

import json

import pytest

from agents.metrics import silence_from_request
from models.alerts import Silence

NOW = 1_900_000_000.0
MATCHERS = [{"name": "service", "value": "cart"}]


def body(**fields):
    return {"matchers": MATCHERS, "ends_at": NOW + 3600, **fields}


@pytest.mark.parametrize("raw", [
    b'{"matchers": [{"name": "service", "value": "cart"}], "ends_at": NaN}',
    b'{"matchers": [{"name": "service", "value": "cart"}], "ends_at": Infinity}',
    b'{"matchers": [{"name": "service", "value": "cart"}], "ends_at": -Infinity}',
    b'{"matchers": [{"name": "service", "value": "cart"}], "ends_at": 1' + b"0" * 400 + b"}",
    b'{"matchers": [{"name": "service", "value": "cart"}], "ends_at": 1e300}',
    b'{"matchers": [{"name": "service", "value": "cart"}], "ends_at": 1900003600, "starts_at": NaN}',
    b'{"matchers": [{"name": "service", "value": "cart"}], "ends_at": 1900003600, "starts_at": -Infinity}',
])
def test_a_time_that_is_not_a_finite_epoch_time_is_refused(raw):
    with pytest.raises(ValueError, match="epoch time"):
        silence_from_request(json.loads(raw), NOW)


@pytest.mark.parametrize("fields", [
    {"ends_at": "tomorrow"}, {"ends_at": True}, {"ends_at": NOW - 1}, {"ends_at": None},
    {"starts_at": NOW + 7200}, {"starts_at": "now"},
])
def test_an_end_that_is_not_after_now_and_the_start_is_refused(fields):
    with pytest.raises(ValueError):
        silence_from_request(body(**fields), NOW)


def test_a_label_value_no_json_document_can_hold_is_refused():
    with pytest.raises(ValueError):
        silence_from_request(json.loads(b'{"matchers": [{"name": "service", "value": "\\ud800"}], "ends_at": 1900003600}'), NOW)


def test_a_valid_silence_is_kept_with_float_times_and_round_trips():
    silence = silence_from_request(body(starts_at=NOW - 60, comment="deploy"), NOW)

    assert (silence.starts_at, silence.ends_at, silence.comment) == (NOW - 60, NOW + 3600, "deploy")
    assert Silence.loads(silence.dumps()) == silence


def silence_record(id_: str, ends_at: float) -> bytes:
    return Silence(id=id_, matchers=MATCHERS, starts_at=NOW - 60, ends_at=ends_at, created_by="", comment="").dumps()


@pytest.fixture
def bounded_silences(monkeypatch):
    import agents.metrics

    bounded = agents.metrics.settings.model_copy(update={"silence_retention": 3600.0, "silences_max": 100})
    monkeypatch.setattr("agents.metrics.settings", bounded)
    monkeypatch.setattr("agents.metrics.clock", lambda: NOW)
    return agents.metrics.SilenceCache()


def test_a_silence_expired_longer_than_the_retention_is_forgotten_and_a_recent_one_listed(bounded_silences):
    bounded_silences.receive(b"old", silence_record("old", NOW - 3601))
    bounded_silences.receive(b"recent", silence_record("recent", NOW - 3599))
    bounded_silences.receive(b"live", silence_record("live", NOW + 60))

    assert sorted(silence.id for silence in bounded_silences.active()) == ["live", "recent"]


def test_however_many_silences_arrive_the_cache_keeps_at_most_its_bound_and_the_longest_lasting(bounded_silences):
    for n in range(1000):
        bounded_silences.receive(str(n).encode(), silence_record(str(n), NOW + 60 + n))
        assert len(bounded_silences.silences) <= 110  # SILENCES_MAX and the 10 % trimmed in one step

    bounded_silences.forget(NOW)
    assert sorted(int(silence.id) for silence in bounded_silences.active()) == list(range(900, 1000))
    assert bounded_silences.is_full(NOW)
    assert not bounded_silences.is_full(NOW + 60 + 950)  # half of them have ended by then
