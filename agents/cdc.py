"""Change data capture: PostgreSQL's transaction log -> Debezium-format topics -> replica, Redis, Elasticsearch.

CDC_SOURCE_DSN --(capture: one per cluster, PostgreSQL advisory lock)--> <CDC_TOPIC_PREFIX>.<schema>.<table>
<CDC_TOPIC_PREFIX>.<schema>.<table> -> apply_changes -> REPLICA_DSN, REDIS_URL, ELASTICSEARCH_URL (LSN-guarded)
                                                    -> cdc_rows (row image per key), cdc_table_stats
                                                    -> <topic>.dlq (what no sink may apply, what a sink refused)
Pages: /cdc/status/, /cdc/rows/{schema}.{table}/{pk}/

The apply side runs on app/runtime.py: ``decode_change`` refuses (dead-letters) every record no
sink may apply, so a batch holds only changes every sink can write; each sink's write runs under the
one retry policy, and so does the batch body. docs/cdc.md states the guarantees.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import orjson
import psycopg
import redis.asyncio as aioredis
import redis.exceptions
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from elastic_transport import SerializationError as EsSerializationError
from elasticsearch import ApiError as EsApiError
from elasticsearch import AsyncElasticsearch
from faust import web
from faust.exceptions import SameNode
from faust.types import EventT, StreamT
from psycopg import sql

from app import app, settings
from app.aggregation import enter_partition
from app.dead_letters import dead_letter
from app.prometheus import gauge
from app.runtime import decoded_batches, require_encodable, retrying, until_applied
from app.settings import bootstrap_servers
from app.topics import raw_topic
from models.cdc import (
    UNAVAILABLE,
    Begin,
    Change,
    ColumnDef,
    Commit,
    Delete,
    Insert,
    InvalidChange,
    Relation,
    TupleValue,
    Unchanged,
    Update,
    base_type,
    change_envelope,
    decode_message,
    fill_unavailable,
    int_to_lsn,
    key_json,
    latest_per_row,
    lsn_to_int,
    parse_change,
    python_value,
    wire_value,
)
from tables.cdc import cdc_rows, cdc_table_stats

log = logging.getLogger(__name__)

APPLY_BATCH_MAX = 2000
APPLY_BATCH_WITHIN = 0.1  # seconds a change waits for its batch
SNAPSHOT_CHUNK = 1000
LOCK_RETRY = 1.0  # seconds between attempts to become the capturing worker
BACKOFF_MAX = 5.0
PARTITIONER = DefaultPartitioner()  # Kafka's murmur2 of the key, as every client and Debezium use


def cdc_topic_name(table_name: str) -> str:
    """``public.items`` -> ``cdc.public.items`` (Debezium's ``<topic.prefix>.<schema>.<table>``)."""
    return f"{settings.cdc_topic_prefix}.{table_name}"


CDC_TOPICS = [cdc_topic_name(name) for name in settings.cdc_table_names]
change_topics = raw_topic(*CDC_TOPICS, partitions=settings.topic_partitions) if CDC_TOPICS else None
# One record per slot: the slot's initial snapshot is complete (see Capture.ensure_slot).
capture_state_topic = raw_topic(f"{settings.cdc_topic_prefix}.capture-state", partitions=1)


def quoted(table_name: str) -> sql.Composed:
    schema, _, table = table_name.partition(".")
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))


# --- capture -------------------------------------------------------------------------------------


@dataclass
class TableInfo:
    """What capture needs of a source table: column types for the values, the primary key for the key."""

    schema: str
    table: str
    columns: List[ColumnDef]
    type_oids: List[int]
    primary_key: List[str]

    @property
    def name(self) -> str:
        return f"{self.schema}.{self.table}"


TABLE_INFO_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid::int,
       array_position(i.indkey::int2[], a.attnum)
FROM pg_attribute a LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""


async def read_table_info(conn: psycopg.AsyncConnection, table_name: str) -> TableInfo:
    """Columns, types and primary key of a source table from its catalog."""
    rows = await (await conn.execute(TABLE_INFO_SQL, (quoted(table_name).as_string(conn),))).fetchall()
    if not rows:
        raise LookupError(f"source table {table_name} not found")
    key = [name for name, _, _, position in sorted((r for r in rows if r[3] is not None), key=lambda r: r[3])]
    if not key:
        raise LookupError(f"source table {table_name} has no primary key: its changes cannot be keyed")
    schema, _, table = table_name.partition(".")
    columns = [ColumnDef(name, sql_type, position is not None) for name, sql_type, _, position in rows]
    return TableInfo(schema, table, columns, [oid for _, _, oid, _ in rows], key)


@dataclass
class PendingTransaction:
    begin: Begin
    records: List[Tuple[str, bytes, Optional[bytes]]] = field(default_factory=list)


