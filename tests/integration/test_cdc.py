"""Change data capture end to end: a real throwaway PostgreSQL (wal_level=logical) as source and
replica, a real Redis, the Elasticsearch-compatible test server, the local broker and real
workers. Every test ends with the replica, Redis and the index equal to the source, row for row."""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import psycopg
import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from psycopg.types.json import Json, Jsonb

from app.local_broker import worker_env_defaults
from models.cdc import UNAVAILABLE, python_value
from tests.support.workers import REPO_ROOT, WorkerProcess, wait_for, wait_until_ready

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cdc"

ITEMS_DDL = """
CREATE TABLE {schema}.items (
    id bigint PRIMARY KEY,
    name text,
    price numeric(14,4),
    big bigint,
    happened timestamptz,
    local_ts timestamp,
    day date,
    doc jsonb,
    meta json,
    tags text[],
    nums integer[],
    blob bytea,
    flag boolean,
    ratio double precision
);
ALTER TABLE {schema}.items REPLICA IDENTITY FULL;
CREATE TABLE {schema}.pairs (a integer, b text, val numeric, note text, PRIMARY KEY (a, b));
CREATE TABLE {schema}.notes (id integer PRIMARY KEY, body text, n integer);
"""
ITEM_COLUMNS = ["id", "name", "price", "big", "happened", "local_ts", "day", "doc", "meta", "tags", "nums", "blob", "flag", "ratio"]


class Scenario:
    """One test's source database, replica database, Redis database, schema, slot and topics."""

    def __init__(self, postgres, redis_server, es_server, index: int, kafka: Tuple[str, str]) -> None:
        self.kafka = kafka  # bootstrap servers and the workers' consumer group, for diagnostics
        suffix = uuid.uuid4().hex[:8]
        self.schema = f"s_{suffix}"
        self.source_dsn = postgres.create_database(f"source_{suffix}")
        self.replica_dsn = postgres.create_database(f"replica_{suffix}")
        self.redis_url = f"{redis_server.url.rsplit('/', 1)[0]}/{index}"
        self.es_url = es_server.url
        self.es_server = es_server
        self.prefix = f"cdc-{suffix}"
        self.slot = f"slot_{suffix}"
        self.tables = [f"{self.schema}.items", f"{self.schema}.pairs", f"{self.schema}.notes"]
        with psycopg.connect(self.source_dsn, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {self.schema}")
            conn.execute(ITEMS_DDL.format(schema=self.schema))

    def env(self, tables: Optional[List[str]] = None, restarts: bool = False) -> Dict[str, str]:
        """The workers' settings. ``restarts``: one change record per produce batch, as the other
        crash/restart tests send their source records: on the local broker, source partitions written
        in multi-record batches stalled after a worker restart now and then (README findings)."""
        env = {
            "CDC_SOURCE_DSN": self.source_dsn, "REPLICA_DSN": self.replica_dsn, "REDIS_URL": self.redis_url,
            "ELASTICSEARCH_URL": self.es_url, "CDC_TABLES": ",".join(tables or self.tables),
            "CDC_SLOT": self.slot, "CDC_PUBLICATION": f"pub_{self.slot}", "CDC_TOPIC_PREFIX": self.prefix,
        }
        if restarts:
            env["CDC_PRODUCER_BATCH_SIZE"] = "1"
        return env


@pytest.fixture
def scenario(request, postgres_server, redis_server, es_server, kafka_broker, app_id) -> Scenario:
    index = 1 + (abs(hash(request.node.name)) % 15)
    redis.Redis.from_url(f"{redis_server.url.rsplit('/', 1)[0]}/{index}").flushdb()
    return Scenario(postgres_server, redis_server, es_server, index, kafka=(kafka_broker.bootstrap, app_id))


# --- a seeded random workload -----------------------------------------------------------------------


def random_item(rng: random.Random, item_id: int) -> Dict[str, Any]:
    """A row of every type, each column NULL now and then."""
    maybe = lambda value: None if rng.random() < 0.12 else value  # noqa: E731
    zone = timezone(timedelta(minutes=rng.choice([0, 60, -300, 330])))
    return {
        "id": item_id,
        "name": maybe(rng.choice(["widget", "gadget", "naïve café ☕", "it's \"quoted\"", "", "a,b{c}"]) + str(rng.randint(0, 999))),
        "price": maybe(Decimal(rng.randint(-10**12, 10**12)) / 10000),
        "big": maybe(rng.choice([2**53 + rng.randint(1, 10**6), -(2**62) + rng.randint(0, 10**6), 2**63 - 1, rng.randint(-5, 5)])),
        "happened": maybe(datetime(2020, 1, 1, tzinfo=timezone.utc).astimezone(zone) + timedelta(microseconds=rng.randint(0, 10**14))),
        "local_ts": maybe(datetime(1999, 12, 31) + timedelta(microseconds=rng.randint(0, 10**14))),
        "day": maybe(date(1960, 1, 1) + timedelta(days=rng.randint(0, 40000))),
        "doc": maybe(Jsonb({"k": rng.randint(0, 9), "nested": {"list": [1, "two", None, 3.5]}, "big": 2**60 + rng.randint(0, 99)})),
        "meta": maybe(Json([rng.random(), {"x": "y"}])),
        "tags": maybe([rng.choice(["a", "b c", None, "d,e", "{x}"]) for _ in range(rng.randint(0, 4))]),
        "nums": maybe([rng.choice([1, -2, None, 2**31 - 1]) for _ in range(rng.randint(0, 4))]),
        "blob": maybe(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))),
        "flag": maybe(rng.random() < 0.5),
        "ratio": maybe(rng.uniform(-1e6, 1e6)),
    }


