"""What the metrics agent's unit tests share: records, waiting for a batch, reading the tables,
and recorders for the outputs that are not under test (dead letters, the alerts topic)."""
from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, Dict, List

from models.metrics import pane_key, series_key
from tables.metrics import latest_samples, metric_panes, metric_series

T0 = 1732412300.0  # a multiple of the 10 s step: a test's samples start a pane
DEEP = b"[" * 20_000 + b"]" * 20_000  # RecursionError in the stdlib json


class Letters(list):
    """Dead letters as (offset, reason), recorded instead of produced (not what is under test)."""

    async def __call__(self, reason: str, event: Any = None) -> None:
        self.append((event.message.offset, reason))


def service_name() -> str:
    return f"svc-{uuid.uuid4().hex[:10]}"


def sample(metric: str = "cpu", value: Any = 0.5, ts: Any = T0, **fields: Any) -> Dict[str, Any]:
    return {"metric": metric, "instance": "i-1", "value": value, "ts": ts, **fields}


def encoded(body: Any) -> bytes:
    return json.dumps(body).encode()


async def until(read, timeout: float = 10.0):
    """Poll ``read`` until it is truthy (the agent writes once per batch); return its last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not read() and loop.time() < deadline:
        await asyncio.sleep(0.02)
    return read()


def counted(service: str) -> int:
    return latest_samples[service].get("samples", 0) if service in latest_samples else 0


def pane_counts(service: str, metric: str = "cpu", instance: str = "i-1") -> int:
    """Samples held by every pane of one series."""
    series = series_key(service, instance, metric)
    panes = metric_series[series].get("panes", [])
    return sum(metric_panes[pane_key(series, start)].count for start in panes)


class FlakyAlerts:
    """The alerts topic: refuses the first ``failures`` sends (Kafka away), then records alerts."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.sent: List[Any] = []

    async def send(self, key: Any = None, value: Any = None, **kwargs: Any) -> "asyncio.Future[None]":
        if self.failures:
            self.failures -= 1
            raise ConnectionError("Kafka is away")
        self.sent.append(value)
        delivered = asyncio.get_running_loop().create_future()
        delivered.set_result(None)
        return delivered