class Capture:
    """Reads the slot and publishes Debezium envelopes; exactly one runs per source and slot.

    Every worker runs this, but only the one holding a session-level PostgreSQL advisory lock on
    the source captures: the database, not Faust's leader election, decides, so two workers never
    capture at once even while a rebalance is under way, and when the holder dies its connection
    closes, the lock is released and another worker takes over within LOCK_RETRY seconds.
    """

    def __init__(self, dsn: str, tables: Sequence[str]) -> None:
        self.dsn, self.tables = dsn, list(tables)
        self.relations: Dict[int, TableInfo] = {}
        self.producer: Optional[AIOKafkaProducer] = None
        self.capturing = False
        self.confirmed_lsn: Optional[int] = None
        self.published = 0
        self.db = dsn.rsplit("/", 1)[-1].split("?")[0] or "postgres"

    async def run_forever(self) -> None:
        """Capture until cancelled; a lost source or broker is retried under the one retry policy."""
        async for attempt in retrying("CDC capture", max_backoff=BACKOFF_MAX, initial=0.2):
            with attempt:
                await self.session()

    async def session(self) -> None:
        """One connection to the source: wait for the lock, then snapshot (once) and stream."""
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            while not await self.try_lock(conn):
                await asyncio.sleep(LOCK_RETRY)
            self.capturing = True
            try:
                await self.start_producer()
                await self.ensure_publication(conn)
                await self.ensure_slot(conn)
                await self.stream(conn)
            finally:
                self.capturing = False
                await self.stop_producer()

    async def try_lock(self, conn: psycopg.AsyncConnection) -> bool:
        row = await (await conn.execute("SELECT pg_try_advisory_lock(hashtext('streamspine-cdc:' || %s))", (settings.cdc_slot,))).fetchone()
        assert row is not None  # a SELECT without FROM returns one row
        return bool(row[0])

    async def start_producer(self) -> None:
        if change_topics is not None:
            await change_topics.maybe_declare()
        await capture_state_topic.maybe_declare()
        self.producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers(settings.kafka_broker),
            acks="all",
            linger_ms=5,
            max_batch_size=settings.cdc_producer_batch_size,
        )
        await self.producer.start()

    @property
    def session_producer(self) -> AIOKafkaProducer:
        """The producer of the capture session under way (started before anything is published)."""
        assert self.producer is not None, "no capture session is under way"
        return self.producer

    async def stop_producer(self) -> None:
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None

    async def ensure_publication(self, conn: psycopg.AsyncConnection) -> None:
        """The publication of CDC_TABLES (created, or set to exactly those tables)."""
        tables = sql.SQL(", ").join(quoted(name) for name in self.tables)
        exists = await (await conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (settings.cdc_publication,))).fetchone()
        verb = "ALTER PUBLICATION {} SET TABLE {}" if exists else "CREATE PUBLICATION {} FOR TABLE {}"
        await conn.execute(sql.SQL(verb).format(sql.Identifier(settings.cdc_publication), tables))
        for name in self.tables:
            await read_table_info(conn, name)  # refuse a table without primary key loudly, at start

    async def ensure_slot(self, conn: psycopg.AsyncConnection) -> None:
        """Create the slot and publish its snapshot, unless a slot with a complete snapshot exists.

        A slot without the snapshot-complete record (a capture that died mid-snapshot) is dropped
        and the snapshot taken again: the exported snapshot lives only as long as its connection.
        """
        slot = await (
            await conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (settings.cdc_slot,))
        ).fetchone()
        if slot is not None and await self.snapshot_completed():
            self.confirmed_lsn = lsn_to_int(slot[0]) if slot[0] else None
            log.info("CDC capturing from slot %s at %s", settings.cdc_slot, slot[0])
            return
        if slot is not None:
            log.warning("CDC slot %s has no completed snapshot: dropping it and snapshotting again", settings.cdc_slot)
            await conn.execute("SELECT pg_drop_replication_slot(%s)", (settings.cdc_slot,))
        await self.snapshot()

    async def snapshot(self) -> None:
        """Create the slot with an exported snapshot and publish every row of it as ``op: "r"``."""
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, replication="database") as replication:
            created = await (
                await replication.execute(
                    sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')").format(sql.Identifier(settings.cdc_slot))
                )
            ).fetchone()
            assert created is not None  # CREATE_REPLICATION_SLOT answers one row (or raises)
            consistent_lsn, snapshot_name = lsn_to_int(created[1]), created[2]
            log.info("CDC slot %s created at %s; snapshotting %s", settings.cdc_slot, created[1], ", ".join(self.tables))
            async with await psycopg.AsyncConnection.connect(self.dsn) as reader:
                await reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                await reader.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name)))
                for name in self.tables:
                    await self.snapshot_table(reader, await read_table_info(reader, name), consistent_lsn)
                await reader.execute("COMMIT")
        await self.mark_snapshot_completed(consistent_lsn)
        self.confirmed_lsn = consistent_lsn

    async def snapshot_table(self, reader: psycopg.AsyncConnection, info: TableInfo, lsn: int) -> None:
        columns = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c.name)) for c in info.columns)
        now_ms = int(time.time() * 1000)
        async with reader.cursor(name=f"cdc_snapshot_{info.table}") as cursor:
            await cursor.execute(sql.SQL("SELECT {} FROM {}").format(columns, quoted(info.name)))
            while rows := await cursor.fetchmany(SNAPSHOT_CHUNK):
                records = []
                for row in rows:
                    after = self.row_image(info, row)
                    envelope = change_envelope(
                        op="r",
                        before=None,
                        after=after,
                        lsn=lsn,
                        tx_id=None,
                        ts_ms=now_ms,
                        schema=info.schema,
                        table=info.table,
                        db=self.db,
                        snapshot=True,
                        now_ms=now_ms,
                        columns=info.columns,
                    )
                    records.append(self.record(info, after, envelope))
                await self.publish(records)
        log.info("CDC snapshot of %s published", info.name)

    async def snapshot_completed(self) -> bool:
        """Whether capture-state records a completed snapshot of CDC_SLOT."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers(settings.kafka_broker),
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=settings.consumer_fetch_wait_ms,
        )
        await consumer.start()
        try:
            partition = TopicPartition(capture_state_topic.get_topic_name(), 0)
            consumer.assign([partition])
            await consumer.seek_to_beginning(partition)
            end = (await consumer.end_offsets([partition]))[partition]
            completed = False
            while end and (await consumer.position(partition)) < end:
                for records in (await consumer.getmany(partition, timeout_ms=1000)).values():
                    for record in records:
                        if record.key == settings.cdc_slot.encode():
                            completed = bool(record.value and json.loads(record.value).get("snapshot_completed"))
            return completed
        finally:
            await consumer.stop()

    async def mark_snapshot_completed(self, lsn: int) -> None:
        value = json.dumps({"slot": settings.cdc_slot, "snapshot_completed": True, "lsn": lsn, "at": time.time()})
        await (await self.session_producer.send(capture_state_topic.get_topic_name(), value.encode(), key=settings.cdc_slot.encode()))

    async def stream(self, conn: psycopg.AsyncConnection) -> None:
        """Poll the slot; publish whole transactions; advance the slot once Kafka acknowledged them."""
        peek = sql.SQL(
            "SELECT data FROM pg_logical_slot_peek_binary_changes({}, NULL, {}, 'proto_version', '1', 'publication_names', {})"
        ).format(sql.Literal(settings.cdc_slot), sql.Literal(settings.cdc_max_changes), sql.Literal(settings.cdc_publication))
        while True:
            rows = await (await conn.execute(peek)).fetchall()
            end_lsn = await self.publish_messages(conn, [bytes(row[0]) for row in rows])
            if end_lsn is not None:
                await conn.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", (settings.cdc_slot, int_to_lsn(end_lsn)))
                self.confirmed_lsn = end_lsn
            if len(rows) < settings.cdc_max_changes:
                await asyncio.sleep(settings.cdc_poll_interval)

    async def publish_messages(self, conn: psycopg.AsyncConnection, messages: Iterable[bytes]) -> Optional[int]:
        """Publish the complete transactions among ``messages``; the end LSN of the last one."""
        transaction: Optional[PendingTransaction] = None
        records, end_lsn = [], None
        for data in messages:
            message = decode_message(data)
            if isinstance(message, Begin):
                transaction = PendingTransaction(message)
            elif isinstance(message, Relation):
                await self.learn_relation(conn, message)
            elif isinstance(message, (Insert, Update, Delete)) and transaction is not None:
                for info, row, envelope in self.envelopes(message, transaction.begin):
                    transaction.records.append(self.record(info, row, envelope))
                    if envelope["op"] == "d":
                        transaction.records.append(self.record(info, row, None))  # tombstone: compaction drops the key
            elif isinstance(message, Commit) and transaction is not None:
                records.extend(transaction.records)
                end_lsn, transaction = message.end_lsn, None
        await self.publish(records)
        return end_lsn

    async def learn_relation(self, conn: psycopg.AsyncConnection, relation: Relation) -> None:
        """Read the table's catalog when its Relation message is new or its columns changed."""
        known = self.relations.get(relation.oid)
        names = [column.name for column in relation.columns]
        if known is None or [c.name for c in known.columns] != names or known.type_oids != [c.type_oid for c in relation.columns]:
            info = await read_table_info(conn, f"{relation.schema}.{relation.name}")
            info.type_oids = [column.type_oid for column in relation.columns]
            info.columns = [c for c in info.columns if c.name in names]
            self.relations[relation.oid] = info

    def row_image(self, info: TableInfo, values: Sequence[TupleValue], fallback: Optional[Sequence[TupleValue]] = None) -> Dict[str, Any]:
        """Column name -> Debezium JSON value; an unchanged TOAST value is taken from ``fallback``."""
        row = {}
        for index, (column, oid, value) in enumerate(zip(info.columns, info.type_oids, values, strict=False)):
            if isinstance(value, Unchanged) and fallback is not None and isinstance(fallback[index], str):
                value = fallback[index]
            row[column.name] = wire_value(oid, value)
        return row

    def envelopes(self, message: Any, begin: Begin) -> List[Tuple[TableInfo, Dict[str, Any], Dict[str, Any]]]:
        """The Debezium events of one Insert/Update/Delete (a key change is a delete and a create)."""
        info = self.relations[message.relation_oid]
        now_ms = int(time.time() * 1000)

        def event(op: str, before: Optional[Dict[str, Any]], after: Optional[Dict[str, Any]]):
            row = after if after is not None else before
            return (
                info,
                row,
                change_envelope(
                    op=op,
                    before=before,
                    after=after,
                    lsn=begin.final_lsn,
                    tx_id=begin.xid,
                    ts_ms=begin.commit_ts_ms,
                    schema=info.schema,
                    table=info.table,
                    db=self.db,
                    snapshot=False,
                    now_ms=now_ms,
                    columns=info.columns,
                ),
            )

        if isinstance(message, Insert):
            return [event("c", None, self.row_image(info, message.new))]
        if isinstance(message, Delete):
            return [event("d", self.row_image(info, message.old), None)]
        after = self.row_image(info, message.new, message.old)
        before = self.row_image(info, message.old) if message.old is not None else None
        if before is not None and self.key_of(info, before) != self.key_of(info, after):
            return [event("d", before, None), event("c", None, after)]
        return [event("u", before, after)]

    @staticmethod
    def key_of(info: TableInfo, row: Dict[str, Any]) -> Dict[str, Any]:
        return {name: row[name] for name in info.primary_key}

    def record(self, info: TableInfo, row: Dict[str, Any], envelope: Optional[Dict[str, Any]]) -> Tuple[str, bytes, Optional[bytes]]:
        """(topic, key, value) of one change event, or of a tombstone when ``envelope`` is None."""
        value = None if envelope is None else json.dumps(envelope, separators=(",", ":")).encode()
        return cdc_topic_name(info.name), key_json(self.key_of(info, row)), value

    async def publish(self, records: List[Tuple[str, bytes, Optional[bytes]]]) -> None:
        """Send records in order per partition, the partitions side by side; return once Kafka
        acknowledged every one (raises if any failed).

        aiokafka holds one open batch per partition and a send waits until that batch is drained:
        with small batches (PRODUCER_MAX_BATCH_SIZE=1 for the local broker) one sequential loop
        waited a round trip per record (130 records/s measured); one lane per partition overlaps them.
        """
        lanes: Dict[Tuple[str, int], List[Tuple[bytes, Optional[bytes]]]] = {}
        partitions: Dict[str, List[int]] = {}
        for topic, key, value in records:
            if topic not in partitions:
                partitions[topic] = sorted(await self.session_producer.partitions_for(topic))
            lanes.setdefault((topic, PARTITIONER(key, partitions[topic], partitions[topic])), []).append((key, value))
        acks = await asyncio.gather(*(self.send_lane(topic, partition, lane) for (topic, partition), lane in lanes.items()))
        await asyncio.gather(*(ack for lane_acks in acks for ack in lane_acks))
        self.published += len(records)

    async def send_lane(self, topic: str, partition: int, lane: List[Tuple[bytes, Optional[bytes]]]) -> List[asyncio.Future]:
        producer = self.session_producer
        return [await producer.send(topic, value, key=key, partition=partition) for key, value in lane]


