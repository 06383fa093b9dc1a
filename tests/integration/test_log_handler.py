"""app/log_handler.py: a service's Python logging reaches the ``logs`` topic as lines the worker parses."""
from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone

from app.log_handler import KafkaLogHandler
from models.logs import RecordContext, parse_record
from tests.support.kafka import consume_sync


def test_python_log_records_arrive_as_ecs_json_lines(isolated_broker):
    handler = KafkaLogHandler(isolated_broker.bootstrap, service="cart", host="cart-pod-1")
    logger = logging.getLogger("cart.checkout.test")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        logger.info("order %s placed", 42, extra={"trace_id": "t-42", "order_id": 42})
        try:
            raise ValueError("card expired")
        except ValueError:
            logger.exception("payment failed")
        logger.debug("not shipped: below the logger's level")
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert handler.sent == 2 and handler.dropped == 0

    records = consume_sync(isolated_broker.bootstrap, "logs", 1)
    assert {record.key for record in records} == {b"cart"}
    lines = [line for record in records for line in json.loads(record.value)]
    assert [line["message"] for line in lines] == ["order 42 placed", "payment failed"]

    context = RecordContext("cart", None, datetime.now(timezone.utc))
    docs = [doc for record in records for doc in parse_record(record.value, context)]
    placed, failed = docs
    assert placed["log"]["level"] == "info" and placed["trace"]["id"] == "t-42"
    assert placed["service"]["name"] == "cart" and placed["host"]["name"] == "cart-pod-1"
    assert placed["log"]["logger"] == "cart.checkout.test"
    assert placed["labels"]["order_id"] == "42"
    assert abs(datetime.fromisoformat(placed["@timestamp"].replace("Z", "+00:00")).timestamp() - time.time()) < 60
    assert failed["log"]["level"] == "error"
    assert failed["error"]["type"] == "ValueError" and "card expired" in failed["error"]["stack_trace"]
