"""Log statistics folds (models/logs.py): windows, redelivery, closing."""
from __future__ import annotations

from collections import defaultdict

from models.logs import LogCounts, count_rows, fold_counts, split_rows, window_summary, windows_to_close

WINDOW = 60.0


def counts(partition: int, rows, service: str = "cart") -> LogCounts:
    """A LogCounts of ``(offset, window_start, level, lines)`` tuples, in the form the agent sends."""
    line_offsets = defaultdict(list)
    for offset, start, level, lines in rows:
        line_offsets[(start, level)].extend([offset] * lines)
    return LogCounts(service=service, source_partition=partition, counts=count_rows(line_offsets), recent=[])


def test_rows_carry_each_records_offset_once_with_its_lines():
    rows = count_rows({(600.0, "info"): [7, 7, 7, 8], (600.0, "error"): [7]})
    assert rows == [[600.0, "info", [7, 8], [3, 1]], [600.0, "error", [7], [1]]]


def test_a_batch_that_read_a_partition_out_of_order_still_counts_each_record_once():
    # A seek back (rebalance) inside one batch: offsets 20-21, then 15-16 read again.
    rows = count_rows({(600.0, "info"): [20, 21, 15, 16]})
    assert rows == [[600.0, "info", [15, 16, 20, 21], [1, 1, 1, 1]]]
    state = {"offsets": {"0": 18}}
    folded = fold_counts(state, LogCounts(service="cart", source_partition=0, counts=rows, recent=[]), window=WINDOW, keep=10)
    assert folded["windows"]["600.000"] == {"info": 2} and folded["offsets"]["0"] == 21  # 20 and 21, once


def test_a_large_batch_is_sent_in_parts_that_fold_like_the_whole():
    # 3,000 records, each with lines at three levels in two windows: six rows of 3,000 offsets.
    line_offsets = defaultdict(list)
    for offset in range(1000, 4000):
        for start in (600.0, 660.0):
            for level in ("info", "warn", "error"):
                line_offsets[(start, level)].extend([offset] * 2)
    rows = count_rows(line_offsets)

    parts = list(split_rows(rows, 1200))

    assert len(parts) > 1 and all(sum(len(row[2]) for row in part) <= 1200 for part in parts)
    whole = fold_counts({}, LogCounts(service="cart", source_partition=0, counts=rows, recent=[]), window=WINDOW, keep=10)
    state: dict = {}
    for part in parts:
        state = fold_counts(state, LogCounts(service="cart", source_partition=0, counts=part, recent=[]), window=WINDOW, keep=10)
    assert state["windows"] == whole["windows"] == {"600.000": {"info": 6000, "warn": 6000, "error": 6000},
                                                     "660.000": {"info": 6000, "warn": 6000, "error": 6000}}
    for part in parts:  # redelivered: nothing counted again
        state = fold_counts(state, LogCounts(service="cart", source_partition=0, counts=part, recent=[]), window=WINDOW, keep=10)
    assert state["windows"] == whole["windows"] and state["offsets"] == {"0": 3999}
    assert list(split_rows(rows, 18000)) == [rows]


def test_counts_fold_into_windows_per_level():
    state = fold_counts({}, counts(0, [(0, 600.0, "info", 3), (1, 600.0, "error", 1), (2, 660.0, "info", 2)]), window=WINDOW, keep=10)
    assert state["windows"] == {"600.000": {"info": 3, "error": 1}, "660.000": {"info": 2}}
    assert window_summary(600.0, WINDOW, state["windows"]["600.000"])["error_ratio"] == 0.25


def test_redelivered_rows_are_not_counted_twice():
    first = fold_counts({}, counts(0, [(10, 600.0, "info", 1), (11, 600.0, "info", 1)]), window=WINDOW, keep=10)
    # A crash replays offsets 10-11 together with the new offset 12, in one bigger batch.
    replayed = fold_counts(first, counts(0, [(10, 600.0, "info", 1), (11, 600.0, "info", 1), (12, 600.0, "error", 1)]), window=WINDOW, keep=10)
    assert replayed["windows"]["600.000"] == {"info": 2, "error": 1}
    # Offsets are tracked per source partition: partition 1's offset 10 is a different record.
    other = fold_counts(replayed, counts(1, [(10, 600.0, "info", 1)]), window=WINDOW, keep=10)
    assert other["windows"]["600.000"] == {"info": 3, "error": 1}


def test_a_replay_that_starts_inside_a_multi_line_row_counts_only_the_new_records():
    first = fold_counts({}, counts(0, [(10, 600.0, "info", 5), (11, 600.0, "info", 2)]), window=WINDOW, keep=10)
    replayed = fold_counts(first, counts(0, [(11, 600.0, "info", 2), (12, 600.0, "info", 4)]), window=WINDOW, keep=10)
    assert replayed["windows"]["600.000"] == {"info": 11}
    assert replayed["offsets"] == {"0": 12}


def test_rows_of_the_earlier_per_record_form_are_still_counted():
    old = LogCounts(service="cart", source_partition=0, counts=[[10, 600.0, "info", 2], [11, 600.0, "error", 1]], recent=[])
    state = fold_counts({}, old, window=WINDOW, keep=10)
    assert state["windows"]["600.000"] == {"info": 2, "error": 1}
    again = fold_counts(state, old, window=WINDOW, keep=10)
    assert again["windows"]["600.000"] == {"info": 2, "error": 1} and again["offsets"] == {"0": 11}


def test_only_the_newest_windows_are_kept():
    rows = [(i, 600.0 + i * WINDOW, "info", 1) for i in range(15)]
    state = fold_counts({}, counts(0, rows), window=WINDOW, keep=10)
    assert sorted(float(start) for start in state["windows"]) == [600.0 + i * WINDOW for i in range(5, 15)]


def test_windows_close_by_wall_clock_or_when_data_two_windows_later_arrives():
    state = fold_counts({}, counts(0, [(0, 600.0, "info", 1), (1, 660.0, "error", 1)]), window=WINDOW, keep=10)
    assert windows_to_close(state, now=664.0, window=WINDOW, grace=5.0) == []  # 600-660 closes at 660 + 5 s grace
    assert windows_to_close(state, now=665.0, window=WINDOW, grace=5.0) == [600.0]
    later = fold_counts(state, counts(0, [(2, 720.0, "info", 1)]), window=WINDOW, keep=10)
    assert windows_to_close(later, now=0.0, window=WINDOW, grace=5.0) == [600.0]  # event time: 720 > 600 + 60
    assert windows_to_close({**later, "closed_through": 600.0}, now=800.0, window=WINDOW, grace=5.0) == [660.0, 720.0]
