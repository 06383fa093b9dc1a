"""Python tracebacks in plain-text and logfmt records get ECS ``error.*`` fields (models/logs.py).

Every traceback here is a real one: raised, caught, and formatted by the ``traceback`` module (or
by ``logging``'s own formatter), as a service writing to a file or stderr would print it.
"""
from __future__ import annotations

import json
import logging
import traceback
from datetime import datetime, timezone
from typing import Any, Callable, Dict

import orjson

from models.logs import RecordContext, parse_record

RECORD_TIME = datetime(2024, 11, 1, 9, 30, tzinfo=timezone.utc)


class PaymentTimeout(Exception):
    """Raised without a message."""


def context() -> RecordContext:
    return RecordContext("cart", None, RECORD_TIME)


def formatted(fail: Callable[[], Any]) -> str:
    """The traceback ``fail()`` prints, as ``traceback.print_exc`` writes it."""
    try:
        fail()
    except BaseException as error:  # noqa: BLE001 - every kind is a sample here
        return "".join(traceback.format_exception(error))
    raise AssertionError("fail() did not raise")


def parse_one(text: str) -> Dict[str, Any]:
    (doc,) = parse_record(text.encode(), context())
    return doc


def charge(card: Dict[str, str]) -> None:
    if card["state"] == "expired":
        raise ValueError("card expired")


def test_a_log_line_followed_by_its_traceback_is_one_error_document():
    stack_trace = formatted(lambda: charge({"state": "expired"}))
    doc = parse_one(f"2024-11-01 10:00:00,120 ERROR cart.checkout payment failed for order 42\n{stack_trace}")

    assert doc["message"] == "2024-11-01 10:00:00,120 ERROR cart.checkout payment failed for order 42"
    assert doc["@timestamp"] == "2024-11-01T10:00:00.120Z" and doc["log"]["level"] == "error"
    assert doc["error"] == {"type": "ValueError", "message": "card expired", "stack_trace": stack_trace.rstrip()}
    assert doc["error"]["stack_trace"].startswith("Traceback (most recent call last):\n")


def test_logging_formatters_output_with_exc_info_is_read_the_same_way():
    record = logging.LogRecord("cart.checkout", logging.WARNING, __file__, 1, "retrying payment %s", (42,), None)
    try:
        charge({"state": "expired"})
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    text = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s").format(record)

    doc = parse_one(text)

    assert doc["message"].endswith("WARNING cart.checkout retrying payment 42")
    assert doc["log"]["level"] == "warn"  # the line's own level, not error
    assert (doc["error"]["type"], doc["error"]["message"]) == ("ValueError", "card expired")
    assert doc["error"]["stack_trace"] == logging.Formatter().formatException(record.exc_info)


def test_the_last_exception_of_a_chain_is_the_error_and_the_whole_chain_the_stack_trace():
    def lookup_from() -> None:
        try:
            {}["sku-9"]
        except KeyError as missing:
            raise RuntimeError("price lookup failed") from missing

    def lookup_during() -> None:
        try:
            {}["sku-9"]
        except KeyError:
            raise LookupError("no price either")  # noqa: B904 - the implicit chain is the sample

    for fail, expected, separator in [
        (lookup_from, ("RuntimeError", "price lookup failed"), "direct cause of the following exception"),
        (lookup_during, ("LookupError", "no price either"), "During handling of the above exception"),
    ]:
        stack_trace = formatted(fail)
        doc = parse_one(f"ERROR pricing failed\n{stack_trace}")
        assert (doc["error"]["type"], doc["error"]["message"]) == expected
        assert separator in doc["error"]["stack_trace"] and "KeyError: 'sku-9'" in doc["error"]["stack_trace"]


def test_an_exception_without_a_message_has_a_type_and_no_error_message():
    def time_out() -> None:
        raise PaymentTimeout

    stack_trace = formatted(time_out)
    doc = parse_one(f"payment gave up\n{stack_trace}")

    assert doc["error"]["type"] == f"{__name__}.PaymentTimeout"
    assert "message" not in doc["error"]
    assert doc["message"] == "payment gave up" and doc["log"]["level"] == "error"  # a traceback means error


