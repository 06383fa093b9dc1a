"""The pure parts of agents/cdc.py and the CDC settings: row paths, status merging, replica
parameters, CDC_TABLES validation, the sinks' retry."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Optional

import psycopg
import pytest
from pydantic import ValidationError

from agents.cdc import ElasticsearchSink, apply_to_sink, key_from_path, merge_table_stats, replica_refuses, replica_value
from app.settings import Settings
from models.cdc import Change, InvalidChange
from tests.support.es_server import ElasticsearchTestServer


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


def test_replica_parameters_refuse_what_postgresql_text_cannot_hold():
    with pytest.raises(InvalidChange, match="NUL"):
        replica_value("a\x00b", "text")
    with pytest.raises(InvalidChange, match="NUL"):
        replica_value(["ok", "a\x00b"], "text[]")
    with pytest.raises(InvalidChange):
        replica_value("not a list", "jsonb[]")


@pytest.mark.parametrize(
    "error, refused",
    [
        (psycopg.errors.StatementTooComplex("stack depth limit exceeded"), True),  # JSON nested past the server's stack
        (psycopg.errors.ProgramLimitExceeded("index row requires 900016 bytes"), True),
        (psycopg.errors.NumericValueOutOfRange("bigint out of range"), True),
        (psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"), True),  # psycopg's own
        (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"), True),
        (psycopg.errors.AdminShutdown("terminating connection"), False),
        (psycopg.errors.DeadlockDetected("deadlock detected"), False),
        (psycopg.OperationalError("connection refused"), False),
        (RuntimeError("a bug"), False),
    ],
)
def test_the_replica_refuses_a_change_for_its_data_and_retries_the_rest(error, refused):
    """SQLSTATE class 54 is an OperationalError in psycopg, yet a value's fault: retrying it would never end."""
    assert replica_refuses(error) is refused


def row_change(row_id: Any, lsn: Optional[int] = None, op: str = "c", **after) -> Change:
    return Change(
        schema="s",
        table="items",
        op=op,
        key={"id": row_id},
        before={"id": row_id} if op == "d" else None,
        after=None if op == "d" else {"id": row_id, **after},
        lsn=lsn if lsn is not None else 10 + (row_id if isinstance(row_id, int) else 0),
        ts_ms=0,
    )


async def test_a_bulk_request_elasticsearch_refuses_whole_dead_letters_only_the_refused_change():
    """Elasticsearch refuses a whole request (400) for an _id over 512 bytes: the change with that
    key is dead-lettered, the others of the batch are indexed."""
    long_key = "k" * 600
    changes = [row_change(0), row_change(1), row_change(long_key), row_change(3), row_change(4)]
    async with ElasticsearchTestServer() as server:
        sink = ElasticsearchSink(server.url)
        try:
            rejected = await apply_to_sink(sink, changes)
        finally:
            await sink.close()
        ((change, reason),) = rejected
        assert change is changes[2]
        assert reason.startswith("elasticsearch refused it (400)") and "too long" in reason
        assert sorted(server.docs("s.items")) == ["0", "1", "3", "4"]


async def test_a_bulk_request_refused_whole_is_split_until_the_refused_change_stands_alone():
    changes = [row_change(row_id) for row_id in range(4)]
    async with ElasticsearchTestServer() as server:
        sink = ElasticsearchSink(server.url)
        try:
            server.fail_next(3, status=400)  # the whole batch, its first half, then change 0 alone
            rejected = await sink.apply(changes)
        finally:
            await sink.close()
        assert [(change.key["id"], reason.startswith("elasticsearch refused it")) for change, reason in rejected] == [(0, True)]
        assert sorted(server.docs("s.items")) == ["1", "2", "3"]


async def test_a_delete_of_a_document_elasticsearch_does_not_hold_is_not_a_rejection():
    async with ElasticsearchTestServer() as server:
        sink = ElasticsearchSink(server.url)
        try:
            assert await sink.apply([row_change(1)]) == []
            assert await sink.apply([row_change(7, op="d", lsn=20), row_change(1, op="d", lsn=20)]) == []  # 7: never indexed
            elsewhere = Change(schema="s", table="gone", op="d", key={"id": 2}, before={"id": 2}, after=None, lsn=20, ts_ms=0)
            assert await sink.apply([elsewhere]) == []  # in an index that is not there either
        finally:
            await sink.close()
        assert server.docs("s.items") == {} and "s.gone" not in server.indices


