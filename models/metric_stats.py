"""Per-window metric statistics (count, sum, min, max, quantiles) and EWMA baselines for anomalies."""

from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Tuple

import faust
from ddsketch.ddsketch import BaseDDSketch
from ddsketch.mapping import LogarithmicMapping
from ddsketch.store import DenseStore

# DDSketch's guarantee: a reported quantile is within 1% of the true value at that rank.
RELATIVE_ACCURACY = 0.01
# A baseline that has never varied still needs a spread, or every tiny change divides by zero.
MIN_RELATIVE_STD = 1e-9
MIN_ABSOLUTE_STD = 1e-12
QUANTILES = {"p50": 0.50, "p95": 0.95, "p99": 0.99}


class WindowAggregate(faust.Record, serializer="json"):
    """One metric over one window: exact count/sum/min/max plus the bins of a mergeable DDSketch.

    The sketch is stored as its bins (bin key -> count, keys as strings for JSON) for positive and
    negative values, and the count of zeros, so that windows can be merged and re-read exactly.
    A stored pane also keeps ``applied_offset``, the highest source offset whose samples it holds,
    so a replayed record is not counted twice; merged windows leave it at -1.
    """

    count: int
    sum: float
    min: Optional[float]
    max: Optional[float]
    positive_bins: Dict[str, int]
    negative_bins: Dict[str, int]
    zero_count: int
    applied_offset: int = -1


class Baseline(faust.Record, serializer="json"):
    """Exponentially weighted mean and variance of a metric, and how many values it has seen."""

    mean: float
    variance: float
    count: int


def empty_aggregate() -> WindowAggregate:
    """A window that has seen no values."""
    return WindowAggregate(count=0, sum=0.0, min=None, max=None, positive_bins={}, negative_bins={}, zero_count=0)


def _store_with(bins: Dict[str, int]) -> DenseStore:
    store = DenseStore()
    for key, count in bins.items():
        store.add(int(key), count)
    return store


def _bins_of(store: DenseStore) -> Dict[str, int]:
    return {str(index + store.offset): int(count) for index, count in enumerate(store.bins) if count}


def _sketch_of(agg: WindowAggregate) -> Tuple[BaseDDSketch, DenseStore, DenseStore]:
    """Rebuild the sketch (the same mapping and stores as ``DDSketch(0.01)``) with handles on its stores."""
    positive, negative = _store_with(agg.positive_bins), _store_with(agg.negative_bins)
    sketch = BaseDDSketch(LogarithmicMapping(RELATIVE_ACCURACY), positive, negative, float(agg.zero_count))
    return sketch, positive, negative


def add_values(agg: WindowAggregate, values: Iterable[float]) -> WindowAggregate:
    """Return the window with all ``values`` added (one sketch rebuild for the whole batch)."""
    values = [float(value) for value in values]
    for value in values:
        if not math.isfinite(value):
            raise ValueError(f"cannot aggregate a value that is not a finite number: {value!r}")
    if not values:
        return agg
    sketch, positive, negative = _sketch_of(agg)
    for value in values:
        sketch.add(value)
    return WindowAggregate(
        count=agg.count + len(values),
        sum=agg.sum + math.fsum(values),
        min=min(values) if agg.min is None else min(agg.min, *values),
        max=max(values) if agg.max is None else max(agg.max, *values),
        positive_bins=_bins_of(positive),
        negative_bins=_bins_of(negative),
        zero_count=round(sketch.count - positive.count - negative.count),
        applied_offset=agg.applied_offset,
    )


def _merged_bins(a: Dict[str, int], b: Dict[str, int]) -> Dict[str, int]:
    merged = dict(a)
    for key, count in b.items():
        merged[key] = merged.get(key, 0) + count
    return merged


def _merged_bound(a: Optional[float], b: Optional[float], pick) -> Optional[float]:
    if a is None or b is None:
        return b if a is None else a
    return pick(a, b)


def merge(a: WindowAggregate, b: WindowAggregate) -> WindowAggregate:
    """Combine two windows as if every value of both had been added to one (DDSketch bins add up)."""
    return WindowAggregate(
        count=a.count + b.count,
        sum=a.sum + b.sum,
        min=_merged_bound(a.min, b.min, min),
        max=_merged_bound(a.max, b.max, max),
        positive_bins=_merged_bins(a.positive_bins, b.positive_bins),
        negative_bins=_merged_bins(a.negative_bins, b.negative_bins),
        zero_count=a.zero_count + b.zero_count,
    )


def _observed_quantile(sketch: BaseDDSketch, q: float, low: float, high: float) -> float:
    # A bin's representative value may fall just outside the observed range; the true quantile cannot.
    value = sketch.get_quantile_value(q)
    assert value is not None  # None only for an empty sketch: summary() asks a window with values
    return min(max(float(value), low), high)


def summary(agg: WindowAggregate) -> Dict[str, Optional[float]]:
    """count, sum, min, max, mean, p50, p95, p99 of the window; all but count and sum are None when empty."""
    stats: Dict[str, Optional[float]] = {"count": agg.count, "sum": agg.sum, "min": agg.min, "max": agg.max}
    if agg.count == 0 or agg.min is None or agg.max is None:
        return {**stats, "mean": None, "p50": None, "p95": None, "p99": None}
    sketch, _, _ = _sketch_of(agg)
    quantiles = {name: _observed_quantile(sketch, q, agg.min, agg.max) for name, q in QUANTILES.items()}
    return {**stats, "mean": agg.sum / agg.count, **quantiles}


def update_baseline(baseline: Optional[Baseline], value: float, alpha: float = 0.1) -> Baseline:
    """Fold one value into the exponentially weighted mean and variance (the first value sets the mean)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    if baseline is None or baseline.count == 0:
        return Baseline(mean=float(value), variance=0.0, count=1)
    deviation = value - baseline.mean
    increment = alpha * deviation
    return Baseline(
        mean=baseline.mean + increment,
        variance=(1.0 - alpha) * (baseline.variance + deviation * increment),
        count=baseline.count + 1,
    )


def is_anomalous(baseline: Optional[Baseline], value: float, k: float, warmup: int) -> bool:
    """Whether ``value`` lies more than ``k`` standard deviations from a baseline that has seen ``warmup`` values.

    Check a value against the baseline before folding it in, or it partly explains itself away.
    """
    if baseline is None or baseline.count < max(warmup, 1):
        return False
    std = max(math.sqrt(max(baseline.variance, 0.0)), MIN_RELATIVE_STD * abs(baseline.mean), MIN_ABSOLUTE_STD)
    return abs(value - baseline.mean) > k * std