capture = Capture(settings.cdc_source_dsn, settings.cdc_table_names) if settings.cdc_source_dsn and CDC_TOPICS else None

if capture is not None:

    @app.task
    async def capture_changes() -> None:
        """Every worker competes for the capture lock; the holder captures."""
        assert capture is not None  # this task exists only with a capture
        await capture.run_forever()


# --- sinks ---------------------------------------------------------------------------------------
#
# Every sink has ``apply(changes) -> Rejected``: what it refused because of the data comes back,
# with the reason, to be dead-lettered; anything it raises is retried (the one retry policy), so a
# sink must raise only for what may pass later (an outage, an overload), never for a value. And
# ``refusal(change)``: checked when the record is decoded, why the sink could not take the change
# at all (None: it can), so a batch holds only changes every sink can write.

Rejected = List[Tuple[Change, str]]


class TransientSinkError(Exception):
    """The sink could not take the batch now (connection, overload): the batch is retried."""


# What the replica refuses because of the data (not the connection): the change is dead-lettered.
REPLICA_REFUSALS = (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError, psycopg.NotSupportedError)
# SQLSTATE class 54, program limit exceeded, is an OperationalError in psycopg but a value's fault:
# JSON nested past the server's stack depth (54001), an index row over 8 kB (54000), too many columns.
REPLICA_LIMITS_CLASS = "54"