def insert_item(conn: psycopg.Connection, schema: str, item: Dict[str, Any]) -> None:
    columns = ", ".join(item)
    conn.execute(f"INSERT INTO {schema}.items ({columns}) VALUES ({', '.join(['%s'] * len(item))})", list(item.values()))


def run_workload(dsn: str, schema: str, seed: int, transactions: int, first_id: int, pause: float = 0.0) -> None:
    """Inserts, updates (also of the key), deletes in transactions of 1-8 statements, on both tables;
    ``pause`` seconds between transactions spread the workload over time."""
    rng = random.Random(seed)
    with psycopg.connect(dsn, autocommit=True) as conn:  # each conn.transaction() a real transaction
        ids = [row[0] for row in conn.execute(f"SELECT id FROM {schema}.items").fetchall()]
        pairs = [tuple(row) for row in conn.execute(f"SELECT a, b FROM {schema}.pairs").fetchall()]
        next_id = first_id
        for _ in range(transactions):
            with conn.transaction():
                for _ in range(rng.randint(1, 8)):
                    roll = rng.random()
                    if roll < 0.4 or not ids:
                        insert_item(conn, schema, random_item(rng, next_id))
                        ids.append(next_id)
                        next_id += 1
                    elif roll < 0.7:
                        item = random_item(rng, rng.choice(ids))
                        changed = {k: v for k, v in item.items() if k == "id" or rng.random() < 0.5}
                        sets = ", ".join(f"{k} = %s" for k in changed if k != "id")
                        if sets:
                            conn.execute(f"UPDATE {schema}.items SET {sets} WHERE id = %s", [v for k, v in changed.items() if k != "id"] + [item["id"]])
                    elif roll < 0.75:
                        old = rng.choice(ids)
                        conn.execute(f"UPDATE {schema}.items SET id = %s WHERE id = %s", (next_id, old))
                        ids.remove(old)
                        ids.append(next_id)
                        next_id += 1
                    elif roll < 0.9:
                        victim = rng.choice(ids)
                        conn.execute(f"DELETE FROM {schema}.items WHERE id = %s", (victim,))
                        ids.remove(victim)
                    elif roll < 0.97 or not pairs:
                        pair = (rng.randint(0, 50), rng.choice(["x", "y", "z"]))
                        conn.execute(
                            f"INSERT INTO {schema}.pairs VALUES (%s, %s, %s, %s) ON CONFLICT (a, b) DO UPDATE SET val = EXCLUDED.val, note = EXCLUDED.note",
                            (*pair, Decimal(rng.randint(0, 10**6)) / 100, rng.choice([None, "n"])))
                        if pair not in pairs:
                            pairs.append(pair)
                    else:
                        pair = rng.choice(pairs)
                        conn.execute(f"DELETE FROM {schema}.pairs WHERE a = %s AND b = %s", pair)
                        pairs.remove(pair)
            time.sleep(pause)


# --- reading every copy --------------------------------------------------------------------------


def column_types(dsn: str, table: str) -> Dict[str, str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (table,)).fetchall()
    return dict(rows)


def key_columns(table: str) -> List[str]:
    return ["a", "b"] if table.endswith(".pairs") else ["id"]


def write_toasted_notes(dsn: str, schema: str) -> None:
    """Rows whose body is stored out of line (TOAST), then updates that leave the body alone: the
    WAL carries no value for it (replica identity default), the apply side takes it from the row image."""
    rng = random.Random(11)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for note_id in range(5):
            body = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(20_000))
            conn.execute(f"INSERT INTO {schema}.notes VALUES (%s, %s, 0)", (note_id, body))
        for round_ in range(1, 4):
            conn.execute(f"UPDATE {schema}.notes SET n = %s", (round_,))


