"""Fixtures that start real services: the local broker, PostgreSQL, Redis, an Elasticsearch-compatible
server, and real worker processes. A fixture that cannot start its service fails with the reason."""
from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator, List

import pytest

# Unit tests run agents in-process with Faust's test_context: tables in memory, nothing on disk.
# Worker processes started by the fixtures below get a real RocksDB store of their own.
os.environ.setdefault("STORE", "memory://")
os.environ.setdefault("DATA_DIR", tempfile.mkdtemp(prefix="streamspine-unit-"))

from app.local_broker import LocalBroker
from tests.support.es_server import ElasticsearchTestServer
from tests.support.postgres import ThrowawayPostgres
from tests.support.redis_server import ThrowawayRedis
from tests.support.workers import WorkerProcess, wait_until_ready


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[LocalBroker]:
    """One local Kafka-compatible broker for the whole test session."""
    with LocalBroker() as broker:
        yield broker


@pytest.fixture
def isolated_broker() -> Iterator[LocalBroker]:
    """A broker of this test's own, for tests that must see no other test's topics."""
    with LocalBroker() as broker:
        yield broker


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[ThrowawayPostgres]:
    """A throwaway PostgreSQL cluster with wal_level=logical on a free port."""
    with ThrowawayPostgres() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[ThrowawayRedis]:
    """A throwaway redis-server on a free port."""
    with ThrowawayRedis() as server:
        yield server


@pytest.fixture(scope="session")
def es_server() -> Iterator[ElasticsearchTestServer]:
    """The in-repo Elasticsearch-compatible server, running in a thread."""
    with ElasticsearchTestServer.in_thread() as server:
        yield server


@pytest.fixture
def app_id() -> str:
    """A fresh application id: its own consumer group and changelog topics."""
    return f"streamspine-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def start_workers(tmp_path: Path, app_id: str) -> Iterator[Callable[..., List[WorkerProcess]]]:
    """Start N real worker processes sharing one app id and wait until all are ready."""
    started: List[WorkerProcess] = []

    def start(broker: LocalBroker, count: int = 1, **env: str) -> List[WorkerProcess]:
        workers = [
            WorkerProcess(broker.url, tmp_path / f"worker-{len(started) + i}", app_id=app_id, env=env).start()
            for i in range(count)
        ]
        started.extend(workers)
        wait_until_ready(started)
        return workers

    yield start
    for worker in started:
        worker.stop()
