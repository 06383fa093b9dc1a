"""A loopback shim in front of the local broker that lets librdkafka < 2.2 clients connect.

Tansu 0.6 ends its ApiVersions v3+ response with four tagged fields that all hold their default
values (SupportedFeatures=[], FinalizedFeaturesEpoch=-1, FinalizedFeatures=[],
ZkMigrationReady=false). Apache Kafka leaves default tagged fields out. librdkafka before 2.2.0
skips one byte too few per tagged field (confluentinc/librdkafka#4278), so it misreads these four
and fails the handshake with "ApiVersionRequest failed: Local: Read underflow"; Debian 12's kcat
and rsyslog omkafka (librdkafka 2.0.2) cannot talk to the local broker at all.

The shim forwards every connection to the broker and drops exactly those default tagged fields
from ApiVersions responses: the response then has the bytes Kafka would send, and means the same
to every client. After a connection's handshake (the ApiVersions exchange that opens it) the shim
only copies bytes. Standard library only: ``LocalBroker`` runs this file as a script, without
importing the app.

``python app/local_broker_shim.py --listen 127.0.0.1:9092 --upstream 127.0.0.1:19092``
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import threading
from typing import Callable, Dict, Optional, Tuple

API_VERSIONS = 18
FIRST_FLEXIBLE_API_VERSIONS_VERSION = 3  # from v3 the response ends with tagged fields

# ApiVersionsResponse's top-level tagged fields and the encoding of their default values.
DEFAULT_TAGGED_FIELDS: Dict[int, bytes] = {
    0: b"\x01",  # SupportedFeatures: empty compact array
    1: struct.pack(">q", -1),  # FinalizedFeaturesEpoch
    2: b"\x01",  # FinalizedFeatures: empty compact array
    3: b"\x00",  # ZkMigrationReady: false
}

COPY_CHUNK = 256 * 1024


def read_uvarint(data: bytes, pos: int) -> Tuple[int, int]:
    """The unsigned varint at ``pos`` and the position after it (IndexError past the end)."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("unsigned varint longer than 64 bits")


def write_uvarint(value: int) -> bytes:
    """``value`` as an unsigned varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_tagged_fields(data: bytes, pos: int) -> Tuple[Dict[int, bytes], int]:
    """The tagged fields at ``pos`` as {tag: raw value} and the position after them."""
    count, pos = read_uvarint(data, pos)
    fields: Dict[int, bytes] = {}
    for _ in range(count):
        tag, pos = read_uvarint(data, pos)
        size, pos = read_uvarint(data, pos)
        if pos + size > len(data):
            raise ValueError("tagged field runs past the end of the response")
        fields[tag] = data[pos : pos + size]
        pos += size
    return fields, pos


def write_tagged_fields(fields: Dict[int, bytes]) -> bytes:
    """Tagged fields in ascending tag order, as the protocol requires."""
    parts = [write_uvarint(len(fields))]
    for tag in sorted(fields):
        parts += [write_uvarint(tag), write_uvarint(len(fields[tag])), fields[tag]]
    return b"".join(parts)


def without_default_tagged_fields(response: bytes, version: int) -> bytes:
    """An ApiVersions response (correlation id onward) without the top-level tagged fields that
    hold their default values. Anything it does not fully understand is returned unchanged: other
    versions, error responses (Kafka answers those in v0 format) and bytes that do not parse."""
    if version < FIRST_FLEXIBLE_API_VERSIONS_VERSION or len(response) < 6:
        return response
    (error_code,) = struct.unpack_from(">h", response, 4)
    if error_code != 0:
        return response
    try:
        entries_plus_one, pos = read_uvarint(response, 6)
        for _ in range(max(entries_plus_one - 1, 0)):
            _, pos = read_tagged_fields(response, pos + 6)  # api key, min and max version
        tags_at = pos + 4  # throttle_time_ms
        fields, end = read_tagged_fields(response, tags_at)
    except (IndexError, ValueError):
        return response
    if end != len(response):
        return response
    kept = {tag: value for tag, value in fields.items() if DEFAULT_TAGGED_FIELDS.get(tag) != value}
    return response[:tags_at] + write_tagged_fields(kept)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes from ``sock`` (EOFError if it closes first)."""
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), COPY_CHUNK))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)


