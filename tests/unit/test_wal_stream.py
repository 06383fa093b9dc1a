"""agents/cdc/wal_stream.py: standby status updates from two tasks at once, on a real socket that
is not writable for a while (libpq's own socket stands in for by a socket pair)."""
from __future__ import annotations

import asyncio
import socket
import struct
from types import SimpleNamespace
from typing import List

from agents.cdc.wal_stream import STATUS_UPDATE, WalStream


class StalledLibpq:
    """The part of libpq's connection a status update uses: it queues messages and, like
    ``PQflush`` on a full socket, reports data left to send until the socket drains."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.socket = sock, sock.fileno()
        self.queued: List[bytes] = []
        self.sent: List[bytes] = []

    def put_copy_data(self, data: bytes) -> int:
        self.queued.append(data)
        return 1

    def flush(self) -> int:
        try:  # keep the socket full: only the peer draining it makes it writable
            while True:
                self.sock.send(b"x" * 65536)
        except BlockingIOError:
            pass
        if not self.queued:
            return 0
        self.sent.extend(self.queued)
        self.queued.clear()
        return 1  # more to send: wait until the socket is writable

    def get_error_message(self) -> str:
        return ""


async def drain_later(peer: socket.socket, delay: float) -> None:
    await asyncio.sleep(delay)
    peer.setblocking(False)
    for _ in range(200):
        try:
            while peer.recv(1 << 20):
                pass
        except BlockingIOError:
            pass
        await asyncio.sleep(0.01)


async def test_two_tasks_confirming_at_once_both_finish_when_the_socket_drains():
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    libpq = StalledLibpq(ours)
    stream = WalStream(SimpleNamespace(pgconn=libpq))
    draining = asyncio.ensure_future(drain_later(peer, 0.1))
    try:
        await asyncio.wait_for(asyncio.gather(stream.confirm(100), stream.confirm(200)), timeout=10)
    finally:
        draining.cancel()
        ours.close()
        peer.close()
    flushed = sorted(struct.unpack_from("!cQ", message)[1] for message in libpq.sent)
    assert flushed == [100, 200] and all(len(message) == STATUS_UPDATE.size for message in libpq.sent)
