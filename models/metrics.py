"""Metric samples sent by services, and how a raw record becomes samples."""

from __future__ import annotations

import json
import math
import time
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Set, Tuple

import faust
import orjson

from models import windows


class InvalidRecord(ValueError):
    """A record that cannot be decoded or validated; the message is the dead-letter reason."""


class MetricSample(faust.Record, serializer="json"):
    """One measurement: ``{"service", "instance", "metric", "value", "ts"}`` (ts in epoch seconds)."""

    service: str
    instance: str
    metric: str
    value: float
    ts: float


SERIES_SEPARATOR = "\x1f"
MAX_NAME_CHARS = 256  # service, instance and metric names are table keys and JSON keys of the state


_CHECKED_TEXT: Set[str] = set()  # names that passed _text_field as they are (they repeat in every sample)
CHECKED_TEXT_MAX = 10000


def _text_field(data: Mapping[str, Any], name: str, default: Optional[str] = None) -> str:
    raw = data.get(name, default)
    if type(raw) is str and raw in _CHECKED_TEXT:
        return raw
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidRecord(f"field {name!r} must be a non-empty string, got {_shown(raw)}")
    value = raw.strip()
    if len(value) > MAX_NAME_CHARS:
        raise InvalidRecord(f"field {name!r} is longer than {MAX_NAME_CHARS} characters ({len(value)})")
    if SERIES_SEPARATOR in value:
        raise InvalidRecord(f"field {name!r} contains the control character U+001F (it separates key parts)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (\ud800): no table key or JSON document can hold it
        raise InvalidRecord(f"field {name!r} is not valid Unicode text: {value!r}") from None
    if value == raw and type(raw) is str and len(_CHECKED_TEXT) < CHECKED_TEXT_MAX:
        _CHECKED_TEXT.add(value)
    return value


MAX_MAGNITUDE = 1e150  # beyond it sums and variances overflow to inf


def _number_field(data: Mapping[str, Any], name: str, default: Optional[float] = None) -> float:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRecord(f"field {name!r} must be a finite number, got {_shown(value)}")
    # Compared before math.isfinite: an integer beyond float range (1e400 written out) overflows there.
    if isinstance(value, int) and abs(value) > MAX_MAGNITUDE:
        raise InvalidRecord(f"field {name!r} is beyond +/-{MAX_MAGNITUDE:g}: an integer of {_digits(value)} digits")
    if not math.isfinite(value):
        raise InvalidRecord(f"field {name!r} must be a finite number, got {value!r}")
    if abs(value) > MAX_MAGNITUDE:
        raise InvalidRecord(f"field {name!r} is beyond +/-{MAX_MAGNITUDE:g}: {value!r}")
    return float(value)


def _digits(value: int) -> str:
    return f"about {int(abs(value).bit_length() * 0.30103) + 1}"  # str() of a huge int may itself be refused


def _shown(value: Any, limit: int = 80) -> str:
    """A refused value for a reason: its repr, cut (a field may hold a megabyte of nested JSON)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_MAGNITUDE:
        return f"an integer of {_digits(value)} digits"
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - repr of a deeply nested value may exceed the recursion limit
        return type(value).__name__
    return text if len(text) <= limit else f"{text[:limit]}... ({type(value).__name__})"


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


class SampleRecord(NamedTuple):
    """A decoded ``metrics`` record: its valid samples, and the array elements refused (index, reason)."""

    samples: List[MetricSample]
    refused: List[Tuple[int, str]]


INEXACT_FLOAT = float(2**63)  # orjson reads an integer literal past 64 bits as a float at least this large


def parsed_json(raw: bytes, **options: Any) -> Tuple[Any, int]:
    """``json.loads(raw, **options)`` and how deeply its lists and objects nest (0 for a scalar).
    orjson parses it when it reads the value as the standard library does; what it refuses (NaN,
    1e400, invalid UTF-8, a byte-order mark, deep nesting) and what it may have read inexactly
    (an integer past 64 bits becomes a float) the standard library parses again, with ``options``."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    else:
        depth, inexact = json_shape(value)
        if not inexact:
            return value, depth
    value = json.loads(raw, **options)
    return value, json_shape(value)[0]


def json_shape(value: Any) -> Tuple[int, bool]:
    """How deeply lists and objects nest in ``value``, and whether it holds a float of 2**63 or
    more (without recursion: the depth is what a caller limits)."""
    if type(value) is float:
        return 0, not -INEXACT_FLOAT < value < INEXACT_FLOAT
    deepest, inexact = 0, False
    stack = [(value, 1)] if type(value) in (dict, list) else []
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        for child in item.values() if type(item) is dict else item:
            kind = type(child)
            if kind is dict or kind is list:
                stack.append((child, depth + 1))
            elif kind is float and not -INEXACT_FLOAT < child < INEXACT_FLOAT:
                inexact = True
    return deepest, inexact


def decode_json(raw: Optional[bytes]) -> Any:
    """A record's JSON; anything the decoder refuses (also nesting too deep for it, or an integer
    of more than 4,300 digits) is an InvalidRecord."""
    if not raw:
        raise InvalidRecord("empty record")
    try:
        return parsed_json(raw)[0]
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidRecord(f"not JSON: {error}") from None
    except RecursionError:
        raise InvalidRecord("not JSON: nested too deeply") from None
    except ValueError as error:  # int() of a number of more than 4,300 digits
        raise InvalidRecord(f"not JSON: {error}") from None


def parse_record(raw: Optional[bytes], service_key: Optional[str], now: Optional[float] = None) -> SampleRecord:
    """Decode a ``metrics`` record: one JSON sample or a JSON array of samples (batching SDKs).

    An array keeps its valid elements and lists the refused ones; a record with no valid sample
    (a single bad sample, an empty array, an array of bad elements) is an InvalidRecord."""
    decoded = decode_json(raw)
    now = time.time() if now is None else now
    if not isinstance(decoded, list):
        return SampleRecord([sample_from_mapping(decoded, service_key=service_key, now=now)], [])
    if not decoded:
        raise InvalidRecord("empty sample array")
    samples: List[MetricSample] = []
    refused: List[Tuple[int, str]] = []
    for index, item in enumerate(decoded):
        try:
            samples.append(sample_from_mapping(item, service_key=service_key, now=now))
        except Exception as error:  # noqa: BLE001 - whatever an element causes is that element's fault
            refused.append((index, error_text(error)))
    if not samples:
        raise InvalidRecord(refused_reason(refused, len(decoded)))
    return SampleRecord(samples, refused)


def parse_samples(raw: Optional[bytes], service_key: Optional[str], now: Optional[float] = None) -> List[MetricSample]:
    """``parse_record`` for callers that take a record whole or not at all."""
    record = parse_record(raw, service_key, now)
    if record.refused:
        raise InvalidRecord(refused_reason(record.refused, len(record.samples) + len(record.refused)))
    return record.samples


def error_text(error: BaseException) -> str:
    """An element's refusal: the InvalidRecord's message, or the type and message of another error."""
    if isinstance(error, InvalidRecord):
        return str(error)
    return f"{type(error).__name__}: {error}"


def refused_reason(refused: List[Tuple[int, str]], total: int) -> str:
    """The dead-letter reason of an array with refused elements: their indexes first, then why."""
    indexes = ", ".join(str(index) for index, _ in refused)
    kept = total - len(refused)
    head = f"{len(refused)} of {total} samples refused (indexes {indexes})"
    head += f"; the other {kept} were applied" if kept else ""
    return head + ": " + "; ".join(f"[{index}] {reason}" for index, reason in refused)


# --- window panes ---------------------------------------------------------------------------------
# A hopping window of W seconds every S seconds is the merge of W/S tumbling panes of S seconds
# (models/windows.py): each sample updates one pane, not W/S overlapping windows.


def series_key(service: str, instance: str, metric: str) -> str:
    """One time series: a metric of one instance of a service."""
    return SERIES_SEPARATOR.join((service, instance, metric))


pane_start = windows.pane_start  # start of the pane that holds event time ``ts``
window_pane_starts = windows.pane_starts  # the panes of the window ending at event time ``now``, newest first


def pane_key(series: str, start: float) -> str:
    """Table key of one pane of a series."""
    return f"{series}{SERIES_SEPARATOR}{windows.pane_key(start)}"


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


# Samples tagged with the source offset of their record, for the replay guards of the tables.
OffsetSample = Tuple[int, MetricSample]


def offset_samples_by_series(tagged: List[OffsetSample]) -> Dict[Tuple[str, str], List[OffsetSample]]:
    """``samples_by_series`` for samples tagged with their record's offset."""
    series: Dict[Tuple[str, str], List[OffsetSample]] = {}
    for offset, sample in tagged:
        series.setdefault((sample.instance, sample.metric), []).append((offset, sample))
    return series


def offset_samples_by_pane(tagged: List[OffsetSample], step: float) -> List[Tuple[float, List[OffsetSample]]]:
    """``samples_by_pane`` for samples tagged with their record's offset."""
    panes: Dict[float, List[OffsetSample]] = {}
    for offset, sample in sorted(tagged, key=lambda entry: entry[1].ts):
        panes.setdefault(pane_start(sample.ts, step), []).append((offset, sample))
    return sorted(panes.items())


def after(tagged: List[OffsetSample], applied: int) -> List[MetricSample]:
    """The samples of records past ``applied``, the highest offset a table key holds already."""
    return [sample for offset, sample in tagged if offset > applied]
