"""app/dead_letters.py: what a refused record's DLQ copy carries."""
from __future__ import annotations

from types import SimpleNamespace

from app.dead_letters import MAX_REASON_CHARS, dead_letter_record, short_reason


def refused(value: bytes) -> SimpleNamespace:
    return SimpleNamespace(message=SimpleNamespace(topic="logs", partition=3, offset=41, key=b"cart", value=value))


def test_the_copy_keeps_key_and_value_as_they_were_with_the_reason_and_origin_in_headers():
    key, value, headers = dead_letter_record(refused(b"not json"), "does not parse", max_bytes=1_000_000)
    assert (key, value) == (b"cart", b"not json")
    assert headers == {"dlq.reason": b"does not parse", "dlq.topic": b"logs", "dlq.partition": b"3", "dlq.offset": b"41"}


def test_a_copy_over_the_request_limit_goes_without_its_value_saying_so():
    key, value, headers = dead_letter_record(refused(b"x" * 999_950), "does not parse", max_bytes=1_000_000)
    assert key == b"cart" and value is None
    assert headers["dlq.value-dropped"].startswith(b"999950 bytes") and headers["dlq.offset"] == b"41"


def test_a_long_reason_is_cut_and_says_how_much_is_missing():
    reason = "; ".join(f"line {i}: Elasticsearch refused it (400): mapper_parsing_exception" for i in range(5000))
    short = short_reason(reason)
    assert short.startswith("line 0: ") and len(short) < MAX_REASON_CHARS + 40
    assert short.endswith(f"({len(reason) - MAX_REASON_CHARS} more characters)")
    assert short_reason("does not parse") == "does not parse"
