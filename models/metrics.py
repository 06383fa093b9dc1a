"""Metric samples sent by services, and how a raw record becomes samples."""
from __future__ import annotations

import json
import math
import time
from typing import Any, List, Mapping, Optional

import faust


class InvalidRecord(ValueError):
    """A record that cannot be decoded or validated; the message is the dead-letter reason."""


class MetricSample(faust.Record, serializer="json"):
    """One measurement: ``{"service", "instance", "metric", "value", "ts"}`` (ts in epoch seconds)."""

    service: str
    instance: str
    metric: str
    value: float
    ts: float


def _text_field(data: Mapping[str, Any], name: str, default: Optional[str] = None) -> str:
    value = data.get(name, default)
    if not isinstance(value, str) or not value.strip():
        raise InvalidRecord(f"field {name!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _number_field(data: Mapping[str, Any], name: str, default: Optional[float] = None) -> float:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRecord(f"field {name!r} must be a finite number, got {value!r}")
    return float(value)


def sample_from_mapping(data: Any, *, service_key: Optional[str], now: float) -> MetricSample:
    """Validate one decoded sample; the record key names the service when the body does not."""
    if not isinstance(data, dict):
        raise InvalidRecord(f"a sample must be a JSON object, got {type(data).__name__}")
    service = _text_field(data, "service", service_key)
    if service_key is not None and service != service_key:
        raise InvalidRecord(f"sample service {service!r} does not match the record key {service_key!r}")
    return MetricSample(
        service=service,
        instance=_text_field(data, "instance", service),
        metric=_text_field(data, "metric"),
        value=_number_field(data, "value"),
        ts=_number_field(data, "ts", now),
    )


def parse_samples(raw: Optional[bytes], service_key: Optional[str], now: Optional[float] = None) -> List[MetricSample]:
    """Decode a ``metrics`` record: one JSON sample or a JSON array of samples (batching SDKs)."""
    if not raw:
        raise InvalidRecord("empty record")
    try:
        decoded = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidRecord(f"not JSON: {error}") from None
    now = time.time() if now is None else now
    items = decoded if isinstance(decoded, list) else [decoded]
    if not items:
        raise InvalidRecord("empty sample array")
    return [sample_from_mapping(item, service_key=service_key, now=now) for item in items]