def copy_exactly(src: socket.socket, dst: socket.socket, size: int) -> None:
    """Copy ``size`` bytes from ``src`` to ``dst``."""
    buffer = memoryview(bytearray(min(max(size, 1), COPY_CHUNK)))
    while size > 0:
        got = src.recv_into(buffer, min(size, len(buffer)))
        if not got:
            raise EOFError
        dst.sendall(buffer[:got])
        size -= got


def copy_until_closed(src: socket.socket, dst: socket.socket) -> None:
    """Copy everything ``src`` sends to ``dst`` until ``src`` closes."""
    buffer = memoryview(bytearray(COPY_CHUNK))
    while True:
        got = src.recv_into(buffer)
        if not got:
            return
        dst.sendall(buffer[:got])


class ShimmedConnection:
    """One client connection and its broker connection, one thread per direction.

    The client thread notes the correlation id and version of every ApiVersions request until
    the first other request; the broker thread rewrites the responses to those requests. Once
    both are past the handshake each thread just copies bytes."""

    def __init__(self, client: socket.socket, broker: socket.socket) -> None:
        self.client = client
        self.broker = broker
        self.api_versions_requests: Dict[int, int] = {}  # correlation id -> request version
        self.handshake_over = False
        self._finished = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        for direction in (self._requests, self._responses):
            threading.Thread(target=self._run, args=(direction,), daemon=True).start()

    def _requests(self) -> None:
        while True:
            header = recv_exactly(self.client, 12)  # size, api key, version, correlation id
            size, api_key, version, correlation_id = struct.unpack(">ihhi", header)
            if api_key != API_VERSIONS or size < 8:
                self.handshake_over = True
                self.broker.sendall(header)
                break
            self.api_versions_requests[correlation_id] = version  # before the broker can answer
            self.broker.sendall(header + recv_exactly(self.client, size - 8))
        copy_until_closed(self.client, self.broker)

    def _responses(self) -> None:
        while not (self.handshake_over and not self.api_versions_requests):
            header = recv_exactly(self.broker, 8)  # size, correlation id
            size, correlation_id = struct.unpack(">ii", header)
            version = self.api_versions_requests.pop(correlation_id, None)
            if version is None:
                self.client.sendall(header)
                copy_exactly(self.broker, self.client, size - 4)
                continue
            response = without_default_tagged_fields(header[4:] + recv_exactly(self.broker, size - 4), version)
            self.client.sendall(struct.pack(">i", len(response)) + response)
        copy_until_closed(self.broker, self.client)

    def _run(self, direction: Callable[[], None]) -> None:
        try:
            direction()
        except (OSError, EOFError):
            pass
        finally:
            # Kafka clients do not half-close: when one side is done, so is the connection.
            for sock in (self.client, self.broker):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                self._finished += 1
                if self._finished == 2:
                    self.client.close()
                    self.broker.close()


def connect(address: Tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def serve(listener: socket.socket, upstream: Tuple[str, int]) -> None:
    """Accept connections on ``listener`` and shim each one to ``upstream``, until it closes."""
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            broker = connect(upstream)
        except OSError as error:
            print(f"local broker shim: cannot reach the broker at {upstream}: {error}", file=sys.stderr, flush=True)
            client.close()
            continue
        ShimmedConnection(client, broker).start()


def listen(address: Tuple[str, int]) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(address)
    listener.listen(128)
    return listener


def host_port(value: str) -> Tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=host_port, required=True, help="host:port clients connect to")
    parser.add_argument("--upstream", type=host_port, required=True, help="host:port of the broker")
    args = parser.parse_args(argv)
    try:
        serve(listen(args.listen), args.upstream)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
