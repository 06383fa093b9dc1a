"""app/log_handler.py: a service's Python logging reaches the ``logs`` topic as lines the worker parses."""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from datetime import datetime, timezone

from app.log_handler import KafkaLogHandler
from models.logs import RecordContext, parse_record
from tests.support.kafka import consume_sync, consume_to_end
from tests.support.workers import wait_for


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
    assert (lines[1]["error.type"], lines[1]["error.message"]) == ("ValueError", "card expired")

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


def test_long_lines_go_in_records_that_fit_kafka_and_an_overlong_message_is_cut(isolated_broker):
    """Thirty 60 kB lines were one 1.8 MB record, over Kafka's 1 MB limit: the send failed, the
    shipping thread ended and every line after it was dropped."""
    handler = KafkaLogHandler(isolated_broker.bootstrap, service="search", host="search-pod-1")
    logger = logging.getLogger("search.indexer.test")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        for i in range(30):
            logger.warning("slow query %d: %s", i, "x" * 60_000)
        logger.error("result too large: %s", "y" * 200_000)
        logger.info("still shipping")
    finally:
        logger.removeHandler(handler)
        handler.close(timeout=30)
    assert handler.sent == 32 and handler.dropped == 0

    records = asyncio.run(consume_to_end(isolated_broker.bootstrap, "logs"))
    assert len(records) >= 3 and all(len(record.value) <= handler.max_record_bytes for record in records)
    lines = [line for record in records for line in json.loads(record.value)]
    assert len(lines) == 32
    assert all(line["message"].startswith(f"slow query {i}: x") for i, line in enumerate(lines[:30]))
    cut = lines[30]
    assert len(cut["message"]) == handler.max_field_chars and cut["truncated"] is True
    assert lines[31]["message"] == "still shipping" and "truncated" not in lines[31]


def test_with_the_root_logger_at_debug_only_the_applications_lines_are_shipped(isolated_broker):
    """The handler's own Kafka client logs at DEBUG in its shipping thread: attached to the root
    logger, it shipped those lines too (each send logging more), 50 application lines became
    about 10,000 documents."""
    root = logging.getLogger()
    level = root.level
    handler = KafkaLogHandler(isolated_broker.bootstrap, service="billing", host="billing-pod-1")
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    logger = logging.getLogger("billing.invoices.test")
    try:
        for i in range(50):
            logger.log((logging.DEBUG, logging.INFO, logging.WARNING)[i % 3], "invoice %d issued", i)
            if i % 10 == 9:  # let each ten be sent (and the client log about it) before the next
                wait_for(lambda shipped=i + 1: handler.sent >= shipped, interval=0.05, message=f"{i + 1} lines sent")
        logging.getLogger("aiokafka.producer.test").debug("the Kafka client's own line: not shipped")
    finally:
        root.removeHandler(handler)
        handler.close(timeout=30)
        root.setLevel(level)

    records = asyncio.run(consume_to_end(isolated_broker.bootstrap, "logs"))
    lines = [line for record in records for line in json.loads(record.value)]
    assert [line["message"] for line in lines] == [f"invoice {i} issued" for i in range(50)]
    assert {line["log.logger"] for line in lines} == {"billing.invoices.test"}
    assert handler.sent == 50 and handler.dropped == 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_while_kafka_is_unreachable_lines_wait_and_are_counted_as_dropped_only_at_close(capfd):
    handler = KafkaLogHandler(f"127.0.0.1:{free_port()}", service="cart")  # nothing listens there
    logger = logging.getLogger("cart.unreachable.test")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        for i in range(3):
            logger.info("line %d", i)
        time.sleep(2.5)  # several connection attempts under the retry policy
        waiting = handler.dropped
        alive = handler._thread.is_alive()
    finally:
        logger.removeHandler(handler)
        handler.close(timeout=10)

    assert waiting == 0 and alive  # nothing given up while the service runs
    assert handler.dropped == 3 and handler.sent == 0
    assert not handler._thread.is_alive()
    assert "3 log lines of cart not shipped" in capfd.readouterr().err
