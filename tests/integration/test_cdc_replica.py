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
