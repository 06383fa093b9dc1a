"""The replica sink of two workers against one real (throwaway) PostgreSQL replica."""
from __future__ import annotations

import asyncio
import uuid
from typing import List

import psycopg

from agents.cdc import ReplicaSink
from models.cdc import Change, ColumnDef

COLUMNS = [ColumnDef("id", "integer", True), ColumnDef("note", "text", False)]


def snapshot_row(schema: str, row_id: int) -> Change:
    return Change(schema=schema, table="items", op="r", key={"id": row_id}, before=None,
                  after={"id": row_id, "note": f"row {row_id}"}, lsn=100 + row_id, ts_ms=0, snapshot=True, columns=COLUMNS)


async def test_two_workers_creating_the_same_new_tables_at_once_both_apply_their_rows(postgres_server):
    """Each worker's sink creates the tables the replica lacks from its first change; PostgreSQL's
    IF NOT EXISTS alone let one of two concurrent CREATEs fail (pg_type's unique index), which
    crashed that worker's apply agent and lost its batch for the replica."""
    dsn = postgres_server.create_database(f"replica_{uuid.uuid4().hex[:8]}")
    sinks = [ReplicaSink(dsn), ReplicaSink(dsn)]
    schemas: List[str] = [f"s_{uuid.uuid4().hex[:8]}" for _ in range(8)]
    try:
        for schema in schemas:
            rejected = await asyncio.gather(*(sink.apply([snapshot_row(schema, row_id)]) for row_id, sink in enumerate(sinks)))
            assert rejected == [[], []]
    finally:
        for sink in sinks:
            await sink.close()
    with psycopg.connect(dsn) as conn:
        for schema in schemas:
            assert conn.execute(f"SELECT id, note FROM {schema}.items ORDER BY id").fetchall() == [(0, "row 0"), (1, "row 1")]


DOC_COLUMNS = [ColumnDef("id", "integer", True), ColumnDef("note", "text", False), ColumnDef("doc", "jsonb", False)]


def doc_row(schema: str, row_id: int, note: str = "fine", doc: str = '{"a": 1}') -> Change:
    return Change(schema=schema, table="docs", op="c", key={"id": row_id}, before=None,
                  after={"id": row_id, "note": note, "doc": doc}, lsn=100 + row_id, ts_ms=0, columns=DOC_COLUMNS)


async def test_values_the_replica_refuses_at_write_time_are_rejected_and_the_rest_applied(postgres_server):
    """Refusals PostgreSQL raises as OperationalError (SQLSTATE 54: JSON nested past its stack depth,
    an index row over 8 kB) and values psycopg cannot encode come back as rejections (dead letters):
    raised, they were retried for ever and the batch never applied."""
    dsn = postgres_server.create_database(f"replica_{uuid.uuid4().hex[:8]}")
    schema = f"s_{uuid.uuid4().hex[:8]}"
    sink = ReplicaSink(dsn)
    changes = [
        doc_row(schema, 1),
        doc_row(schema, 2, doc="[" * 200_000 + "]" * 200_000),  # stack depth limit exceeded (54001)
        doc_row(schema, 3, note="\ud800"),  # a lone surrogate: psycopg cannot encode it
        doc_row(schema, 4),
    ]
    try:
        await sink.apply([changes[0]])  # creates the table
        with psycopg.connect(dsn, autocommit=True) as conn:  # an index whose rows a huge note overflows (54000)
            conn.execute(f"CREATE INDEX ON {schema}.docs (note)")
        changes.append(doc_row(schema, 5, note="".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(300_000))))
        rejected = await sink.apply(changes[1:])
    finally:
        await sink.close()
    assert sorted(change.key["id"] for change, _ in rejected) == [2, 3, 5]
    assert all(reason for _, reason in rejected)
    with psycopg.connect(dsn) as conn:
        assert conn.execute(f"SELECT id, note FROM {schema}.docs ORDER BY id").fetchall() == [(1, "fine"), (4, "fine")]
