"""models/metrics.py ``parsed_json`` and models/cdc.py ``strict_json``: orjson's speed, the
standard library's result, for any bytes."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.cdc import _STRICT_DECODER, InvalidChange, strict_json
from models.metrics import parsed_json

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.text() | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers() | st.integers(min_value=2**62, max_value=2**80) | st.integers(min_value=-(2**80), max_value=-(2**62)),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


stdlib = json.loads


def same(a, b) -> bool:
    """Equal values of equal types (1 and 1.0 differ here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES, indent=st.sampled_from([None, 1]))
def test_any_json_text_is_read_as_the_standard_library_reads_it(value, indent):
    raw = json.dumps(value, indent=indent).encode()
    parsed, _ = parsed_json(raw)
    assert same(parsed, stdlib(raw))


@pytest.mark.parametrize("raw", [
    b"18446744073709551616",  # past 64 bits: orjson would give a float
    b'{"total_cents": -9223372036854775809}',
    b"NaN", b"[1e400]", b"\xef\xbb\xbf{}", b'{"a": "\xed\xa0\x80"}', '{"a": 1}'.encode("utf-16"),
])
def test_what_orjson_refuses_or_reads_inexactly_is_read_by_the_standard_library(raw):
    assert same(parsed_json(raw)[0], stdlib(raw))


def test_the_depth_is_that_of_the_value():
    assert parsed_json(b"1")[1] == 0
    assert parsed_json(b'{"a": [[1], {"b": []}]}')[1] == 4
    assert parsed_json(b"[" * 70 + b"]" * 70)[1] == 70


@pytest.mark.parametrize("raw", [b"[1,", b"\xff", b"[" * 5000 + b"]" * 5000])
def test_what_neither_reads_fails_as_the_standard_library_fails(raw):
    with pytest.raises((ValueError, RecursionError)):
        parsed_json(raw)


# --- models/cdc.py ``strict_json``: orjson where it is sure to agree with the strict decoder ------

def strict_outcome(read):
    try:
        return "value", read()
    except (InvalidChange, ValueError, RecursionError):
        return "refused", None


HOSTILE_FRAGMENTS = [b"NaN", b"1e400", b"9" * 30, b"18446744073709551615", b"-9223372036854775809", b"[" * 600 + b"]" * 600]


@settings(max_examples=400, deadline=None)
@given(value=JSON_VALUES, indent=st.sampled_from([None, 1]), hostile=st.sampled_from([None, *HOSTILE_FRAGMENTS]))
def test_strict_json_reads_and_refuses_as_the_strict_standard_library_decoder(value, indent, hostile):
    raw = json.dumps(value, indent=indent).encode()
    if hostile is not None:
        raw = b"[" + hostile + b", " + raw + b"]"
    fast_kind, fast = strict_outcome(lambda: strict_json(raw, "value"))
    slow_kind, slow = strict_outcome(lambda: _STRICT_DECODER.decode(raw.decode()))
    assert fast_kind == slow_kind and (fast_kind == "refused" or same(fast, slow)), raw[:200]
