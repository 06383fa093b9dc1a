"""Integration tests for the throwaway PostgreSQL and Redis test helpers."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import redis.asyncio as aioredis

from tests.support.ports import free_port
from tests.support.postgres import ThrowawayPostgres
from tests.support.redis_server import ThrowawayRedis

SHARED_PG_PORT = 5432
SHARED_REDIS_PORT = 6379


@pytest.fixture(scope="module")
def pg() -> Iterator[ThrowawayPostgres]:
    """One throwaway PostgreSQL server for this module."""
    with ThrowawayPostgres() as server:
        yield server


@pytest.fixture
def throwaway_redis() -> Iterator[ThrowawayRedis]:
    """A throwaway Redis server per test."""
    with ThrowawayRedis() as server:
        yield server


def test_free_port_returns_bindable_port() -> None:
    port = free_port()
    assert 0 < port < 65536


def test_postgres_is_private_and_logical(pg: ThrowawayPostgres) -> None:
    assert pg.port != SHARED_PG_PORT
    assert pg.dsn() == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
    with psycopg.connect(pg.dsn()) as conn:
        assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
        assert conn.execute("SHOW port").fetchone() == (str(pg.port),)


def test_postgres_logical_slot_with_pgoutput(pg: ThrowawayPostgres) -> None:
    dsn = pg.create_database("slots")
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT slot_name FROM pg_create_logical_replication_slot('s', 'pgoutput')"
        ).fetchone()
        assert row == ("s",)
        plugin = conn.execute(
            "SELECT plugin FROM pg_replication_slots WHERE slot_name = 's'"
        ).fetchone()
        assert plugin == ("pgoutput",)
        conn.execute("SELECT pg_drop_replication_slot('s')")


def test_postgres_restart_keeps_data(pg: ThrowawayPostgres) -> None:
    dsn = pg.create_database("restart_db")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t VALUES (1, 'kept')")
    port = pg.port

    pg.restart()

    assert pg.port == port
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT v FROM t WHERE id = 1").fetchone() == ("kept",)
        assert conn.execute("SHOW wal_level").fetchone() == ("logical",)


def test_postgres_stop_refuses_connections(pg: ThrowawayPostgres) -> None:
    pg.stop()
    try:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(pg.dsn(), connect_timeout=2)
    finally:
        pg.start()
    with psycopg.connect(pg.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


async def test_redis_set_get(throwaway_redis: ThrowawayRedis) -> None:
    assert throwaway_redis.port != SHARED_REDIS_PORT
    assert throwaway_redis.url == f"redis://127.0.0.1:{throwaway_redis.port}/0"
    client = aioredis.Redis.from_url(throwaway_redis.url)
    try:
        info = await client.info("server")
        assert int(info["tcp_port"]) == throwaway_redis.port
        key, value = f"k-{uuid.uuid4()}", b"v"
        assert await client.set(key, value)
        assert await client.get(key) == value
    finally:
        await client.aclose()


def test_redis_stops_on_exit() -> None:
    with ThrowawayRedis() as server:
        port, base_dir = server.port, server.base_dir
    assert base_dir is not None and not base_dir.exists()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_postgres_exit_removes_tempdir() -> None:
    with ThrowawayPostgres() as server:
        base_dir = server.base_dir
        assert base_dir is not None and (base_dir / "data" / "PG_VERSION").exists()
    assert not base_dir.exists()