async def test_a_change_older_than_what_the_index_holds_is_not_a_rejection():
    async with ElasticsearchTestServer() as server:
        sink = ElasticsearchSink(server.url)
        try:
            assert await sink.apply([row_change(1, lsn=50, name="new")]) == []
            assert await sink.apply([row_change(1, lsn=40, name="old"), row_change(2, lsn=40)]) == []  # 1: a 409
            assert await sink.apply([row_change(1, op="d", lsn=45)]) == []  # an older delete: a 409 too
        finally:
            await sink.close()
        assert server.docs("s.items") == {"1": {"id": 1, "name": "new"}, "2": {"id": 2}}


async def test_elasticsearch_outages_are_waited_out_by_the_writer_not_raised():
    async with ElasticsearchTestServer() as server:
        sink = ElasticsearchSink(server.url)
        sink.writer.initial_backoff = 0.01
        try:
            server.fail_next(2, status=503)
            server.fail_next_documents(1, status=429)
            assert await sink.apply([row_change(row_id) for row_id in range(3)]) == []
        finally:
            await sink.close()
        assert sorted(server.docs("s.items")) == ["0", "1", "2"] and sink.writer.retries == 3


async def test_a_change_the_elasticsearch_client_cannot_encode_is_refused_alone():
    changes = [row_change(1), row_change(2, tags={"a set"}), row_change(3)]  # a set: the JSON serializer raises
    async with ElasticsearchTestServer() as server:
        sink = ElasticsearchSink(server.url)
        try:
            rejected = await sink.apply(changes)
        finally:
            await sink.close()
        assert [(change.key["id"], reason.split(":")[0]) for change, reason in rejected] == [(2, "elasticsearch refused it")]
        assert sorted(server.docs("s.items")) == ["1", "3"]


@pytest.mark.parametrize("mode, captures", [("worker", "True"), ("off", "False")])
def test_workers_capture_only_when_cdc_capture_is_worker(mode, captures):
    import subprocess
    import sys

    from tests.support.workers import REPO_ROOT, environment_with

    env = environment_with(CDC_SOURCE_DSN="postgresql://127.0.0.1:9/source", CDC_TABLES="public.items", CDC_CAPTURE=mode)
    result = subprocess.run(
        [sys.executable, "-c", "import app; from agents.cdc import views; print(views.capture is not None)"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == captures


def test_the_replica_keeps_a_bounded_number_of_statements_however_the_events_vary_their_columns():
    from agents.cdc.sinks import ReplicaSink

    sink = ReplicaSink("postgresql://unused")
    names = [f"c{n}" for n in range(12)]
    sink.tables["public.items"] = ({"id": "integer", **{name: "text" for name in names}}, ["id"])
    for n in range(3 * ReplicaSink.STATEMENTS_MAX):
        columns = ["id"] + names[n % 12 :] + names[: n % 12] + [f"extra{n}"]  # a new column list each time
        sink.tables["public.items"][0][f"extra{n}"] = "text"
        after = {name: "v" for name in columns}
        sink.statement(Change("public", "items", "c", {"id": 1}, None, after, lsn=n, ts_ms=0))

    assert len(sink.statements) == ReplicaSink.STATEMENTS_MAX


def test_the_replica_converts_a_checked_change_once_and_again_when_its_image_was_replaced():
    from agents.cdc.sinks import ReplicaSink

    sink = ReplicaSink("postgresql://unused")
    sink.tables["public.items"] = ({"id": "bigint", "price": "numeric(12,2)", "note": "text"}, ["id"])
    change = Change("public", "items", "u", {"id": 1}, None, {"id": 1, "price": "1.50", "note": "a"}, lsn=7, ts_ms=0)

    assert sink.refusal(change) is None
    assert sink.parameters(change) == ["public.items", "1", 7, 1, Decimal("1.50"), "a"]
    change.after = {"id": 1, "price": "2.25", "note": "b"}  # as complete_images fills a placeholder
    assert sink.parameters(change) == ["public.items", "1", 7, 1, Decimal("2.25"), "b"]