def test_a_syntax_errors_source_and_caret_lines_are_not_taken_for_the_exception():
    stack_trace = formatted(lambda: compile("total = (price *\n", "rules.py", "exec"))
    assert "^" in stack_trace  # the caret line under the source

    doc = parse_one(f"ERROR loading pricing rules\n{stack_trace}")

    assert doc["error"]["type"] == "SyntaxError"
    assert doc["error"]["message"] == "'(' was never closed"


def test_a_bare_traceback_is_summed_up_by_its_last_line():
    stack_trace = formatted(lambda: charge({"state": "expired"}))

    doc = parse_one(stack_trace)

    assert doc["message"] == "ValueError: card expired"
    assert doc["log"]["level"] == "error" and doc["@timestamp"] == "2024-11-01T09:30:00.000Z"
    assert doc["error"]["stack_trace"] == stack_trace.rstrip()


def test_a_multi_line_message_and_notes_belong_to_the_error_message():
    def fail() -> None:
        error = ValueError("3 items out of stock:\nsku-1\nsku-2")
        error.add_note("while reserving cart 7")
        raise error

    doc = parse_one(f"ERROR reservation failed\n{formatted(fail)}")

    assert doc["error"]["type"] == "ValueError"
    assert doc["error"]["message"] == "3 items out of stock:\nsku-1\nsku-2\nwhile reserving cart 7"


def test_an_exception_groups_own_exception_is_the_error():
    def fail() -> None:
        raise ExceptionGroup("2 shipments failed", [ValueError("no address"), TimeoutError("carrier away")])

    doc = parse_one(f"ERROR shipping\n{formatted(fail)}")

    assert (doc["error"]["type"], doc["error"]["message"]) == ("ExceptionGroup", "2 shipments failed (2 sub-exceptions)")


def test_a_logfmt_line_followed_by_a_traceback_keeps_its_fields():
    stack_trace = formatted(lambda: charge({"state": "expired"}))

    doc = parse_one(f'level=warn msg="payment retried" trace_id=t-7\n{stack_trace}')

    assert (doc["message"], doc["log"]["level"], doc["trace"]["id"]) == ("payment retried", "warn", "t-7")
    assert (doc["error"]["type"], doc["error"]["message"]) == ("ValueError", "card expired")


def test_tracebacks_in_a_json_array_of_text_lines_are_read_line_by_line():
    stack_trace = formatted(lambda: charge({"state": "expired"}))
    record = json.dumps(["INFO checkout started", f"ERROR checkout failed\n{stack_trace}"]).encode()

    started, failed = parse_record(record, context())

    assert "error" not in started and started["log"]["level"] == "info"
    assert failed["message"] == "ERROR checkout failed" and failed["error"]["type"] == "ValueError"


def test_a_json_line_with_only_a_python_stack_trace_gets_the_type_and_message_from_it():
    stack_trace = formatted(lambda: charge({"state": "expired"}))
    record = orjson.dumps({"message": "payment failed", "level": "error", "exc_info": stack_trace})

    (doc,) = parse_record(record, context())

    assert doc["error"] == {"type": "ValueError", "message": "card expired", "stack_trace": stack_trace}


def test_a_json_lines_own_error_fields_win_over_its_stack_trace():
    stack_trace = formatted(lambda: charge({"state": "expired"}))
    record = orjson.dumps({"message": "x", "error.type": "CardError", "error.message": "declined", "stack_trace": stack_trace})

    (doc,) = parse_record(record, context())

    assert (doc["error"]["type"], doc["error"]["message"]) == ("CardError", "declined")


def test_a_line_that_only_mentions_a_traceback_is_left_as_it_is():
    (doc,) = parse_record(b"three: Traceback (most recent call last):", context())
    assert doc["message"] == "three: Traceback (most recent call last):" and "error" not in doc