def redis_row_id(key: Tuple[Any, ...]) -> str:
    return ":".join(v if isinstance(v, str) else json.dumps(v) for v in key)


def database_rows(dsn: str, table: str) -> Dict[Tuple[Any, ...], Dict[str, Any]]:
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        cursor = conn.execute(f"SELECT * FROM {table}")
        names = [d.name for d in cursor.description]
        rows = [dict(zip(names, row)) for row in cursor.fetchall()]
    return {tuple(row[k] for k in key_columns(table)): row for row in rows}


def decoded(document: Dict[str, Any], types: Dict[str, str]) -> Dict[str, Any]:
    return {name: python_value(value, types[name]) for name, value in document.items()}


def redis_rows(url: str, table: str, types: Dict[str, str], skip: Tuple[str, ...] = ()) -> Dict[str, Dict[str, Any]]:
    client = redis.Redis.from_url(url)
    rows = {}
    for key in client.scan_iter(match=f"{table}:*", count=1000):
        if key.decode().split(":", 1)[1] in skip:
            continue
        fields = client.hgetall(key)
        rows[key.decode().split(":", 1)[1]] = decoded({k.decode(): json.loads(v) for k, v in fields.items()}, types)
    return rows


def index_rows(es_server, table: str, types: Dict[str, str], skip: Tuple[str, ...] = ()) -> Dict[str, Dict[str, Any]]:
    return {doc_id: decoded(source, types) for doc_id, source in es_server.docs(table.lower()).items() if doc_id not in skip}


def row_differences(scenario: Scenario, table: str) -> Dict[str, Tuple[set, set, List[str], Dict[str, Any], Dict[str, Any]]]:
    """Per copy that differs from the source: (ids missing, ids extra, ids whose row differs, the
    copy's rows, the source's rows), by row id."""
    source = database_rows(scenario.source_dsn, table)
    types = column_types(scenario.source_dsn, table)
    by_id = {redis_row_id(key): row for key, row in source.items()}
    try:
        replica = database_rows(scenario.replica_dsn, table)
    except psycopg.errors.UndefinedTable:
        replica = {}
    copies = {"replica": ({redis_row_id(k): v for k, v in replica.items()}), "redis": redis_rows(scenario.redis_url, table, types),
              "index": index_rows(scenario.es_server, table, types)}
    found = {}
    for name, rows in copies.items():
        missing, extra = by_id.keys() - rows.keys(), rows.keys() - by_id.keys()
        wrong = [row_id for row_id in by_id.keys() & rows.keys() if rows[row_id] != by_id[row_id]]
        if missing or extra or wrong:
            found[name] = (missing, extra, wrong, rows, by_id)
    return found


def differences(scenario: Scenario, table: str) -> List[str]:
    """What differs between the source and each copy ([] when all are equal)."""
    problems = []
    for name, (missing, extra, wrong, rows, by_id) in row_differences(scenario, table).items():
        sample = wrong[0] if wrong else None
        problems.append(f"{table} {name}: {len(missing)} missing, {len(extra)} extra, {len(wrong)} differ"
                        + (f" e.g. {rows[sample]} != {by_id[sample]}" if sample else ""))
    return problems


def wait_until_copies_equal(scenario: Scenario, timeout: float = 120.0) -> None:
    """Fails with what differs, and where the differing rows' last change events are in their
    topics, next to the workers' committed offsets."""
    last: List[str] = []

    def equal() -> bool:
        nonlocal last
        last = [problem for table in scenario.tables for problem in differences(scenario, table)]
        return not last

    try:
        wait_for(equal, timeout=timeout, interval=1.0, message="replica, Redis and index equal to the source")
    except TimeoutError:
        try:
            found = {table: row_differences(scenario, table) for table in scenario.tables}
            diagnosis = "\n".join(asyncio.run(topic_diagnosis(*scenario.kafka, scenario, table, copies.get("replica")))
                                  for table, copies in found.items() if copies)
        except Exception as error:  # the differences above are the failure; this only explains them
            diagnosis = f"(topics not read: {error!r})"
        raise AssertionError("copies differ from the source: " + "; ".join(last) + "\n" + diagnosis) from None


