"""A ``logging.Handler`` that services use to ship their logs to the ``logs`` topic.

    import logging
    from app.log_handler import KafkaLogHandler

    handler = KafkaLogHandler("kafka-1:9092,kafka-2:9092", service="cart")
    logging.getLogger().addHandler(handler)
    logging.getLogger("cart").error("payment declined", extra={"trace_id": "abc", "order_id": 42})

Each record becomes one JSON line with ECS field names; a background thread sends the lines in
JSON-array records (up to ``batch_lines`` lines) keyed by the service, so ``emit`` never blocks the
service on Kafka. When the queue is full (Kafka away for long) new lines are counted in
``dropped`` instead of growing memory; ``close()`` (called by ``logging.shutdown``) sends what is
queued.
"""
from __future__ import annotations

import asyncio
import json
import logging
import queue
import socket
import threading
import traceback
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional

from aiokafka import AIOKafkaProducer

# Attributes every LogRecord has; anything else came in through ``extra=`` and is shipped.
STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class KafkaLogHandler(logging.Handler):
    """Ship log records as ECS JSON lines to Kafka (see the module docstring)."""

    def __init__(
        self, bootstrap_servers: str, service: str, *, topic: str = "logs", host: Optional[str] = None,
        max_queue: int = 100_000, batch_lines: int = 100, level: int = logging.NOTSET,
    ) -> None:
        super().__init__(level)
        self.bootstrap_servers = bootstrap_servers
        self.service = service
        self.topic = topic
        self.host = host or socket.gethostname()
        self.batch_lines = batch_lines
        self.dropped = 0
        self.sent = 0
        self._queue: "queue.Queue[Dict[str, Any]]" = queue.Queue(maxsize=max_queue)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kafka-log-handler-{service}", daemon=True)
        self._thread.start()

    def line(self, record: logging.LogRecord) -> Dict[str, Any]:
        """The ECS JSON line of a record."""
        line: Dict[str, Any] = {
            "@timestamp": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "log.level": record.levelname.lower(),
            "service.name": self.service,
            "message": record.getMessage(),
            "log.logger": record.name,
            "host.name": self.host,
            "process.pid": record.process,
            "process.thread.name": record.threadName,
        }
        if record.exc_info:
            line["error.type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            line["error.stack_trace"] = "".join(traceback.format_exception(*record.exc_info))
        for name, value in vars(record).items():
            if name not in STANDARD_ATTRIBUTES and not name.startswith("_"):
                line[name] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        return line

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._queue.put_nowait(self.line(record))
        except queue.Full:
            self.dropped += 1
        except Exception:  # noqa: BLE001 - logging must never raise into the service
            self.handleError(record)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued (waiting at most ``timeout`` seconds), then stop."""
        self._closing.set()
        self._thread.join(timeout)
        super().close()

    def _run(self) -> None:
        asyncio.run(self._ship())

    def _take_batch(self) -> List[Dict[str, Any]]:
        lines: List[Dict[str, Any]] = []
        while len(lines) < self.batch_lines:
            try:
                lines.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return lines

    async def _ship(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers, linger_ms=20)
        while True:
            try:
                await producer.start()
                break
            except Exception:  # noqa: BLE001 - Kafka not reachable yet: keep queueing, try again
                if self._closing.is_set():
                    return
                await asyncio.sleep(1.0)
        try:
            key = self.service.encode()
            while True:
                lines = self._take_batch()
                if lines:
                    await producer.send(self.topic, json.dumps(lines, default=str).encode(), key=key)
                    self.sent += len(lines)
                elif self._closing.is_set():
                    break
                else:
                    await asyncio.sleep(0.05)
        finally:
            await producer.stop()

