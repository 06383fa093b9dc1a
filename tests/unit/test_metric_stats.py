"""Window aggregates with a DDSketch, and EWMA baselines, without Kafka."""
from __future__ import annotations

import json
import random
import statistics

import pytest

from models.metric_stats import (
    Baseline,
    WindowAggregate,
    add_values,
    empty_aggregate,
    is_anomalous,
    merge,
    summary,
    update_baseline,
)


def latencies(count: int, seed: int = 7) -> list:
    rng = random.Random(seed)
    return [rng.lognormvariate(4.0, 0.8) for _ in range(count)]


def assert_quantiles_within_one_percent(stats: dict, values: list) -> None:
    cuts = statistics.quantiles(values, n=100, method="inclusive")  # numpy's linear percentiles
    for name, q in (("p50", 50), ("p95", 95), ("p99", 99)):
        exact = cuts[q - 1]
        assert stats[name] == pytest.approx(exact, rel=0.01), name


def test_quantiles_are_within_one_percent_of_numpy_on_ten_thousand_samples():
    values = latencies(10_000)

    stats = summary(add_values(empty_aggregate(), values))

    assert_quantiles_within_one_percent(stats, values)


def test_quantiles_of_values_around_zero_are_within_one_percent():
    rng = random.Random(3)
    values = [rng.gauss(0.0, 5.0) for _ in range(10_000)] + [0.0] * 50

    stats = summary(add_values(empty_aggregate(), values))

    assert_quantiles_within_one_percent(stats, values)


def test_count_sum_min_max_and_mean_are_exact():
    stats = summary(add_values(empty_aggregate(), [3.0, -1.5, 0.0, 10.5]))

    assert (stats["count"], stats["sum"], stats["min"], stats["max"], stats["mean"]) == (4, 12.0, -1.5, 10.5, 3.0)


def test_quantiles_never_leave_the_observed_range():
    stats = summary(add_values(empty_aggregate(), [42.0] * 100))

    assert stats["p50"] == stats["p95"] == stats["p99"] == 42.0


def test_an_empty_window_has_a_count_but_no_quantiles():
    assert summary(empty_aggregate()) == {
        "count": 0, "sum": 0.0, "min": None, "max": None, "mean": None, "p50": None, "p95": None, "p99": None,
    }


def test_adding_in_batches_equals_adding_all_at_once():
    values = latencies(3_000)

    batched = add_values(add_values(add_values(empty_aggregate(), values[:10]), values[10:1000]), values[1000:])

    assert batched == add_values(empty_aggregate(), values)


def test_merging_two_windows_equals_adding_all_values_to_one():
    values = latencies(5_000) + [0.0, -2.0, -30.0]
    left, right = values[:2_000], values[2_000:]

    merged = merge(add_values(empty_aggregate(), left), add_values(empty_aggregate(), right))
    together = add_values(empty_aggregate(), values)

    assert (merged.positive_bins, merged.negative_bins, merged.zero_count) == (
        together.positive_bins, together.negative_bins, together.zero_count)
    assert (merged.count, merged.min, merged.max) == (together.count, together.min, together.max)
    assert merged.sum == pytest.approx(together.sum)
    assert summary(merged) == pytest.approx(summary(together))


def test_merging_with_an_empty_window_changes_nothing():
    window = add_values(empty_aggregate(), latencies(100))

    assert merge(window, empty_aggregate()) == window
    assert merge(empty_aggregate(), window) == window


def test_a_window_round_trips_through_json_keeping_its_quantiles():
    values = latencies(10_000)
    window = add_values(empty_aggregate(), values)

    decoded = WindowAggregate.loads(window.dumps())
    from_dict = WindowAggregate.from_data(json.loads(json.dumps(window.asdict())))

    assert decoded == window == from_dict
    assert summary(decoded) == summary(window)
    assert_quantiles_within_one_percent(summary(decoded), values)
    # A decoded window keeps growing and merging like a fresh one.
    assert add_values(decoded, [1.0]) == add_values(window, [1.0])


def test_the_serialized_sketch_stays_small():
    window = add_values(empty_aggregate(), latencies(10_000))

    assert len(window.dumps()) < 8_000


def test_values_that_are_not_finite_are_refused():
    with pytest.raises(ValueError, match="finite"):
        add_values(empty_aggregate(), [1.0, float("nan")])


def steady(count: int, level: float = 0.4, seed: int = 11) -> list:
    rng = random.Random(seed)
    return [rng.gauss(level, 0.02) for _ in range(count)]


def baseline_after(values: list, alpha: float = 0.1) -> Baseline:
    baseline = None
    for value in values:
        baseline = update_baseline(baseline, value, alpha)
    return baseline


def test_the_first_value_sets_the_baseline_mean():
    assert update_baseline(None, 5.0, 0.1) == Baseline(mean=5.0, variance=0.0, count=1)


def test_the_baseline_tracks_the_level_and_spread_of_a_steady_metric():
    baseline = baseline_after(steady(500))

    assert baseline.mean == pytest.approx(0.4, abs=0.02)
    assert baseline.variance ** 0.5 == pytest.approx(0.02, rel=0.5)
    assert baseline.count == 500


def test_a_step_change_after_warmup_is_anomalous():
    baseline = baseline_after(steady(40))

    assert is_anomalous(baseline, 0.95, k=4, warmup=30)
    assert is_anomalous(baseline, -0.2, k=4, warmup=30)


def test_ordinary_noise_is_not_anomalous():
    history = steady(200)
    baseline = baseline_after(history[:100])

    assert not any(is_anomalous(baseline_after(history[:i]), history[i], k=4, warmup=30) for i in range(100, 200))
    assert not is_anomalous(baseline, 0.42, k=4, warmup=30)


def test_a_step_change_during_warmup_is_not_anomalous():
    baseline = baseline_after(steady(20))

    assert not is_anomalous(baseline, 0.95, k=4, warmup=30)
    assert not is_anomalous(None, 0.95, k=4, warmup=0)


def test_a_step_away_from_a_perfectly_constant_metric_is_anomalous():
    baseline = baseline_after([0.5] * 40)

    assert baseline.variance == 0.0
    assert is_anomalous(baseline, 0.51, k=4, warmup=30)
    assert not is_anomalous(baseline, 0.5, k=4, warmup=30)
    assert not is_anomalous(baseline_after([0.0] * 40), 0.0, k=4, warmup=30)


def test_a_baseline_round_trips_through_json():
    baseline = baseline_after(steady(50))

    assert Baseline.loads(baseline.dumps()) == baseline


def test_alpha_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="alpha"):
        update_baseline(None, 1.0, alpha=0.0)