def replica_refuses(error: BaseException) -> bool:
    """Whether the replica refused a change for its data (a dead letter), not for now (a retry)."""
    if isinstance(error, REPLICA_REFUSALS):
        return True
    if isinstance(error, psycopg.Error):
        return (error.sqlstate or "").startswith(REPLICA_LIMITS_CLASS)
    return isinstance(error, UnicodeError)  # a parameter psycopg cannot encode


class ReplicaSink:
    """A PostgreSQL replica: tables created from the source columns if absent, upsert/delete by
    primary key. The guard is the side table ``_cdc_versions`` (table, row id, LSN): a change is
    applied only in the statement that raised its row's LSN, so an older change never wins."""

    name = "replica"
    GUARD = """
        INSERT INTO public._cdc_versions (table_name, row_id, lsn) VALUES (%s, %s, %s)
        ON CONFLICT (table_name, row_id) DO UPDATE SET lsn = EXCLUDED.lsn WHERE _cdc_versions.lsn <= EXCLUDED.lsn
        RETURNING 1"""  # the row's LSN moved: this change is the newest seen
    # Every worker creates what the replica lacks. PostgreSQL's IF NOT EXISTS does not make two
    # sessions' concurrent CREATEs safe (one fails on pg_type's unique index), so the replica's DDL
    # runs one session at a time, under this transaction-level advisory lock.
    DDL_LOCK = "SELECT pg_advisory_xact_lock(hashtext('streamspine-cdc-replica-ddl'))"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: Optional[psycopg.AsyncConnection] = None
        self.tables: Dict[str, Tuple[Dict[str, str], List[str]]] = {}  # name -> (column types, primary key)
        self.statements: Dict[Tuple[str, bool, Tuple[str, ...]], sql.Composed] = {}

    def refusal(self, change: Change) -> Optional[str]:
        """Why the replica's columns cannot take the change's values, or None. The types are the
        replica table's once this sink has read it, else the event's ``source.columns`` (none for
        a Debezium event: then the write finds out)."""
        if "\x00" in change.row_id:
            return "a primary key value holds NUL, which PostgreSQL text cannot"
        types = self.column_types(change)
        values = change.key if change.is_delete else change.after_image
        try:
            for name, value in values.items():
                if name in types and value != UNAVAILABLE:  # filled from the previous (checked) image later
                    replica_value(value, types[name])
        except InvalidChange as error:
            return str(error)
        return None

    def column_types(self, change: Change) -> Dict[str, str]:
        if change.table_name in self.tables:
            return self.tables[change.table_name][0]
        return {column.name: column.sql_type for column in change.columns or []}

    async def connection(self) -> psycopg.AsyncConnection:
        if self.conn is None or self.conn.closed:
            conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
            try:
                await self.run_ddl(
                    conn,
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS public._cdc_versions (table_name text, row_id text, lsn bigint NOT NULL,"
                        " PRIMARY KEY (table_name, row_id))"
                    ),
                )
            except BaseException:
                await conn.close()  # the next attempt connects and creates the guard table again
                raise
            self.conn = conn
            self.tables.clear()
            self.statements.clear()
        return self.conn

    async def apply(self, changes: List[Change]) -> Rejected:
        try:
            conn = await self.connection()
            rejected = [(change, reason) for change in changes if (reason := await self.check_table(conn, change))]
            refused = {id(change) for change, _ in rejected}
            ready, invalid = self.with_parameters([change for change in changes if id(change) not in refused])
            try:
                async with conn.transaction():
                    for statement, params in self.grouped_statements(ready):
                        async with conn.cursor() as cursor:
                            await cursor.executemany(statement, params)  # pipelined by psycopg
                return rejected + invalid
            except Exception as error:
                if not replica_refuses(error):
                    raise
                return rejected + invalid + await self.apply_each(conn, ready)  # find the change the replica refuses
        except (psycopg.OperationalError, psycopg.InterfaceError) as error:
            await self.close()
            raise TransientSinkError(f"replica: {error}") from error

    async def apply_each(self, conn: psycopg.AsyncConnection, changes: List[Tuple[Change, List[Any]]]) -> Rejected:
        rejected = []
        for change, params in changes:
            try:
                async with conn.transaction():
                    await conn.execute(self.statement(change), params)
            except Exception as error:
                if not replica_refuses(error):
                    raise
                rejected.append((change, f"replica refused it: {error}".strip()))
        return rejected

    def with_parameters(self, changes: List[Change]) -> Tuple[List[Tuple[Change, List[Any]]], Rejected]:
        """Each change with its statement parameters; a value that is not of its column's type is refused."""
        ready, invalid = [], []
        for change in changes:
            try:
                ready.append((change, self.parameters(change)))
            except InvalidChange as error:
                invalid.append((change, str(error)))
        return ready, invalid

    async def check_table(self, conn: psycopg.AsyncConnection, change: Change) -> Optional[str]:
        """None when the replica table exists (creating it if possible), else the reason."""
        if change.table_name not in self.tables:
            if not await self.load_table(conn, change.table_name):
                if not change.columns:
                    return f"replica has no table {change.table_name} and the event carries no column definitions"
                try:
                    await self.create_table(conn, change)
                except Exception as error:  # e.g. a column type the replica does not know
                    if not replica_refuses(error):
                        raise
                    if not await self.load_table(conn, change.table_name):  # unless created by another client meanwhile
                        return f"replica could not create {change.table_name}: {error}".strip()
                else:
                    await self.load_table(conn, change.table_name)
        types, key = self.tables[change.table_name]
        row = change.after or change.before or {}
        unknown = [name for name in list(row) + list(change.key) if name not in types]
        if unknown:
            return f"replica table {change.table_name} has no columns {sorted(set(unknown))}"
        if sorted(key) != sorted(change.key):
            return f"record key {sorted(change.key)} is not the replica's primary key {key}"
        return None

    async def load_table(self, conn: psycopg.AsyncConnection, table_name: str) -> bool:
        exists = await (await conn.execute("SELECT to_regclass(%s)", (quoted(table_name).as_string(conn),))).fetchone()
        assert exists is not None  # a SELECT without FROM returns one row
        if exists[0] is None:
            return False
        rows = await (await conn.execute(TABLE_INFO_SQL, (quoted(table_name).as_string(conn),))).fetchall()
        key = [name for name, _, _, position in sorted((r for r in rows if r[3] is not None), key=lambda r: r[3])]
        self.tables[table_name] = ({name: sql_type for name, sql_type, _, _ in rows}, key)
        return True

    async def create_table(self, conn: psycopg.AsyncConnection, change: Change) -> None:
        # sql_type goes in as SQL: parse_change let through only type names (models.cdc.SQL_TYPE)
        assert change.columns is not None  # check_table creates a table only from the event's columns
        columns = [sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.sql_type)) for c in change.columns]
        key = sql.SQL(", ").join(sql.Identifier(name) for name in change.key)
        await self.run_ddl(
            conn,
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(change.schema)),
            sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))").format(
                quoted(change.table_name), sql.SQL(", ").join(columns), key
            ),
        )
        log.info("replica: created %s from the source columns", change.table_name)

    async def run_ddl(self, conn: psycopg.AsyncConnection, *statements: Union[sql.SQL, sql.Composed]) -> None:
        """``statements`` in one transaction, under DDL_LOCK (one session at a time)."""
        async with conn.transaction():
            await conn.execute(self.DDL_LOCK)
            for statement in statements:
                await conn.execute(statement)

    def grouped_statements(self, changes: List[Tuple[Change, List[Any]]]) -> List[Tuple[sql.Composed, List[List[Any]]]]:
        """The guarded statements of a batch, grouped (each row at most once: order does not matter)."""
        groups: Dict[Tuple[str, bool, Tuple[str, ...]], Tuple[sql.Composed, List[List[Any]]]] = {}
        for change, params in changes:
            groups.setdefault(self.statement_key(change), (self.statement(change), []))[1].append(params)
        return list(groups.values())

    def parameters(self, change: Change) -> List[Any]:
        types, key = self.tables[change.table_name]
        guard = [change.table_name, change.row_id, change.lsn]
        if change.is_delete:
            return guard + [replica_value(change.key[name], types[name]) for name in key]
        return guard + [replica_value(value, types[name]) for name, value in change.after_image.items()]

    def statement(self, change: Change) -> sql.Composed:
        """The guarded upsert or delete of a table and column set (cached: built once)."""
        cache_key = self.statement_key(change)
        if cache_key not in self.statements:
            self.statements[cache_key] = self.build_statement(*cache_key)
        return self.statements[cache_key]

    @staticmethod
    def statement_key(change: Change) -> Tuple[str, bool, Tuple[str, ...]]:
        return change.table_name, change.is_delete, () if change.is_delete else tuple(change.after_image)

    def build_statement(self, table_name: str, is_delete: bool, names: Tuple[str, ...]) -> sql.Composed:
        types, key = self.tables[table_name]
        guard = sql.SQL("WITH guard AS ({}) ").format(sql.SQL(self.GUARD))
        typed = lambda name: sql.SQL("%s::{}").format(sql.SQL(types[name]))  # noqa: E731
        if is_delete:
            where = sql.SQL(" AND ").join(sql.SQL("{} = {}").format(sql.Identifier(name), typed(name)) for name in key)
            return guard + sql.SQL("DELETE FROM {} WHERE {} AND EXISTS (SELECT 1 FROM guard)").format(quoted(table_name), where)
        updates = [name for name in names if name not in key]
        on_conflict = (
            sql.SQL("DO UPDATE SET {}").format(
                sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(name)) for name in updates)
            )
            if updates
            else sql.SQL("DO NOTHING")
        )
        return guard + sql.SQL("INSERT INTO {} ({}) SELECT {} FROM guard ON CONFLICT ({}) {}").format(
            quoted(table_name),
            sql.SQL(", ").join(map(sql.Identifier, names)),
            sql.SQL(", ").join(map(typed, names)),
            sql.SQL(", ").join(map(sql.Identifier, key)),
            on_conflict,
        )

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
            self.conn = None


