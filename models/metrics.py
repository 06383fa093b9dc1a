"""Metric samples sent by services, and how a raw record becomes samples."""
from __future__ import annotations

import json
import math
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import faust


class InvalidRecord(ValueError):
    """A record that cannot be decoded or validated; the message is the dead-letter reason."""


def key_text(key: Optional[bytes]) -> Optional[str]:
    """A record key as text (None for a keyless record); a key that is not UTF-8 is invalid."""
    if key is None:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRecord(f"record key is not UTF-8: {key!r}") from None


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


MAX_MAGNITUDE = 1e150  # beyond it sums and variances overflow to inf


def _number_field(data: Mapping[str, Any], name: str, default: Optional[float] = None) -> float:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRecord(f"field {name!r} must be a finite number, got {value!r}")
    if abs(value) > MAX_MAGNITUDE:
        raise InvalidRecord(f"field {name!r} is beyond +/-{MAX_MAGNITUDE:g}: {value!r}")
    return float(value)


EARLIEST_TS = 946684800.0  # 2000-01-01: an event time before it is a unit or clock mistake
MAX_CLOCK_SKEW = 3600.0  # how far in the future of this worker's clock an event time may lie


def _event_time(data: Mapping[str, Any], now: float) -> float:
    ts = _number_field(data, "ts", now)
    if ts < EARLIEST_TS or ts > now + MAX_CLOCK_SKEW:
        raise InvalidRecord(f"field 'ts' is not a plausible event time in epoch seconds: {ts!r}")
    return ts


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
        ts=_event_time(data, now),
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


# --- window panes ---------------------------------------------------------------------------------
# A hopping window of W seconds every S seconds is the merge of W/S tumbling panes of S seconds:
# each sample updates one pane, not W/S overlapping windows.

SERIES_SEPARATOR = "\x1f"


def series_key(service: str, instance: str, metric: str) -> str:
    """One time series: a metric of one instance of a service."""
    return SERIES_SEPARATOR.join((service, instance, metric))


def pane_start(ts: float, step: float) -> float:
    """Start of the pane that holds event time ``ts``."""
    return math.floor(ts / step) * step


def pane_key(series: str, start: float) -> str:
    """Table key of one pane of a series."""
    return f"{series}{SERIES_SEPARATOR}{start:.3f}"


def window_pane_starts(now: float, window: float, step: float) -> List[float]:
    """Starts of the panes that make up the window ending at event time ``now``, newest first."""
    newest = pane_start(now, step)
    return [newest - index * step for index in range(round(window / step))]


def samples_by_pane(samples: List[MetricSample], step: float) -> List[Tuple[float, List[MetricSample]]]:
    """Samples grouped by pane, panes in event-time order, samples in event-time order."""
    panes: Dict[float, List[MetricSample]] = {}
    for sample in sorted(samples, key=lambda s: s.ts):
        panes.setdefault(pane_start(sample.ts, step), []).append(sample)
    return sorted(panes.items())


def samples_by_series(samples: List[MetricSample]) -> Dict[Tuple[str, str], List[MetricSample]]:
    """Samples of one service grouped by (instance, metric)."""
    series: Dict[Tuple[str, str], List[MetricSample]] = {}
    for sample in samples:
        series.setdefault((sample.instance, sample.metric), []).append(sample)
    return series
