"""Folding a batch of events into one delta per key per partition."""

from __future__ import annotations

import operator
from types import SimpleNamespace

from app.aggregation import fold_deltas


def event(partition: int, offset: int) -> SimpleNamespace:
    return SimpleNamespace(message=SimpleNamespace(partition=partition, offset=offset))


def test_deltas_are_combined_per_key_within_each_partition():
    batch = [(event(0, 1), [("a", 1)]), (event(1, 7), [("b", 5)]), (event(0, 2), [("a", 2), ("c", 1)])]

    pending = fold_deltas(batch, combine=operator.add)

    assert {p: entry.deltas for p, entry in pending.items()} == {0: {"a": 3, "c": 1}, 1: {"b": 5}}


def test_each_partition_is_written_under_its_own_last_event():
    first, second, third = event(0, 1), event(1, 7), event(0, 2)

    pending = fold_deltas([(first, [("a", 1)]), (second, [("b", 1)]), (third, [("a", 1)])], combine=operator.add)

    assert pending[0].last_event is third
    assert pending[1].last_event is second


def test_an_event_without_deltas_still_counts_as_its_partitions_last_event():
    pending = fold_deltas([(event(3, 1), [("k", 1)]), (event(3, 2), [])], combine=operator.add)

    assert pending[3].last_event.message.offset == 2
    assert pending[3].deltas == {"k": 1}


# --- entering a partition ---------------------------------------------------------------------

from faust.streams import current_event  # noqa: E402
from faust.types.tuples import ConsumerMessage  # noqa: E402

from app import app  # noqa: E402
from app.aggregation import enter_partition  # noqa: E402


def real_event(partition: int, offset: int, key: bytes = b"k"):
    message = ConsumerMessage("counts-source", partition, offset, 0.0, 0, [], key, b"1", None)
    message.incref()  # as the conductor does when it delivers the message to one stream
    return app.create_event(key, 1, [], message)


async def test_entering_a_partition_leaves_the_streams_current_event_alone():
    stream = app.stream(app.channel())
    received, other = real_event(0, 5), real_event(1, 9)
    stream._set_current_event(received)  # what the take_events buffer task reads after its wait

    enter_partition(stream, other)

    assert current_event() is other  # table writes of this task go to partition 1
    assert stream.current_event is received  # the buffer task still sees the event it received


# --- writing latest values ----------------------------------------------------------------------

from app.aggregation import by_partition, write_values  # noqa: E402


class WriteOnlyTable(dict):
    """A table that records the partition each write goes to and refuses reads."""

    def __init__(self) -> None:
        super().__init__()
        self.partitions: dict = {}

    def __getitem__(self, key):
        raise AssertionError(f"write_values read {key!r}")

    def __setitem__(self, key, value) -> None:
        self.partitions[key] = current_event().message.partition
        super().__setitem__(key, value)


def test_the_latest_value_of_each_key_is_written_once_in_its_partition():
    stream = app.stream(app.channel())
    table = WriteOnlyTable()
    first, second, third = real_event(0, 1), real_event(1, 7), real_event(0, 2)
    latest_values = {"a": (third, "a2"), "b": (second, "b1"), "c": (first, "c1")}

    writes = write_values(stream, table, by_partition(latest_values))

    assert writes == 3
    assert dict(table.items()) == {"a": "a2", "b": "b1", "c": "c1"}
    assert table.partitions == {"a": 0, "b": 1, "c": 0}