def replica_value(value: Any, sql_type: str) -> Any:
    """A Debezium JSON value -> a query parameter for a column of ``sql_type`` (cast in the SQL);
    raises InvalidChange for a value the column cannot take."""
    parameter: Any
    if base_type(sql_type) in ("json", "jsonb"):
        if sql_type.endswith("[]"):
            if value is not None and not isinstance(value, list):
                raise InvalidChange(f"array column of type {sql_type} holds a {type(value).__name__}")
            parameter = None if value is None else [item if isinstance(item, str) or item is None else json.dumps(item) for item in value]
        else:
            parameter = value if isinstance(value, str) or value is None else json.dumps(value)
    else:
        parameter = python_value(value, sql_type)
    if holds_nul(parameter):
        raise InvalidChange(f"a {sql_type} value holds NUL, which PostgreSQL text cannot")
    return parameter


def holds_nul(parameter: Any) -> bool:
    if isinstance(parameter, str):
        return "\x00" in parameter
    return isinstance(parameter, list) and any(holds_nul(item) for item in parameter)


REDIS_GUARDED_WRITE = """
local current = redis.call('GET', KEYS[2])
if current and current > ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1])
if ARGV[2] == 'upsert' and #ARGV > 2 then redis.call('HSET', KEYS[1], unpack(ARGV, 3)) end
return 1
"""
# Error replies that say "not now" (memory, loading, failover), not "not this value": retried.
REDIS_TRANSIENT_REPLIES = ("OOM", "BUSY", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS", "MISCONF")


def redis_write(change: Change) -> Tuple[List[bytes], List[bytes]]:
    """The keys and arguments of a change's guarded write (each field the column's JSON value)."""
    row_key = f"{change.table_name}:{change.row_id}"
    try:
        keys = [row_key.encode(), f"_cdc_lsn:{row_key}".encode()]
        fields = (
            []
            if change.is_delete
            else [part for name, value in change.after_image.items() for part in (name.encode(), orjson.dumps(value))]
        )
    except (UnicodeEncodeError, TypeError, orjson.JSONEncodeError) as error:
        raise InvalidChange(f"not writable to Redis: {error}") from None
    return keys, [f"{change.lsn:020d}".encode(), b"delete" if change.is_delete else b"upsert", *fields]


class RedisSink:
    """A hash per row at ``<schema>.<table>:<pk>``, each field the column's JSON value. The guard is
    ``_cdc_lsn:<schema>.<table>:<pk>`` (kept after a delete), compared and set by one Lua script."""

    name = "redis"

    def __init__(self, url: str) -> None:
        self.client = aioredis.Redis.from_url(url)
        self.script = self.client.register_script(REDIS_GUARDED_WRITE)

    @staticmethod
    def refusal(change: Change) -> Optional[str]:
        """None: what ``redis_write`` needs (names that are UTF-8, key and values orjson can
        write) every decoded change has (models.cdc.parse_change, ``change_of_record``)."""
        return None

    async def apply(self, changes: List[Change]) -> Rejected:
        rejected: Rejected = []
        written: List[Change] = []
        try:
            pipeline = self.client.pipeline(transaction=False)
            for change in changes:
                try:
                    keys, args = redis_write(change)
                except InvalidChange as error:
                    rejected.append((change, str(error)))
                    continue
                await self.script(keys=keys, args=args, client=pipeline)
                written.append(change)
            results = await pipeline.execute(raise_on_error=False) if written else []
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
            raise TransientSinkError(f"redis: {error}") from error
        for change, result in zip(written, results, strict=True):
            if isinstance(result, Exception):
                if str(result).startswith(REDIS_TRANSIENT_REPLIES):
                    raise TransientSinkError(f"redis: {result}")
                rejected.append((change, f"redis refused it: {result}"))
        return rejected

    async def close(self) -> None:
        await self.client.aclose()


class ElasticsearchSink:
    """An index per table (``<schema>.<table>``, lower case), ``_id`` the row id, the document the
    after-image; external versioning with the LSN (``external_gte``: the changes of one transaction
    share its commit LSN), so Elasticsearch itself refuses an older change."""

    name = "elasticsearch"
    REFUSED_REQUEST = (400, 413)  # a bulk request refused whole (an _id over 512 bytes, too large): split it

    def __init__(self, url: str) -> None:
        self.client = AsyncElasticsearch(url, request_timeout=30)

    @staticmethod
    def refusal(change: Change) -> Optional[str]:
        """None: what the index needs (JSON it can encode) every applied change has; what it
        refuses per document (a mapping conflict, a bad index name) comes back from the write."""
        return None

    @staticmethod
    def index_of(change: Change) -> str:
        return change.table_name.lower()

    def operations(self, changes: List[Change]) -> List[Dict[str, Any]]:
        operations: List[Dict[str, Any]] = []
        for change in changes:
            meta = {"_index": self.index_of(change), "_id": change.row_id, "version": change.lsn, "version_type": "external_gte"}
            if change.is_delete:
                operations.append({"delete": meta})
            else:
                operations.extend([{"index": meta}, change.after_image])
        return operations

    async def apply(self, changes: List[Change]) -> Rejected:
        if not changes:
            return []
        try:
            response = await self.client.bulk(operations=self.operations(changes))
        except (EsApiError, EsSerializationError) as error:
            if isinstance(error, EsApiError) and error.meta.status not in self.REFUSED_REQUEST:
                raise TransientSinkError(f"elasticsearch: {error}") from error
            if len(changes) == 1:
                return [(changes[0], f"elasticsearch refused it: {error}")]
            return await self.apply_halves(changes)
        except Exception as error:  # connection errors of the transport
            raise TransientSinkError(f"elasticsearch: {error!r}") from error
        return self.rejected(changes, response["items"])

    async def apply_halves(self, changes: List[Change]) -> Rejected:
        """A refused request, split until the changes Elasticsearch refuses stand alone."""
        middle = len(changes) // 2
        return await self.apply(changes[:middle]) + await self.apply(changes[middle:])

    @staticmethod
    def rejected(changes: List[Change], items: List[Dict[str, Any]]) -> Rejected:
        rejected, retry = [], False
        for change, item in zip(changes, items, strict=False):
            result = next(iter(item.values()))
            status = result.get("status", 500)
            if status < 300 or status == 409 or (change.is_delete and status == 404):
                continue  # applied, older than what the index has, or already gone
            if status == 429 or status >= 500:
                retry = True
            else:
                rejected.append((change, f"elasticsearch refused it: {result.get('error')}"))
        if retry:
            raise TransientSinkError("elasticsearch: some documents were rejected for now (429/5xx)")
        return rejected

    async def close(self) -> None:
        await self.client.close()


def configured_sinks() -> List[Any]:
    sinks: List[Any] = []
    if settings.replica_dsn:
        sinks.append(ReplicaSink(settings.replica_dsn))
    if settings.redis_url:
        sinks.append(RedisSink(settings.redis_url))
    if settings.elasticsearch_url:
        sinks.append(ElasticsearchSink(settings.elasticsearch_url))
    return sinks


async def apply_to_sink(sink: Any, changes: List[Change]) -> Rejected:
    """``sink.apply(changes)`` under the one retry policy (app.runtime): what the sink refuses
    because of the data comes back as rejections; anything it raises, expected (TransientSinkError)
    or not, is retried for as long as it lasts (sinks are LSN-guarded: a retried change changes
    nothing twice), never skipped."""
    return await until_applied(sink.apply, changes, what=f"CDC sink {sink.name}", max_backoff=BACKOFF_MAX)


# --- apply ---------------------------------------------------------------------------------------

SINKS = configured_sinks()


def change_of_record(topic: str, key: Optional[bytes], value: Optional[bytes], sinks: Sequence[Any]) -> Optional[Change]:
    """A record of a change topic -> its Change (None for a tombstone). Raises for a record no sink
    may apply: not a change event (models.cdc.parse_change), a change of a table other than the one
    its topic names, or a change some sink could not write or the state table could not store."""
    change = parse_change(key, value)
    if change is None:
        return None
    if cdc_topic_name(change.table_name) != topic:
        raise InvalidChange(f"a change of {change.table_name} on topic {topic}")
    try:  # as cdc_rows stores it (Faust writes tables with orjson), and Redis and Elasticsearch send it
        require_encodable({change.table_name: {"key": change.key, "row": change.after}})
    except ValueError as error:
        raise InvalidChange(f"row or key {error}") from None
    for sink in sinks:
        reason = sink.refusal(change)
        if reason:
            raise InvalidChange(f"{sink.name}: {reason}")
    return change


def decode_change(event: EventT) -> Optional[Change]:
    """The decode step of ``decoded_batches``: whatever it raises dead-letters the record."""
    change = change_of_record(event.message.topic, event.message.key, event.message.value, SINKS)
    if change is not None:
        change.origin = event
    return change


def row_state(stream: StreamT, change: Change) -> Optional[Dict[str, Any]]:
    """This table's entry of the row's state (last applied LSN and image), if any."""
    enter_partition(stream, change.origin)  # Faust reads a RocksDB table in the current event's partition
    return (cdc_rows.get(key_json(change.key)) or {}).get(change.table_name)


def complete_images(stream: StreamT, changes: List[Change]) -> Tuple[List[Change], List[Tuple[Change, str]]]:
    """Fill unchanged-TOAST placeholders from the row's previous image (this batch's or the state table's)."""
    images: Dict[Tuple[str, str], Optional[Dict[str, Any]]] = {}
    complete, invalid = [], []
    for change in changes:
        ident = (change.table_name, change.row_id)
        if change.after is not None and UNAVAILABLE in change.after.values():
            previous = images[ident] if ident in images else (row_state(stream, change) or {}).get("row")
            try:
                change.after = fill_unavailable(change.after, previous)
            except InvalidChange as error:
                invalid.append((change, str(error)))
                continue
        images[ident] = change.after
        complete.append(change)
    return complete, invalid


def record_rows(stream: StreamT, latest: List[Change], rejected_ids: set) -> None:
    """The last applied LSN and image of each row (one write per row per batch), under its event's partition."""
    for change in latest:
        if id(change) in rejected_ids:
            continue
        enter_partition(stream, change.origin)
        key = key_json(change.key)
        current = dict(cdc_rows.get(key) or {})
        previous = current.get(change.table_name)
        if previous is None or previous["lsn"] <= change.lsn:
            current[change.table_name] = {
                "lsn": change.lsn,
                "op": change.op,
                "ts_ms": change.ts_ms,
                "row": change.after,
                "tx_id": change.tx_id,
            }
            cdc_rows[key] = current


def record_counts(stream: StreamT, changes: List[Change], rejected_ids: set, now_ms: int) -> None:
    """Per table and partition: changes by op, the highest LSN applied, the lag of the newest change."""
    stats: Dict[bytes, Tuple[EventT, Dict[str, Any]]] = {}
    for change in changes:
        if id(change) in rejected_ids:
            continue
        event = change.origin
        stats_key = f"{change.table_name}#{event.message.partition}".encode()
        if stats_key not in stats:
            enter_partition(stream, event)  # Faust reads a RocksDB table in the current event's partition
        _, entry = stats.get(stats_key) or (event, dict(cdc_table_stats.get(stats_key) or {}))
        counts = dict(entry.get("counts", {}))
        counts[change.op] = counts.get(change.op, 0) + 1
        entry.update(
            table=change.table_name,
            partition=event.message.partition,
            counts=counts,
            lsn=max(entry.get("lsn", 0), change.lsn),
            sinks=[sink.name for sink in SINKS],
            lag_ms=max(0, now_ms - change.ts_ms),
            applied_at_ms=now_ms,
        )
        stats[stats_key] = (event, entry)
    for stats_key, (event, entry) in stats.items():
        enter_partition(stream, event)
        cdc_table_stats[stats_key] = entry


async def apply_batch(stream: StreamT, changes: List[Change]) -> None:
    """Complete the images, keep the newest change per row, apply it to every sink side by side
    (each under the retry policy), dead-letter what a sink refused, record the rows and counts.
    Run again after a failure, it changes nothing twice (LSN guards), but may repeat a dead letter."""
    changes, incomplete = complete_images(stream, changes)
    refused: Dict[int, Tuple[Change, List[str]]] = {id(c): (c, [reason]) for c, reason in incomplete}
    latest = latest_per_row(changes)
    # The sinks are independent: applied side by side, a batch takes as long as the slowest one.
    for sink, sink_rejected in zip(SINKS, await asyncio.gather(*(apply_to_sink(sink, latest) for sink in SINKS)), strict=True):
        for change, reason in sink_rejected:
            refused.setdefault(id(change), (change, []))[1].append(f"{sink.name}: {reason}")
    for change, reasons in refused.values():
        await dead_letter("; ".join(reasons), change.origin)
    record_rows(stream, latest, set(refused))
    record_counts(stream, changes, set(refused), int(time.time() * 1000))


async def apply_change_stream(stream: StreamT) -> None:
    """The apply agent's loop: decoded batches (refused records dead-lettered), each applied until it is."""
    async for batch in decoded_batches(stream, decode_change, max_=APPLY_BATCH_MAX, within=APPLY_BATCH_WITHIN):
        await until_applied(apply_batch, stream, [entry.value for entry in batch], what="CDC apply", max_backoff=BACKOFF_MAX)


if change_topics is not None:

    @app.agent(change_topics)
    async def apply_changes(stream: StreamT) -> None:
        """Each batch of change events to the replica, Redis and Elasticsearch, then to the state tables."""
        await apply_change_stream(stream)


# --- pages ---------------------------------------------------------------------------------------


def merge_table_stats(entries: Iterable[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per-partition entries -> per table: summed counts, the highest LSN, the latest lag."""
    tables: Dict[str, Dict[str, Any]] = {}
    for entry in entries:
        merged = tables.setdefault(
            entry["table"], {"counts": {}, "lsn": 0, "lag_ms": None, "applied_at_ms": 0, "sinks": entry.get("sinks", [])}
        )
        for op, count in entry.get("counts", {}).items():
            merged["counts"][op] = merged["counts"].get(op, 0) + count
        merged["lsn"] = max(merged["lsn"], entry.get("lsn", 0))
        if entry.get("applied_at_ms", 0) >= merged["applied_at_ms"]:
            merged["applied_at_ms"], merged["lag_ms"] = entry.get("applied_at_ms", 0), entry.get("lag_ms")
    for merged in tables.values():
        merged["last_applied_lsn"] = {sink: int_to_lsn(merged["lsn"]) for sink in merged["sinks"]}
        merged["total"] = sum(merged["counts"].values())
    return tables


def local_stats() -> List[Dict[str, Any]]:
    """This worker's per-partition entries (actives and standbys; merged by key on the status page)."""
    return [dict(entry) for entry in cdc_table_stats.values()]


async def slot_status() -> Optional[Dict[str, Any]]:
    """The slot as the source reports it (None without CDC_SOURCE_DSN)."""
    if not settings.cdc_source_dsn:
        return None
    status: Dict[str, Any] = {
        "slot": settings.cdc_slot,
        "publication": settings.cdc_publication,
        "capturing_worker": None,
        "tables": settings.cdc_table_names,
    }
    try:
        async with await psycopg.AsyncConnection.connect(settings.cdc_source_dsn, autocommit=True, connect_timeout=3) as conn:
            row = await (
                await conn.execute(
                    "SELECT confirmed_flush_lsn::text, active, pg_current_wal_lsn()::text FROM pg_replication_slots WHERE slot_name = %s",
                    (settings.cdc_slot,),
                )
            ).fetchone()
        if row is not None:
            status.update(confirmed_lsn=row[0], active=row[1], source_wal_lsn=row[2])
    except psycopg.Error as error:
        status["error"] = str(error)
    return status


@app.page("/cdc/status/local/")
async def cdc_status_of_this_worker(view: web.View, request: web.Request) -> web.Response:
    """This worker's share of /cdc/status/."""
    return view.json(
        {
            "stats": local_stats(),
            "capturing": bool(capture and capture.capturing),
            "confirmed_lsn": capture.confirmed_lsn if capture and capture.capturing else None,
            "published": capture.published if capture else 0,
        }
    )


@app.page("/cdc/status/")
async def cdc_status(view: web.View, request: web.Request) -> web.Response:
    """Slot, confirmed LSN, last applied LSN per sink and table, lag and counts, from every worker."""
    entries: Dict[Tuple[str, int], Dict[str, Any]] = {}
    capturing: Optional[str] = None
    me = str(app.conf.canonical_url).rstrip("/")
    workers = {str(worker).rstrip("/") for worker in app.router.tables_metadata()} | {me}
    for worker in sorted(workers):
        part: Dict[str, Any]
        if worker == me:
            part = {"stats": local_stats(), "capturing": bool(capture and capture.capturing)}
        else:
            async with app.http_client.get(f"{worker}/cdc/status/local/") as response:
                if response.status != 200:
                    raise view.ServerError(f"worker {worker} answered {response.status}")
                part = await response.json()
        if part["capturing"]:
            capturing = worker
        for entry in part["stats"]:
            key = (entry["table"], entry["partition"])
            if key not in entries or entry.get("applied_at_ms", 0) > entries[key].get("applied_at_ms", 0):
                entries[key] = entry
    slot = await slot_status()
    if slot is not None:
        slot["capturing_worker"] = capturing
    return view.json({"slot": slot, "tables": merge_table_stats(entries.values())})


def key_from_path(pk: str) -> Dict[str, Any]:
    """``id=5`` / ``a=1,b=x`` / ``{"id":5}`` -> the key object; values are JSON where they parse."""
    if pk.startswith("{"):
        key = json.loads(pk)
        if not isinstance(key, dict) or not key:
            raise ValueError("a JSON key must be a non-empty object")
        return key
    key = {}
    for part in pk.split(","):
        name, sep, raw = part.partition("=")
        if not sep or not name:
            raise ValueError("pk must be column=value[,column=value] or a JSON object")
        try:
            key[name] = json.loads(raw)
        except ValueError:
            key[name] = raw
    return key


@app.page("/cdc/rows/{table}/{pk}/")
async def cdc_row(view: web.View, request: web.Request, table: str, pk: str) -> web.Response:
    """The current image of one row from the state table, answered by the worker that owns its key."""
    try:
        key = key_from_path(pk)
    except ValueError as error:
        raise view.ValidationError(str(error)) from None
    key_bytes = key_json(key)
    try:
        return await app.router.route_req(cdc_rows.name, key_bytes, view.web, request)
    except SameNode:
        pass
    state = (cdc_rows.get(key_bytes) or {}).get(table)
    if state is None:
        raise view.NotFound("unknown row", table=table, key=key)
    if state["row"] is None:
        raise view.NotFound("row deleted", table=table, key=key, lsn=int_to_lsn(state["lsn"]))
    return view.json(
        {"table": table, "key": key, "lsn": int_to_lsn(state["lsn"]), "op": state["op"], "ts_ms": state["ts_ms"], "row": state["row"]}
    )


# --- Prometheus ----------------------------------------------------------------------------------


@gauge("streamspine_cdc_lag_seconds", "Source commit to applied, of the latest change applied per table.", ["table"])
def cdc_lag_by_table() -> Dict[Tuple[str, ...], float]:
    return {(table,): stats["lag_ms"] / 1000.0 for table, stats in merge_table_stats(local_stats()).items() if stats["lag_ms"] is not None}


@gauge("streamspine_cdc_capturing", "1 on the worker that holds the capture slot, else 0.")
def cdc_capturing() -> Dict[Tuple[str, ...], float]:
    return {(): 1.0 if capture is not None and capture.capturing else 0.0}
