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
