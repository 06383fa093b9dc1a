"""A ``logging.Handler`` that services use to ship their logs to the ``logs`` topic.

    import logging
    from app.log_handler import KafkaLogHandler

    handler = KafkaLogHandler("kafka-1:9092,kafka-2:9092", service="cart")
    logging.getLogger().addHandler(handler)
    logging.getLogger("cart").error("payment declined", extra={"trace_id": "abc", "order_id": 42})

Each record becomes one JSON line with ECS field names; a background thread sends the lines in
JSON-array records (up to ``batch_lines`` lines and ``max_record_bytes``, below Kafka's 1 MB) keyed
by the service (a single line larger than that goes alone), so ``emit`` never blocks the service on
Kafka. A message, error message or stack trace longer than ``max_field_chars`` characters is cut
(the line marked ``truncated``). While Kafka cannot take a record for now (not reachable, no leader, topic not there
yet) the thread sends it again, also after a failed delivery; when the queue is full new lines are
counted in ``dropped`` instead of growing memory, as are lines Kafka refused for good and lines
still unsent when ``close()`` (called by ``logging.shutdown``) gives up: each such failure is
reported on stderr. ``sent`` counts the lines Kafka acknowledged. ``close()`` sends what is queued,
waiting at most its ``timeout``.

The handler never ships the records of its own shipping thread (its Kafka client, asyncio) nor
those of the Kafka client library's loggers (``excluded_loggers``, ``aiokafka`` by default):
attached to a root logger at DEBUG it would otherwise ship the client's lines about sending
lines, each send logging more.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import socket
import sys
import threading
import traceback
from collections import deque
from datetime import datetime, timezone
from functools import partial
from typing import Any, Deque, Dict, Iterable, List, Optional, Tuple

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError

from app.retry import retrying

# Attributes every LogRecord has; anything else came in through ``extra=`` and is shipped.
STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
# The loggers of the Kafka client the handler sends with: at DEBUG it logs every request, so
# shipping its lines would log more lines, without end.
KAFKA_CLIENT_LOGGERS = ("aiokafka",)
RETRY_MAX_BACKOFF = 1.0  # seconds: a service's lines wait at most this long after Kafka is back


class KafkaLogHandler(logging.Handler):
    """Ship log records as ECS JSON lines to Kafka (see the module docstring)."""

    def __init__(
        self,
        bootstrap_servers: str,
        service: str,
        *,
        topic: str = "logs",
        host: Optional[str] = None,
        max_queue: int = 100_000,
        batch_lines: int = 100,
        max_record_bytes: int = 900_000,
        max_field_chars: int = 65_536,
        level: int = logging.NOTSET,
        excluded_loggers: Iterable[str] = KAFKA_CLIENT_LOGGERS,
    ) -> None:
        super().__init__(level)
        self.excluded_loggers = tuple(excluded_loggers)
        self.bootstrap_servers = bootstrap_servers
        self.service = service
        self.topic = topic
        self.host = host or socket.gethostname()
        self.batch_lines = batch_lines
        self.max_record_bytes = max_record_bytes
        self.max_field_chars = max_field_chars
        self._carried: Optional[bytes] = None  # a line that did not fit in the record before
        self._resend: Deque[Tuple[bytes, int]] = deque()  # records whose delivery failed for now
        self._counting = threading.Lock()
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
            message = exception_message(record.exc_info[1])
            if message:
                line["error.message"] = message
            line["error.stack_trace"] = "".join(traceback.format_exception(*record.exc_info))
        for name, value in vars(record).items():
            if name not in STANDARD_ATTRIBUTES and not name.startswith("_"):
                line[name] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        for name in ("message", "error.message", "error.stack_trace"):
            value = line.get(name)
            if isinstance(value, str) and len(value) > self.max_field_chars:
                line[name], line["truncated"] = value[: self.max_field_chars], True
        return line

    def filter(self, record: logging.LogRecord) -> bool:
        """Leave out the shipping thread's own records (its Kafka client, asyncio) and those of
        the ``excluded_loggers`` (and their children), then apply the handler's filters."""
        if record.thread == self._thread.ident or is_logger_under(record.name, self.excluded_loggers):
            return False
        return bool(super().filter(record))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._queue.put_nowait(self.line(record))
        except queue.Full:
            self._count_dropped(1)
        except Exception:  # noqa: BLE001 - logging must never raise into the service
            self.handleError(record)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued (waiting at most ``timeout`` seconds), then stop."""
        self._closing.set()
        self._thread.join(timeout)
        super().close()

    def _count_dropped(self, lines: int) -> None:
        with self._counting:  # service threads and the shipping thread both count
            self.dropped += lines

    def _run(self) -> None:
        asyncio.run(self._ship())

    def _next_record(self) -> Tuple[bytes, int]:
        """The next JSON-array record of queued lines (at most ``batch_lines`` lines and
        ``max_record_bytes``; a line that does not fit starts the next one) and its line count."""
        lines: List[bytes] = []
        size = 2  # "[" and "]"
        while len(lines) < self.batch_lines:
            encoded = self._carried
            if encoded is None:
                try:
                    encoded = json.dumps(self._queue.get_nowait(), default=str).encode()
                except queue.Empty:
                    break
            if lines and size + len(encoded) + 1 > self.max_record_bytes:
                self._carried = encoded
                break
            self._carried = None
            lines.append(encoded)
            size += len(encoded) + 1
        return b"[" + b",".join(lines) + b"]", len(lines)

    async def _ship(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers, linger_ms=20)
        try:  # Kafka not reachable yet: keep queueing, try again until closed
            async for attempt in retrying("log shipping: connecting", max_backoff=RETRY_MAX_BACKOFF, retry_on=self._until_closing):
                with attempt:
                    await producer.start()
        except Exception as error:  # noqa: BLE001 - closed before Kafka was reachable
            self._lost(self._queue.qsize() + (self._carried is not None), error)
            await producer.stop()
            return
        try:
            key = self.service.encode()
            while True:
                if self._resend:
                    value, lines = self._resend.popleft()
                else:
                    value, lines = self._next_record()
                if lines:
                    await self._send(producer, key, value, lines)
                elif self._closing.is_set():
                    break
                else:
                    await asyncio.sleep(0.05)
        finally:
            await producer.stop()  # waits for the acknowledgements of what was sent

    async def _send(self, producer: AIOKafkaProducer, key: bytes, value: bytes, lines: int) -> None:
        """Hand one record to the producer, retrying while Kafka cannot take it for now."""
        try:
            async for attempt in retrying("log shipping: sending", max_backoff=RETRY_MAX_BACKOFF, retry_on=self._retriable_until_closing):
                with attempt:
                    delivery = await producer.send(self.topic, value, key=key)
        except Exception as error:  # noqa: BLE001 - the shipping thread must outlive any record
            self._lost(lines, error)
            return
        delivery.add_done_callback(partial(self._delivered, value, lines))

    def _until_closing(self, error: BaseException) -> bool:
        return isinstance(error, Exception) and not self._closing.is_set()

    def _retriable_until_closing(self, error: BaseException) -> bool:
        return is_retriable(error) and not self._closing.is_set()

    def _delivered(self, value: bytes, lines: int, delivery: "asyncio.Future[Any]") -> None:
        """Count an acknowledged record; send one that failed for now again (after the others)."""
        error = None if delivery.cancelled() else delivery.exception()
        if delivery.cancelled() or error is not None:
            if error is not None and is_retriable(error) and not self._closing.is_set():
                self._resend.append((value, lines))
            else:
                self._lost(lines, error or "cancelled")
        else:
            self.sent += lines

    def _lost(self, lines: int, error: Any) -> None:
        self._count_dropped(lines)
        print(f"KafkaLogHandler: {lines} log lines of {self.service} not shipped: {error!r}", file=sys.stderr)


def exception_message(error: Optional[BaseException]) -> str:
    """``str(error)``, or "" when it has none or its ``__str__`` fails (a log call must not)."""
    try:
        return str(error) if error is not None else ""
    except Exception:  # noqa: BLE001 - a hostile __str__ is the service's bug, not a lost line
        return ""


def is_logger_under(name: str, parents: Tuple[str, ...]) -> bool:
    """``"aiokafka.conn"`` is under ``("aiokafka",)``; ``"aiokafkaesque"`` is not."""
    return any(name == parent or name.startswith(parent + ".") for parent in parents)


def is_retriable(error: BaseException) -> bool:
    """Kafka cannot take the record for now (no leader, broker away, no room in the producer's
    buffer before the timeout); it may later."""
    return isinstance(error, KafkaTimeoutError) or (isinstance(error, KafkaError) and error.retriable)
