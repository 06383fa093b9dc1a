"""The worker's one gauge registry: functions read on demand, by ``GET /metrics`` (app/prometheus.py)
and by the heap reports of app/memory.py. A job registers what it measures once:

    @gauge("streamspine_alerts", "Pending and firing alerts of this worker's partitions", ["state"])
    def alerts_by_state() -> Dict[Tuple[str, ...], float]:
        return {("firing",): 2.0, ("pending",): 1.0}

    register_value("streamspine_rocksdb_databases", "Open RocksDB databases.", count_databases)

This module imports nothing of the app, so the transport and the stores can register their
gauges before the ``faust.App`` exists.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

log = logging.getLogger(__name__)

Samples = Dict[Tuple[str, ...], float]


class Gauge(NamedTuple):
    name: str
    documentation: str
    labels: Sequence[str]
    read: Callable[[], Samples]


_gauges: Dict[str, Gauge] = {}


def gauge(name: str, documentation: str, labels: Sequence[str] = ()) -> Callable[[Callable[[], Samples]], Callable[[], Samples]]:
    """Register a function that returns ``{label values: value}`` (a later one of the same name
    replaces it)."""

    def register(read: Callable[[], Samples]) -> Callable[[], Samples]:
        _gauges[name] = Gauge(name, documentation, tuple(labels), read)
        return read

    return register


def register_value(name: str, documentation: str, read: Callable[[], float]) -> None:
    """Register a gauge without labels: one number, such as the size of a bounded structure."""
    gauge(name, documentation)(lambda: {(): float(read())})


def registered() -> List[Gauge]:
    """Every gauge, by name."""
    return [_gauges[name] for name in sorted(_gauges)]


def read_samples(registered_gauge: Gauge) -> Samples:
    """The gauge's samples; a gauge that fails logs and reads as no samples (never raises)."""
    try:
        return registered_gauge.read()
    except Exception:  # noqa: BLE001 - one gauge must not take a scrape or a report down
        log.exception("gauge %s could not be read", registered_gauge.name)
        return {}


def flat_values() -> Dict[str, float]:
    """Every gauge as ``name`` or ``name{label="value",...}`` -> value (the heap reports' form);
    a gauge that cannot be read is reported as -1."""
    values: Dict[str, float] = {}
    for registered_gauge in registered():
        samples = read_samples(registered_gauge)
        if not samples and not registered_gauge.labels:
            values[registered_gauge.name] = -1.0
        for label_values, value in sorted(samples.items()):
            pairs = ",".join(f'{label}="{text}"' for label, text in zip(registered_gauge.labels, label_values, strict=False))
            values[f"{registered_gauge.name}{{{pairs}}}" if pairs else registered_gauge.name] = float(value)
    return values
