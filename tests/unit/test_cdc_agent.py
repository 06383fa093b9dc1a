"""The pure parts of agents/cdc.py and the CDC settings: row paths, status merging, replica
parameters, CDC_TABLES validation, the sinks' retry."""
from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from agents.cdc import apply_to_sink, key_from_path, merge_table_stats, replica_value
from app.settings import Settings
from models.cdc import Change


def test_row_paths_name_key_columns_or_give_the_json_key():
    assert key_from_path("id=5") == {"id": 5}
    assert key_from_path("a=1,b=x") == {"a": 1, "b": "x"}
    assert key_from_path('code="123"') == {"code": "123"}
    assert key_from_path('{"id":5}') == {"id": 5}
    with pytest.raises(ValueError):
        key_from_path("5")


def test_status_sums_partitions_and_keeps_the_latest_lag():
    entries = [
        {"table": "s.t", "partition": 0, "counts": {"c": 2, "r": 1}, "lsn": 10, "lag_ms": 50, "applied_at_ms": 1000, "sinks": ["redis"]},
        {"table": "s.t", "partition": 1, "counts": {"c": 1, "d": 1}, "lsn": 30, "lag_ms": 20, "applied_at_ms": 2000, "sinks": ["redis"]},
    ]
    merged = merge_table_stats(entries)["s.t"]
    assert merged["counts"] == {"c": 3, "r": 1, "d": 1} and merged["total"] == 5
    assert merged["lag_ms"] == 20 and merged["last_applied_lsn"] == {"redis": "0/1E"}


def test_replica_parameters_keep_json_as_text_and_type_the_rest():
    assert replica_value('{"a": 1}', "jsonb") == '{"a": 1}'
    assert replica_value({"a": 1}, "json") == '{"a": 1}'
    assert replica_value("1.50", "numeric(10,2)") == Decimal("1.50")
    assert replica_value(None, "jsonb") is None


def test_cdc_tables_must_be_schema_qualified(monkeypatch):
    monkeypatch.setenv("CDC_TABLES", "public.items, shop.orders")
    assert Settings().cdc_table_names == ["public.items", "shop.orders"]
    monkeypatch.setenv("CDC_TABLES", "items")
    with pytest.raises(ValidationError, match="schema.table"):
        Settings()


def test_slot_names_follow_postgresql_rules(monkeypatch):
    monkeypatch.setenv("CDC_SLOT", "Bad-Slot")
    with pytest.raises(ValidationError):
        Settings()


class SinkFailingOnce:
    """A sink whose first write raises an error it does not expect (not a TransientSinkError)."""

    name = "failing-once"

    def __init__(self) -> None:
        self.batches: list = []

    async def apply(self, changes):
        self.batches.append(list(changes))
        if len(self.batches) == 1:
            raise RuntimeError("an error nobody planned for")
        return []


async def test_a_sink_error_nobody_planned_for_retries_the_batch_instead_of_losing_it():
    """Raised out of the agent, the batch would be acknowledged by take_events: lost for that sink."""
    sink = SinkFailingOnce()
    change = Change(schema="s", table="t", op="c", key={"id": 1}, before=None, after={"id": 1}, lsn=5, ts_ms=0)
    assert await apply_to_sink(sink, [change]) == []
    assert sink.batches == [[change], [change]]