async def committed_offsets(bootstrap: str, group: str, topic: str, partitions: Iterable[int]) -> Dict[int, Any]:
    """The group's committed offset of each partition (None where it committed none)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in sorted(partitions)}
    finally:
        await consumer.stop()


async def topic_diagnosis(bootstrap: str, group: str, scenario: Scenario, table: str, replica: Optional[Tuple]) -> str:
    """For a table whose copies differ: per partition of its topic the end offset and the group's
    committed offset, and for each row the replica has wrong (``replica``: its entry of
    ``row_differences``, if any) the last change event of its key (partition, offset, op): tells a
    change never published from one published but never applied."""
    topic = f"{scenario.prefix}.{table}"
    records = await read_topic(bootstrap, topic)
    committed = await committed_offsets(bootstrap, group, topic, {record.partition for record in records})
    ends: Dict[int, int] = {}
    last_event: Dict[str, Any] = {}
    for record in records:
        ends[record.partition] = max(ends.get(record.partition, 0), record.offset + 1)
        key = json.loads(record.key)
        key = key.get("payload", key)
        row_id = redis_row_id(tuple(key[column] for column in key_columns(table)))
        op = json.loads(record.value)["op"] if record.value else "tombstone"
        last_event[row_id] = (record.partition, record.offset, op)
    lines = [f"{topic}: partition end/committed " + ", ".join(
        f"{p}: {ends.get(p, 0)}/{committed.get(p, '-')}" for p in sorted(set(ends) | set(committed)))]
    if replica is not None:
        missing, extra, wrong = replica[:3]
        for kind, ids in (("missing", missing), ("extra", extra), ("differs", wrong)):
            lines.extend(f"  {kind} {row_id}: last event {last_event.get(row_id)}" for row_id in sorted(ids)[:30])
    return "\n".join(lines)


async def read_topic(bootstrap: str, topic: str) -> List[Any]:
    """Every record of a topic, up to its end offsets now."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    try:
        partitions = consumer.assignment() or set()
        for _ in range(50):  # the topic may not exist yet
            if partitions:
                break
            await asyncio.sleep(0.1)
            partitions = consumer.assignment()
        if not partitions:
            return []
        ends = await consumer.end_offsets(list(partitions))
        records = []
        async def behind() -> bool:
            return any([await consumer.position(tp) < end for tp, end in ends.items()])

        while await behind():
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


def seed_items(scenario: Scenario, count: int, seed: int) -> None:
    rng = random.Random(seed)
    with psycopg.connect(scenario.source_dsn) as conn:
        for item_id in range(count):
            insert_item(conn, scenario.schema, random_item(rng, item_id))
        conn.execute(f"INSERT INTO {scenario.schema}.pairs VALUES (1, 'x', 1.5, NULL), (2, 'y', NULL, 'note')")


# --- tests ---------------------------------------------------------------------------------------


def test_snapshot_then_random_workload_ends_with_every_copy_equal_to_the_source(kafka_broker, start_workers, scenario):
    seed_items(scenario, 300, seed=1)
    [worker] = start_workers(kafka_broker, **scenario.env())
    run_workload(scenario.source_dsn, scenario.schema, seed=2, transactions=600, first_id=10_000)
    write_toasted_notes(scenario.source_dsn, scenario.schema)
    wait_until_copies_equal(scenario)

    records = asyncio.run(read_topic(kafka_broker.bootstrap, f"{scenario.prefix}.{scenario.schema}.items"))
    snapshot_keys = [json.loads(r.key)["id"] for r in records if r.value and json.loads(r.value)["op"] == "r"]
    assert sorted(snapshot_keys) == list(range(300)), "each pre-existing row arrives via the snapshot exactly once"
    ops = {json.loads(r.value)["op"] for r in records if r.value}
    assert ops == {"r", "c", "u", "d"}
    assert any(r.value is None for r in records), "a tombstone follows each delete"
    notes = asyncio.run(read_topic(kafka_broker.bootstrap, f"{scenario.prefix}.{scenario.schema}.notes"))
    assert any(UNAVAILABLE.encode() in r.value for r in notes if r.value), "unchanged TOAST values were left out of the WAL"

    status, body = worker.get("/cdc/status/")
    assert status == 200
    items = body["tables"][f"{scenario.schema}.items"]
    assert items["counts"]["r"] == 300 and items["counts"]["c"] > 0
    assert body["slot"]["slot"] == scenario.slot and body["slot"]["confirmed_lsn"]
    status, row = worker.get("/cdc/rows/{}.items/id=0/".format(scenario.schema))
    source_row = database_rows(scenario.source_dsn, f"{scenario.schema}.items").get((0,))
    if source_row is None:
        assert status == 404
    else:
        assert status == 200 and row["row"]["id"] == 0


def applied_changes(worker: WorkerProcess, table: str) -> int:
    try:
        status, body = worker.get("/cdc/status/")
    except OSError:
        return 0
    return body["tables"].get(table, {}).get("total", 0) if status == 200 else 0


