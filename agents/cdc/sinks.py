"""CDC sinks: the replica (PostgreSQL), Redis and Elasticsearch, each LSN-guarded.

Every sink has ``apply(changes) -> Rejected`` and ``refusal(change)`` (below). Building a sink
connects nowhere: a sink connects on its first write. ``configured_sinks`` builds those of
REPLICA_DSN, REDIS_URL and ELASTICSEARCH_URL (called by ``agents.cdc.register``).
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import orjson
import psycopg
import redis.asyncio as aioredis
import redis.exceptions
from psycopg import sql

from agents.cdc.capture import BACKOFF_MAX, TABLE_INFO_SQL, quoted
from app.runtime import until_applied
from app.search import BulkPair, BulkWriter, Rejection, search_client
from app.settings import Settings
from models.cdc import UNAVAILABLE, Change, InvalidChange, base_type, value_converter

log = logging.getLogger(__name__)

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
    STATEMENTS_MAX = 1024  # built statements kept (one per table, operation and column list)

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
        converted = []
        try:
            for name, value in values.items():
                if name in types and value != UNAVAILABLE:  # filled from the previous (checked) image later
                    converted.append(replica_value(value, types[name]))
        except InvalidChange as error:
            return str(error)
        if not change.is_delete and len(converted) == len(values) and change.table_name in self.tables:
            change.replica_values = (types, change.after, converted)  # ``parameters`` need not convert again
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
        checked = change.replica_values
        if checked is not None and checked[0] is types and checked[1] is change.after:
            return guard + checked[2]
        return guard + [replica_value(value, types[name]) for name, value in change.after_image.items()]

    def statement(self, change: Change) -> sql.Composed:
        """The guarded upsert or delete of a table and column set (cached: built once)."""
        cache_key = self.statement_key(change)
        if cache_key not in self.statements:
            if len(self.statements) >= self.STATEMENTS_MAX:  # events that vary their columns: forget the oldest
                del self.statements[next(iter(self.statements))]
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
    return replica_converter(sql_type)(value)


@lru_cache(maxsize=4096)  # a handful of types, one converter each, called for every value
def replica_converter(sql_type: str) -> Callable[[Any], Any]:
    """``replica_value`` for one SQL type: JSON columns take JSON text, the others ``python_value``."""
    convert: Callable[[Any], Any]
    if base_type(sql_type) in ("json", "jsonb"):
        is_array = sql_type.endswith("[]")

        def json_text(value: Any) -> Any:
            if not is_array:
                return value if isinstance(value, str) or value is None else json.dumps(value)
            if value is not None and not isinstance(value, list):
                raise InvalidChange(f"array column of type {sql_type} holds a {type(value).__name__}")
            return None if value is None else [item if isinstance(item, str) or item is None else json.dumps(item) for item in value]

        convert = json_text
    else:
        convert = value_converter(sql_type)

    def parameter(value: Any) -> Any:
        converted = convert(value)
        if holds_nul(converted):
            raise InvalidChange(f"a {sql_type} value holds NUL, which PostgreSQL text cannot")
        return converted

    return parameter


def holds_nul(parameter: Any) -> bool:
    if isinstance(parameter, str):
        return "\x00" in parameter
    return isinstance(parameter, list) and any(holds_nul(item) for item in parameter)


# The guarded writes of a chunk of changes in one script call (one command, not one per change):
# KEYS are each change's row key and guard key, ARGV each change's LSN, op and fields (a JSON array
# of names and values, read by the Lua cjson Redis ships: one argument instead of two per column).
REDIS_GUARDED_WRITES = """
local applied, a = 0, 1
for k = 1, #KEYS, 2 do
  local lsn, op = ARGV[a], ARGV[a + 1]
  local fields = op == 'upsert' and cjson.decode(ARGV[a + 2]) or {}  -- before any write of this change
  local current = redis.call('GET', KEYS[k + 1])
  if not (current and current > lsn) then
    redis.call('SET', KEYS[k + 1], lsn)
    redis.call('DEL', KEYS[k])
    for i = 1, #fields, 1000 do  -- unpack takes a few thousand values at most
      redis.call('HSET', KEYS[k], unpack(fields, i, math.min(i + 999, #fields)))
    end
    applied = applied + 1
  end
  a = a + 3
end
return applied
"""
REDIS_CHUNK = 500  # changes per script call: Redis runs nothing else while a script runs
# Error replies that say "not now" (memory, loading, failover), not "not this value": retried.
# redis-py strips the code of some and raises its own type instead: those are matched by type.
REDIS_TRANSIENT_REPLIES = ("OOM", "BUSY", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS", "MISCONF")
REDIS_TRANSIENT_ERRORS = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.NoScriptError,  # the script was flushed: loaded again on the retry
    redis.exceptions.BusyLoadingError,
    redis.exceptions.MasterDownError,
    redis.exceptions.ClusterDownError,
)


def redis_write(change: Change) -> Tuple[List[bytes], List[bytes]]:
    """The keys and arguments of a change's guarded write: its LSN, op and fields (``[name, value,
    ...]`` as JSON, each value the column's JSON text)."""
    row_key = f"{change.table_name}:{change.row_id}"
    try:
        keys = [row_key.encode(), f"_cdc_lsn:{row_key}".encode()]
        fields = (
            []
            if change.is_delete
            else [part for name, value in change.after_image.items() for part in (name, orjson.dumps(value).decode())]
        )
        fields_json = orjson.dumps(fields)
    except (UnicodeEncodeError, TypeError, orjson.JSONEncodeError) as error:
        raise InvalidChange(f"not writable to Redis: {error}") from None
    return keys, [f"{change.lsn:020d}".encode(), b"delete" if change.is_delete else b"upsert", fields_json]


class RedisSink:
    """A hash per row at ``<schema>.<table>:<pk>``, each field the column's JSON value. The guard is
    ``_cdc_lsn:<schema>.<table>:<pk>`` (kept after a delete), compared and set by one Lua script."""

    name = "redis"

    def __init__(self, url: str) -> None:
        self.client = aioredis.Redis.from_url(url)
        self.script = self.client.register_script(REDIS_GUARDED_WRITES)

    @staticmethod
    def refusal(change: Change) -> Optional[str]:
        """None: what ``redis_write`` needs (names that are UTF-8, key and values orjson can
        write) every decoded change has (models.cdc.parse_change, ``change_of_record``)."""
        return None

    async def apply(self, changes: List[Change]) -> Rejected:
        """Chunks of changes, one script call each; a chunk Redis refuses is written again one
        change per call, to find the change it refuses (the LSN guards skip what was written)."""
        rejected: Rejected = []
        writes: List[Tuple[Change, List[bytes], List[bytes]]] = []
        for change in changes:
            try:
                writes.append((change, *redis_write(change)))
            except InvalidChange as error:
                rejected.append((change, str(error)))
        chunks = [writes[start : start + REDIS_CHUNK] for start in range(0, len(writes), REDIS_CHUNK)]
        for chunk, result in zip(chunks, await self.run_scripts(chunks), strict=True):
            if isinstance(result, Exception):  # each change of the chunk alone finds the one refused
                alone = await self.run_scripts([[write] for write in chunk])
                rejected += [
                    (change, f"redis refused it: {error}")
                    for (change, _, _), error in zip(chunk, alone, strict=True)
                    if isinstance(error, Exception)
                ]
        return rejected

    async def run_scripts(self, chunks: List[List[Tuple[Change, List[bytes], List[bytes]]]]) -> List[Any]:
        """One script call per chunk, pipelined; each call's result or error reply. Raises
        TransientSinkError for a lost connection or a reply that says "not now"."""
        if not chunks:
            return []
        try:
            pipeline = self.client.pipeline(transaction=False)
            pipeline.scripts.add(self.script)  # type: ignore[arg-type]  # (typed for the sync Script) loaded by execute() if missing
            for chunk in chunks:
                keys = [key for _, change_keys, _ in chunk for key in change_keys]
                args = [arg for _, _, change_args in chunk for arg in change_args]
                pipeline.evalsha(self.script.sha, len(keys), *keys, *args)  # as the script object would, without its checks
            results = await pipeline.execute(raise_on_error=False)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
            raise TransientSinkError(f"redis: {error}") from error
        for result in results:
            if isinstance(result, REDIS_TRANSIENT_ERRORS) or (
                isinstance(result, Exception) and str(result).startswith(REDIS_TRANSIENT_REPLIES)
            ):
                raise TransientSinkError(f"redis: {result}")
        return list(results)

    async def close(self) -> None:
        await self.client.aclose()


class ElasticsearchSink:
    """An index per table (``<schema>.<table>``, lower case), ``_id`` the row id, the document the
    after-image; external versioning with the LSN (``external_gte``: the changes of one transaction
    share its commit LSN), so Elasticsearch itself refuses an older change (409: accepted, the index
    holds newer). A thin adapter over app.search's BulkWriter, the one Elasticsearch writer: it
    retries outages and overloads itself, counts a delete of what is gone as done, and splits a
    request refused whole until the refused change stands alone."""

    name = "elasticsearch"

    def __init__(self, url: str) -> None:
        self.writer = BulkWriter(search_client(url), max_backoff=BACKOFF_MAX, accept_status=(409,))

    @staticmethod
    def refusal(change: Change) -> Optional[str]:
        """None: what the index needs (JSON it can encode) every applied change has; what it
        refuses per document (a mapping conflict, a bad index name) comes back from the write."""
        return None

    @staticmethod
    def index_of(change: Change) -> str:
        return change.table_name.lower()

    def actions(self, changes: List[Change]) -> List[BulkPair]:
        """The ``(header, body)`` bulk lines of each change, in order."""
        actions: List[BulkPair] = []
        for change in changes:
            meta = {"_index": self.index_of(change), "_id": change.row_id, "version": change.lsn, "version_type": "external_gte"}
            actions.append(({"delete": meta}, None) if change.is_delete else ({"index": meta}, change.after_image))
        return actions

    async def apply(self, changes: List[Change]) -> Rejected:
        actions = self.actions(changes)
        change_of = {id(action): change for action, change in zip(actions, changes, strict=True)}
        rejections = await self.writer.write(actions) if actions else []
        return [(change_of[id(rejection.action)], refused_reason(rejection)) for rejection in rejections]

    async def close(self) -> None:
        await self.writer.close()


def refused_reason(rejection: Rejection) -> str:
    """A dead letter's reason for a change Elasticsearch refused (no status: never sent)."""
    status = f" ({rejection.status})" if rejection.status is not None else ""
    return f"elasticsearch refused it{status}: {rejection.reason}"


def configured_sinks(settings: Settings) -> List[Any]:
    """The sinks of REPLICA_DSN, REDIS_URL and ELASTICSEARCH_URL, whichever are set (none connects yet)."""
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
