"""PostgreSQL's streaming replication protocol for a logical slot, over psycopg 3's libpq layer.

psycopg 3 has no replication API (psycopg/psycopg#71) and its connections refuse the COPY_BOTH
state that ``START_REPLICATION`` enters, so the stream is driven through the connection's
``pgconn`` (``psycopg.pq``): CopyData messages in, standby status updates out. Polling the slot
with ``pg_logical_slot_peek_binary_changes`` instead re-decodes the WAL from the slot's
``restart_lsn`` on every call; under steady writes that position moves only every 15-30 s, so each
poll decoded tens of thousands of changes it then skipped. The walsender decodes each change once.

Messages (PostgreSQL's "Streaming Replication Protocol"): ``w`` XLogData (start, end, send time,
then one pgoutput message), ``k`` primary keepalive (end of WAL sent, send time, reply requested);
``r`` is the client's standby status update (written, flushed, applied, time, reply requested).
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import List, NamedTuple, Union

import psycopg
from psycopg import pq, sql

XLOG_DATA_HEADER = struct.Struct("!cQQQ")
KEEPALIVE = struct.Struct("!cQQ?")
STATUS_UPDATE = struct.Struct("!cQQQQ?")
POSTGRES_EPOCH = 946_684_800  # 2000-01-01 in Unix seconds: the protocol's clock starts there


class Keepalive(NamedTuple):
    wal_end: int  # everything before it was sent
    reply_requested: bool


class WalStream:
    """The pgoutput messages of one replication slot, as the walsender streams them.

    ``read_batch`` returns pgoutput messages and keepalives in order; ``confirm`` reports the position up to which everything is safely published,
    which moves the slot's ``confirmed_flush_lsn`` (and lets the server recycle the WAL before it).
    """

    def __init__(self, conn: psycopg.AsyncConnection) -> None:
        self.conn = conn
        self.pgconn = conn.pgconn
        self.loop = asyncio.get_running_loop()
        self.sending = asyncio.Lock()  # one writer at a time: a second add_writer would replace the first's

    async def start(self, slot: str, publication: str) -> None:
        """``START_REPLICATION`` from the slot's confirmed position with pgoutput protocol 1."""
        command = sql.SQL("START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {})").format(
            sql.Identifier(slot), sql.Literal(sql.Identifier(publication).as_string(self.conn))
        )
        self.pgconn.send_query(command.as_bytes(self.conn))
        await self.flush()
        while True:
            while self.pgconn.is_busy():
                await self.wait(readable=True)
                self.pgconn.consume_input()
            result = self.pgconn.get_result()
            if result is None:
                raise psycopg.OperationalError(f"START_REPLICATION failed: {self.error()}")
            if result.status == pq.ExecStatus.COPY_BOTH:
                return
            if result.status == pq.ExecStatus.FATAL_ERROR:
                raise psycopg.OperationalError((result.error_message or b"").decode(errors="replace").strip())

    async def read_batch(self, limit: int, timeout: float) -> List[Union[bytes, Keepalive]]:
        """The next message (waiting up to ``timeout`` seconds for it: else none), then every one
        already received, up to ``limit``: pgoutput messages as bytes, keepalives as ``Keepalive``."""
        messages: List[Union[bytes, Keepalive]] = []
        while len(messages) < limit:
            size, data = self.pgconn.get_copy_data(1)
            if size == 0:
                if not messages:
                    try:
                        await asyncio.wait_for(self.wait(readable=True), timeout)
                    except asyncio.TimeoutError:
                        return messages
                self.pgconn.consume_input()  # what the socket holds, without waiting
                size, data = self.pgconn.get_copy_data(1)
                if size == 0:
                    if messages:
                        break
                    continue
            if size < 0:
                raise psycopg.OperationalError(f"replication stream ended: {self.error()}")
            kind = data[:1]
            if kind == b"w":
                messages.append(bytes(data[XLOG_DATA_HEADER.size :]))
            elif kind == b"k":
                _, wal_end, _, reply_requested = KEEPALIVE.unpack_from(data)
                messages.append(Keepalive(wal_end, reply_requested))
        return messages

    def error(self) -> str:
        return self.pgconn.get_error_message().strip() or "copy done"

    async def confirm(self, lsn: int) -> None:
        """Report ``lsn`` as written, flushed and applied: the server may forget what precedes it."""
        now_us = int((time.time() - POSTGRES_EPOCH) * 1_000_000)
        async with self.sending:
            while (queued := self.pgconn.put_copy_data(STATUS_UPDATE.pack(b"r", lsn, lsn, lsn, now_us, False))) == 0:
                await self.wait(readable=False)  # libpq's buffer is full: once the socket takes more
            if queued != 1:
                raise psycopg.OperationalError(f"standby status update not sent: {self.error()}")
            await self.flush()

    async def flush(self) -> None:
        while self.pgconn.flush() == 1:
            await self.wait(readable=False)

    async def wait(self, readable: bool) -> None:
        """Until the connection's socket is readable (or writable)."""
        ready = self.loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        fd = self.pgconn.socket
        if readable:
            self.loop.add_reader(fd, wake)
        else:
            self.loop.add_writer(fd, wake)
        try:
            await ready
        finally:
            if readable:
                self.loop.remove_reader(fd)
            else:
                self.loop.remove_writer(fd)