def test_worker_killed_mid_workload_and_restarted_loses_nothing(kafka_broker, scenario, tmp_path, app_id):
    seed_items(scenario, 100, seed=3)
    worker = WorkerProcess(kafka_broker.url, tmp_path / "crash", app_id=app_id, env=scenario.env(restarts=True)).start()
    restarted = None
    try:
        wait_until_ready([worker])
        workload = threading.Thread(target=run_workload, args=(scenario.source_dsn, scenario.schema, 4, 800, 10_000, 0.01))
        workload.start()
        wait_for(lambda: applied_changes(worker, f"{scenario.schema}.items") > 400, timeout=60, interval=0.1,
                 message="the first changes applied")
        worker.stop(signal.SIGKILL)
        assert workload.is_alive(), "the crash must land while the workload is still running"
        workload.join()
        restarted = WorkerProcess(kafka_broker.url, tmp_path / "crash", app_id=app_id, env=scenario.env(restarts=True), port=worker.port).start()
        wait_until_ready([restarted])
        run_workload(scenario.source_dsn, scenario.schema, seed=6, transactions=100, first_id=30_000)
        wait_until_copies_equal(scenario)
    finally:
        worker.stop()
        if restarted is not None:
            restarted.stop()


def capturing_workers(workers: List[WorkerProcess]) -> List[WorkerProcess]:
    return [worker for worker in workers if worker.get("/cdc/status/local/")[1]["capturing"]]


def test_two_workers_capture_once_and_the_other_takes_over_when_the_capturer_dies(kafka_broker, start_workers, scenario, app_id):
    """The capture lock moves to the surviving worker; a replacement takes the dead worker's
    partitions (the local broker does not expire a killed member's session, so it is replaced)."""
    seed_items(scenario, 50, seed=12)
    workers = start_workers(kafka_broker, count=2, **scenario.env(restarts=True))
    [capturer] = wait_for(lambda: capturing_workers(workers), timeout=30, message="a capturing worker")
    assert len(capturing_workers(workers)) == 1, "exactly one worker captures"
    run_workload(scenario.source_dsn, scenario.schema, seed=13, transactions=200, first_id=10_000)
    capturer.stop(signal.SIGKILL)
    [survivor] = [worker for worker in workers if worker is not capturer]
    wait_for(lambda: capturing_workers([survivor]), timeout=30, message="the surviving worker capturing")
    run_workload(scenario.source_dsn, scenario.schema, seed=14, transactions=200, first_id=20_000)
    replacement = WorkerProcess(kafka_broker.url, capturer.work_dir, app_id=app_id, env=scenario.env(restarts=True), port=capturer.port).start()
    try:
        wait_until_ready([survivor, replacement], timeout=120)
        assert capturing_workers([survivor, replacement]) == [survivor], "the lock stays with one worker"
        wait_until_copies_equal(scenario)
        source = database_rows(scenario.source_dsn, f"{scenario.schema}.items")
        for worker in (survivor, replacement):  # each answers for every row: routed to the key's owner
            for (item_id,) in sorted(source)[:10]:
                status, body = worker.get(f"/cdc/rows/{scenario.schema}.items/id={item_id}/")
                assert status == 200 and body["row"]["id"] == item_id, (status, body)
    finally:
        replacement.stop()
    records = asyncio.run(read_topic(kafka_broker.bootstrap, f"{scenario.prefix}.{scenario.schema}.items"))
    snapshot_keys = [json.loads(r.key)["id"] for r in records if r.value and json.loads(r.value)["op"] == "r"]
    assert sorted(snapshot_keys) == list(range(50)), "one snapshot, however many workers"


def test_source_database_restart_mid_workload_loses_nothing(kafka_broker, start_workers, scenario, postgres_server):
    seed_items(scenario, 50, seed=7)
    start_workers(kafka_broker, **scenario.env())
    run_workload(scenario.source_dsn, scenario.schema, seed=8, transactions=300, first_id=10_000)
    postgres_server.restart()
    run_workload(scenario.source_dsn, scenario.schema, seed=9, transactions=300, first_id=20_000)
    wait_until_copies_equal(scenario)


def debezium_records(schema: str, topic_prefix: str) -> List[Tuple[bytes, Optional[bytes]]]:
    """The recorded Debezium events (tests/fixtures/cdc), moved to this test's schema as a
    connector capturing a table there would name it."""
    records = []
    for sample in json.loads((FIXTURES / "debezium_items.json").read_text()):
        value = sample["value"]
        if value is not None:
            value.get("payload", value)["source"]["schema"] = schema
        compact = lambda doc: json.dumps(doc, separators=(",", ":")).encode()  # noqa: E731 - the JSON converter's form
        records.append((compact(sample["key"]), None if value is None else compact(value)))
    return records


