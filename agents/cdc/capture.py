"""CDC capture: the source PostgreSQL's logical decoding (pgoutput) -> Debezium change events.

CDC_SOURCE_DSN --(one capture per slot: PostgreSQL advisory lock)--> <CDC_TOPIC_PREFIX>.<schema>.<table>

Capture runs in the workers (CDC_CAPTURE=worker, the default: every worker competes for the lock,
the holder captures) or as its own service, ``python -m agents.cdc.capture`` (see ``main``), which
competes for the same lock. docs/cdc.md states the guarantees.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import faust
import orjson
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from faust.types import TopicT
from psycopg import sql

from agents.cdc.wal_stream import Keepalive, WalStream
from app import app, settings
from app.retry import retrying
from app.settings import Settings, bootstrap_servers
from app.topics import raw_topic
from app.transport import by_partition, send_grouped
from models.cdc import (
    Begin,
    ColumnDef,
    Commit,
    Delete,
    Insert,
    Relation,
    TupleValue,
    Unchanged,
    Update,
    change_envelope,
    decode_message,
    key_json,
    lsn_to_int,
    wire_value,
)

log = logging.getLogger(__name__)

SNAPSHOT_CHUNK = 1000
LOCK_RETRY = 1.0  # seconds between attempts to become the capturing worker
BACKOFF_MAX = 5.0
UNCONFIRMED_BATCHES = 16  # batches handed to the producer before the oldest is acknowledged
STATUS_INTERVAL = 10.0  # seconds of a quiet stream between two status updates
REPLICATION_CONNECTION_TIMEOUTS: Dict[str, Any] = {
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


def cdc_topic_name(table_name: str) -> str:
    """``public.items`` -> ``cdc.public.items`` (Debezium's ``<topic.prefix>.<schema>.<table>``)."""
    return f"{settings.cdc_topic_prefix}.{table_name}"


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
    end_lsn: int = 0  # set by its Commit


class Capture:
    """Reads the slot and publishes Debezium envelopes; exactly one runs per source and slot.

    Every worker runs this, but only the one holding a session-level PostgreSQL advisory lock on
    the source captures: the database, not Faust's leader election, decides, so two workers never
    capture at once even while a rebalance is under way, and when the holder dies its connection
    closes, the lock is released and another worker takes over within LOCK_RETRY seconds.
    """

    def __init__(self, dsn: str, tables: Sequence[str], change_topics: Optional[TopicT]) -> None:
        self.dsn, self.tables, self.change_topics = dsn, list(tables), change_topics
        self.relations: Dict[int, TableInfo] = {}
        self.producer: Optional[AIOKafkaProducer] = None
        self.capturing = False
        self.confirmed_lsn: Optional[int] = None
        self.published = 0
        self.in_flight = 0  # batches handed to the producer and not yet confirmed to the slot
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
        if self.change_topics is not None:
            await self.change_topics.maybe_declare()
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
        """Stream the slot (agents/cdc/wal_stream.py); publish whole transactions; confirm them to
        the slot in order, each once Kafka acknowledged every record up to it."""
        # TCP keepalives and a send timeout: a source that vanished without closing the connection
        # ends the session within about a minute, even while its tables are quiet.
        replication = await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, replication="database", **REPLICATION_CONNECTION_TIMEOUTS
        )
        try:
            wal = WalStream(replication)
            await wal.start(settings.cdc_slot, settings.cdc_publication)
            self.in_flight = 0
            unconfirmed: asyncio.Queue[Tuple[int, asyncio.Future]] = asyncio.Queue(maxsize=UNCONFIRMED_BATCHES)
            tasks = [
                asyncio.ensure_future(self.read_and_publish(conn, wal, unconfirmed)),
                asyncio.ensure_future(self.confirm_in_order(wal, unconfirmed)),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()  # raises: the session ends and is retried
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await replication.close()  # not the context manager's ROLLBACK, which a stream refuses

    async def read_and_publish(self, conn: psycopg.AsyncConnection, wal: WalStream, unconfirmed: asyncio.Queue) -> None:
        """Hand each batch of complete transactions to the producer and queue its deliveries."""
        transaction: Optional[PendingTransaction] = None
        while True:
            records: List[Tuple[str, bytes, Optional[bytes]]] = []
            end_lsn: Optional[int] = None
            messages = await wal.read_batch(settings.cdc_max_changes, timeout=STATUS_INTERVAL)
            if not messages and self.confirmed_lsn is not None:
                await wal.confirm(self.confirmed_lsn)  # a status update now and then, as pg_recvlogical sends
            for message in messages:
                if isinstance(message, Keepalive):
                    await self.on_keepalive(wal, message, idle=transaction is None and not records and self.in_flight == 0)
                    continue
                transaction, completed = await self.assemble(conn, transaction, decode_message(message))
                if completed is not None:
                    records.extend(completed.records)
                    end_lsn = completed.end_lsn
            if end_lsn is not None:
                self.in_flight += 1
                await unconfirmed.put((end_lsn, await self.send(records)))

    async def assemble(
        self, conn: psycopg.AsyncConnection, transaction: Optional[PendingTransaction], message: Any
    ) -> Tuple[Optional[PendingTransaction], Optional[PendingTransaction]]:
        """Add one pgoutput message to the open transaction: (open transaction, completed one)."""
        if isinstance(message, Begin):
            return PendingTransaction(message), None
        if isinstance(message, Relation):
            await self.learn_relation(conn, message)
        elif isinstance(message, (Insert, Update, Delete)) and transaction is not None:
            for info, row, envelope in self.envelopes(message, transaction.begin):
                transaction.records.append(self.record(info, row, envelope))
                if envelope["op"] == "d":
                    transaction.records.append(self.record(info, row, None))  # tombstone: compaction drops the key
        elif isinstance(message, Commit) and transaction is not None:
            transaction.end_lsn = message.end_lsn
            return None, transaction
        return transaction, None

    async def on_keepalive(self, wal: WalStream, keepalive: Keepalive, idle: bool) -> None:
        """With nothing received and unconfirmed, everything up to the server's position is safe to
        confirm (a slot whose tables are quiet must not hold back the WAL of others); otherwise
        answer a requested reply with the confirmed position."""
        if idle and keepalive.wal_end > (self.confirmed_lsn or 0):
            self.confirmed_lsn = keepalive.wal_end
            await wal.confirm(keepalive.wal_end)
        elif keepalive.reply_requested and self.confirmed_lsn is not None:
            await wal.confirm(self.confirmed_lsn)

    async def confirm_in_order(self, wal: WalStream, unconfirmed: asyncio.Queue) -> None:
        """Confirm each batch's end LSN once Kafka acknowledged all of it; a failed send raises."""
        while True:
            end_lsn, delivered = await unconfirmed.get()
            await delivered
            self.in_flight -= 1
            if end_lsn > (self.confirmed_lsn or 0):
                self.confirmed_lsn = end_lsn
                await wal.confirm(end_lsn)

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
        value = None if envelope is None else envelope_json(envelope)
        return cdc_topic_name(info.name), key_json(self.key_of(info, row)), value

    async def publish(self, records: List[Tuple[str, bytes, Optional[bytes]]]) -> None:
        """Send records and return once Kafka acknowledged every one (raises if any failed)."""
        await (await self.send(records))

    async def send(self, records: List[Tuple[str, bytes, Optional[bytes]]]) -> asyncio.Future:
        """Hand records to the producer in order per partition, as record batches, the partitions
        side by side (app/transport.py); the future of their delivery."""
        delivered = await send_grouped(self.session_producer, await by_partition(self.session_producer, records))
        self.published += len(records)
        return delivered


def envelope_json(envelope: Dict[str, Any]) -> bytes:
    """Compact JSON of a change event: orjson (5x json), or the standard library for what orjson
    refuses (a string with a lone surrogate from a non-UTF-8 source)."""
    try:
        return orjson.dumps(envelope)
    except orjson.JSONEncodeError:
        return json.dumps(envelope, separators=(",", ":")).encode()


def change_topics_of(settings: Settings) -> Optional[TopicT]:
    """The change topics of CDC_TABLES (None without tables): declared, nothing is created yet."""
    names = [cdc_topic_name(name) for name in settings.cdc_table_names]
    return raw_topic(*names, partitions=settings.topic_partitions) if names else None


def capture_of(settings: Settings, change_topics: Optional[TopicT]) -> Optional[Capture]:
    """The capture of CDC_SOURCE_DSN and CDC_TABLES, or None when either is unset."""
    if not settings.cdc_source_dsn or change_topics is None:
        return None
    return Capture(settings.cdc_source_dsn, settings.cdc_table_names, change_topics)


def capture_in_worker(app: faust.App, capture: Capture) -> None:
    """Every worker runs the capture task and competes for the lock; the holder captures."""

    async def capture_changes() -> None:
        await capture.run_forever()

    app.task(capture_changes)


# --- the capture service -------------------------------------------------------------------------


async def capture_alone(capture: Capture) -> None:
    """Capture until cancelled, outside a worker; the App's producer only declares the topics."""
    try:
        await capture.run_forever()
    finally:
        await app.producer.stop()


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m agents.cdc.capture``: capture alone, in its own process (configured like a worker)."""
    parser = argparse.ArgumentParser(
        prog="python -m agents.cdc.capture",
        description="Capture CDC_SOURCE_DSN's changes of CDC_TABLES onto the change topics, outside the "
        "workers. It competes for the same advisory lock as capturing workers: one capture runs per slot. "
        "Set CDC_CAPTURE=off on the workers to leave capture to this service.",
    )
    parser.parse_args(argv)
    capture = capture_of(settings, change_topics_of(settings))
    if capture is None:
        parser.error("CDC_SOURCE_DSN and CDC_TABLES must be set")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s")
    try:
        asyncio.run(capture_alone(capture))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    from agents.cdc.capture import main as main_of_the_imported_module  # one Capture class, not two copies

    main_of_the_imported_module()