async def produce_records(bootstrap: str, topic: str, records: List[Tuple[bytes, Optional[bytes]]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_batch_size=1)
    await producer.start()
    try:
        for key, value in records:
            await (await producer.send(topic, value, key=key))
    finally:
        await producer.stop()


def copies_of(scenario: Scenario, table: str, skip: Tuple[str, ...] = ()) -> Dict[str, Dict[str, Dict[str, Any]]]:
    types = column_types(scenario.source_dsn, f"{scenario.schema}.items")
    return {
        "replica": {redis_row_id(k): v for k, v in database_rows(scenario.replica_dsn, table).items() if redis_row_id(k) not in skip},
        "redis": redis_rows(scenario.redis_url, table, types, skip),
        "index": index_rows(scenario.es_server, table, types, skip),
    }


def test_debezium_connector_events_apply_like_our_own(kafka_broker, start_workers, scenario):
    """The same statements, captured here into ``items`` and recorded from a Debezium connector into
    ``dbz_items``, leave the same rows in the replica, Redis and the index."""
    schema = scenario.schema
    before_capture, stream = (FIXTURES / "debezium_items.sql").read_text().format(schema=schema).split("\n-- stream\n")
    dbz_table = f"{schema}.dbz_items"
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {dbz_table} (LIKE {schema}.items INCLUDING ALL)")
        conn.execute(before_capture)
    with psycopg.connect(scenario.replica_dsn, autocommit=True) as conn:  # a Debezium event has no column types
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(ITEMS_DDL.format(schema=schema).replace(".items", ".dbz_items").split("CREATE TABLE {}.pairs".format(schema))[0])
    start_workers(kafka_broker, **scenario.env(scenario.tables + [dbz_table]))
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        conn.execute(stream)
    wait_until_copies_equal(scenario)
    topic = f"{scenario.prefix}.{dbz_table}"
    asyncio.run(produce_records(kafka_broker.bootstrap, topic, bad_records(schema) + debezium_records(schema, scenario.prefix)))

    compared: Dict[str, Any] = {}

    def same_rows() -> Optional[Dict[str, Any]]:
        compared["ours"] = copies_of(scenario, f"{schema}.items")
        compared["theirs"] = copies_of(scenario, dbz_table, skip=("99",))  # the row only the replica refused
        return compared["ours"] if compared["ours"] == compared["theirs"] else None

    try:
        ours = wait_for(same_rows, timeout=60, message="Debezium's events applied like ours")
    except TimeoutError:
        raise AssertionError(f"ours {compared['ours']} != Debezium's {compared['theirs']}") from None
    assert set(ours["redis"]) == {"1", "4", "5"}
    assert ours["replica"]["1"]["price"] == Decimal("-0.0001") and ours["replica"]["5"]["big"] == -(2**63)

    dead = wait_for(lambda: (lambda d: len(d) >= 3 and d)(asyncio.run(read_topic(kafka_broker.bootstrap, topic + ".dlq"))),
                    timeout=30, message="three dead letters")
    reasons = sorted(dict(r.headers)["dlq.reason"].decode() for r in dead)
    assert len(reasons) == 3, reasons
    assert any("value is not JSON" in r for r in reasons)
    assert any("op 't' is not applied" in r for r in reasons)
    assert any(r.startswith("replica: ") and "'abc'" in r for r in reasons)


def bad_records(schema: str) -> List[Tuple[bytes, Optional[bytes]]]:
    """Not JSON, a truncate, and a row whose price the replica cannot take (Redis and the index can)."""
    source = {"version": "2.5.0.Final", "connector": "postgresql", "name": "shop", "db": "shop", "schema": schema,
              "table": "dbz_items", "ts_ms": 1709288100000, "snapshot": "false", "txId": 700, "lsn": 23000000}
    bad_row = {"id": 99, "name": "bad", "price": "abc"}
    return [
        (b'{"id":98}', b"not json"),
        (None, json.dumps({"before": None, "after": None, "source": source, "op": "t", "ts_ms": 1709288100001}).encode()),
        (b'{"id":99}', json.dumps({"before": None, "after": bad_row, "source": source, "op": "c", "ts_ms": 1709288100002}).encode()),
    ]


# --- hostile change events -----------------------------------------------------------------------

NOTE_COLUMNS = [["id", "integer", True], ["body", "text", False], ["n", "integer", False]]


def note_event(schema: str, op: str, row: Dict[str, Any], lsn: int, **source: Any) -> bytes:
    """Our envelope of a change of ``<schema>.notes`` (with its column types: the replica creates the table)."""
    after, before = (None, {"id": row["id"]}) if op == "d" else (row, None)
    envelope = {"before": before, "after": after, "op": op, "ts_ms": 1_700_000_000_000,
                "source": {"schema": schema, "table": "notes", "lsn": lsn, "txId": lsn, "ts_ms": 1_700_000_000_000,
                           "snapshot": "false", "columns": NOTE_COLUMNS, **source}}
    return json.dumps(envelope).encode()


def hostile_notes(schema: str) -> List[Tuple[bytes, bytes, str]]:
    """(key, value, what is wrong) of change events no sink may apply."""
    def raw(n: bytes, row_id: int = 50) -> bytes:  # a note whose n is the raw JSON ``n``
        return note_event(schema, "c", {"id": row_id, "body": "x", "n": "@n@"}, 900).replace(b'"@n@"', n)
    return [
        (b'{"id":50}', b"[" * 50_000 + b"]" * 50_000, "JSON nested 50,000 deep"),
        (b'{"id":50}', raw(b"9" * 5000), "a 5,000-digit integer"),
        (b'{"id":50}', raw(str(2**70).encode()), "an integer over 64 bits"),
        (b'{"id":50}', raw(b"1e400"), "a number beyond a double"),
        (b'{"id":50}', raw(b"NaN"), "NaN"),
        (b'{"id":50}', raw(str(2**31).encode()), "beyond its integer column"),
        (b'{"id":50}', note_event(schema, "c", {"id": 50, "body": "a\x00b", "n": 1}, 900), "NUL in text"),
        (b'{"id":50}', note_event(schema, "c", {"id": 50, "body": "x", "n": 1}, 900).replace(b'"x"', b'"\\ud800"'), "a lone surrogate"),
        (b'{"id":50}', note_event(schema, "c", {"id": 50, "body": "x", "n": 1}, 900,
                                  columns=[["id", "integer); DROP TABLE public._cdc_versions; --", True]]), "SQL as a column type"),
        (b'{"id":50}', note_event(schema, "c", {"id": 50, "body": "x", "n": 1}, 900, table="_cdc_versions"), "another table"),
        (b'{"id":50}', b"\xff\xfe not UTF-8", "not UTF-8"),
    ]


def test_hostile_change_events_are_dead_lettered_and_the_good_ones_around_them_applied(kafka_broker, start_workers, scenario):
    """The records of one batch: good changes with every kind of hostile event between them. Each
    hostile one is a dead letter with its reason; every good one reaches the replica, Redis and the
    index (before, a deeply nested event crashed the agent and its batch was acknowledged: lost)."""
    schema, table = scenario.schema, f"{scenario.schema}.notes"
    env = {name: value for name, value in scenario.env([table]).items() if name != "CDC_SOURCE_DSN"}  # apply only
    start_workers(kafka_broker, **env)
    good = [(key_json_of(i), note_event(schema, "c", {"id": i, "body": f"note {i}", "n": i}, 100 + i)) for i in range(1, 7)]
    good += [(key_json_of(2), note_event(schema, "u", {"id": 2, "body": "updated", "n": 20}, 200)),
             (key_json_of(3), note_event(schema, "d", {"id": 3}, 201)), (key_json_of(3), None)]
    hostile = hostile_notes(schema)
    interleaved = itertools.zip_longest(good, [(key, value) for key, value, _ in hostile])
    topic = f"{scenario.prefix}.{table}"
    asyncio.run(produce_records(kafka_broker.bootstrap, topic, [record for pair in interleaved for record in pair if record]))

    expected = {1: ("note 1", 1), 2: ("updated", 20), 4: ("note 4", 4), 5: ("note 5", 5), 6: ("note 6", 6)}
    found: Dict[str, Any] = {}

    def every_sink_holds_the_good_notes() -> bool:
        found.update(notes_in_every_sink(scenario, table))
        return found == {name: expected for name in ("replica", "redis", "index")}

    try:
        wait_for(every_sink_holds_the_good_notes, timeout=90, message="the good notes in every sink")
    except TimeoutError:
        raise AssertionError(f"expected {expected} in every sink, found {found}") from None
    dead = wait_for(lambda: (lambda d: len(d) >= len(hostile) and d)(asyncio.run(read_topic(kafka_broker.bootstrap, topic + ".dlq"))),
                    timeout=30, message="a dead letter per hostile event")
    assert sorted(r.value or b"" for r in dead) == sorted(value for _, value, _ in hostile)
    assert all(dict(r.headers)["dlq.reason"] for r in dead)
    with psycopg.connect(scenario.replica_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM public._cdc_versions WHERE table_name <> %s", (table,)).fetchone()[0] == 0


def key_json_of(row_id: int) -> bytes:
    return json.dumps({"id": row_id}, separators=(",", ":")).encode()


def notes_in_every_sink(scenario: Scenario, table: str) -> Dict[str, Dict[int, Tuple[str, int]]]:
    """(body, n) of each note, per sink."""
    found: Dict[str, Dict[int, Tuple[str, int]]] = {}
    try:
        found["replica"] = {row["id"]: (row["body"], row["n"]) for row in database_rows(scenario.replica_dsn, table).values()}
    except psycopg.errors.UndefinedTable:
        found["replica"] = {}
    types = {"id": "integer", "body": "text", "n": "integer"}
    found["redis"] = {int(row_id): (row["body"], row["n"]) for row_id, row in redis_rows(scenario.redis_url, table, types).items()}
    found["index"] = {int(row_id): (row["body"], row["n"]) for row_id, row in index_rows(scenario.es_server, table, types).items()}
    return found


# --- the capture service -----------------------------------------------------------------------------


def start_capture_service(kafka_broker, scenario: Scenario, app_id: str, work_dir: Path) -> subprocess.Popen:
    """``python -m agents.cdc.capture`` as the Procfile's ``capture:`` line runs it, logging to work_dir."""
    env = {
        **os.environ, **worker_env_defaults(os.environ), "KAFKA_BROKER": kafka_broker.url, "APP_ID": app_id,
        "DATA_DIR": str(work_dir / "data"), **scenario.env(),
    }
    with open(work_dir / "capture.log", "wb") as log:  # the process keeps its own handle
        return subprocess.Popen([sys.executable, "-m", "agents.cdc.capture"], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def change_keys(bootstrap: str, topic: str, op: str, at_least: int) -> Optional[List[int]]:
    """The row ids of the topic's ``op`` events once there are ``at_least`` of them, else None."""
    records = asyncio.run(read_topic(bootstrap, topic))
    keys = sorted(json.loads(r.key)["id"] for r in records if r.value and json.loads(r.value)["op"] == op)
    return keys if len(keys) >= at_least else None


def test_the_capture_service_alone_publishes_the_snapshot_then_the_changes(kafka_broker, scenario, app_id, tmp_path):
    """No worker runs: the capture service's own process snapshots the source, then streams."""
    seed_items(scenario, 20, seed=21)
    topic = f"{scenario.prefix}.{scenario.schema}.items"
    service = start_capture_service(kafka_broker, scenario, app_id, tmp_path)
    try:
        snapshot = wait_for(lambda: change_keys(kafka_broker.bootstrap, topic, "r", at_least=20), timeout=60, message="the snapshot published")
        with psycopg.connect(scenario.source_dsn) as conn:
            insert_item(conn, scenario.schema, random_item(random.Random(22), 1000))
        created = wait_for(lambda: change_keys(kafka_broker.bootstrap, topic, "c", at_least=1), timeout=60, message="the insert published")
        assert service.poll() is None, (tmp_path / "capture.log").read_text()[-2000:]
    finally:
        service.terminate()
        service.wait(timeout=30)
    assert snapshot == list(range(20)) and created == [1000]


def test_the_capture_service_explains_itself():
    result = subprocess.run([sys.executable, "-m", "agents.cdc.capture", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)

    assert result.returncode == 0 and "CDC_CAPTURE=off" in result.stdout, result.stderr
    assert "RuntimeWarning" not in result.stderr, result.stderr


def slot_confirmed_past(dsn: str, slot: str, lsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s", (lsn, slot)).fetchone()
    return bool(row and row[0])


def test_writes_to_tables_not_captured_do_not_hold_the_slot_back(kafka_broker, start_workers, scenario):
    """With nothing of its own to publish, the capture confirms the server's keepalive position:
    the slot does not keep the WAL of other tables' writes."""
    seed_items(scenario, 10, seed=21)
    [worker] = start_workers(kafka_broker, **scenario.env(tables=[f"{scenario.schema}.items"]))
    wait_for(lambda: applied_changes(worker, f"{scenario.schema}.items") >= 10, timeout=60, message="the snapshot applied")
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {scenario.schema}.quiet (id int PRIMARY KEY)")
        for i in range(200):
            conn.execute(f"INSERT INTO {scenario.schema}.quiet VALUES (%s)", (i,))
        end = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
    wait_for(lambda: slot_confirmed_past(scenario.source_dsn, scenario.slot, end), timeout=60, interval=0.2,
             message=f"slot confirmed past {end}")
