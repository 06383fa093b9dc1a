"""The local broker's stock-client shim: Tansu's ApiVersions answer rewritten to what Kafka sends."""
from __future__ import annotations

import socket
import struct
import threading
from typing import Dict, Iterator, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.local_broker_shim import (
    DEFAULT_TAGGED_FIELDS,
    listen,
    read_tagged_fields,
    read_uvarint,
    recv_exactly,
    serve,
    without_default_tagged_fields,
    write_tagged_fields,
)

# Tansu 0.6's answer to librdkafka 2.0.2's ApiVersions v3 request (correlation id 1), as captured
# on the wire: 36 APIs, throttle time 0, then 4 tagged fields holding their defaults.
TANSU_API_VERSIONS_V3 = bytes.fromhex(
    "000000010000250002000000090000080000000900001a00000004000013000000070000160000000500003300000000"
    "0000180000000500002c0000000100000c00000004000045000000000000100000000500002e00000000000014000000"
    "0600000b000000090000120000000400000f0000000500001d000000030000240000000200000e000000050000320000"
    "00000000190000000400003c000000010000010000001100000a00000006000015000000020000200000000400000d00"
    "0000050000030000000c00001c0000000400001e00000003000047000000000000110000000100004b00000000000009"
    "0000000900002a000000020000000000000b0000000000040001010108ffffffffffffffff020101030100"
)
TAGGED_FIELDS_AT = 263  # correlation id, error code, 36 APIs and the throttle time come first


def api_versions(response: bytes) -> Tuple[List[Tuple[int, int, int]], int]:
    """The (api key, min, max) entries of an ApiVersions v3 response and where its tags start."""
    entries_plus_one, pos = read_uvarint(response, 6)
    apis = []
    for _ in range(entries_plus_one - 1):
        apis.append(struct.unpack_from(">hhh", response, pos))
        _, pos = read_tagged_fields(response, pos + 6)
    return apis, pos + 4


def skip_tags_as_librdkafka_2_0_does(response: bytes, pos: int) -> int:
    """librdkafka < 2.2's rd_kafka_buf_skip_tags: skips size - 1 bytes per field (librdkafka#4278)."""
    count, pos = read_uvarint(response, pos)
    for _ in range(count):
        _, pos = read_uvarint(response, pos)
        size, pos = read_uvarint(response, pos)
        pos += max(size - 1, 0)
        if pos > len(response):
            break
    return pos


def with_tags(fields: Dict[int, bytes]) -> bytes:
    return TANSU_API_VERSIONS_V3[:TAGGED_FIELDS_AT] + write_tagged_fields(fields)


def test_tansus_answer_loses_its_four_default_tagged_fields_and_nothing_else():
    assert read_tagged_fields(TANSU_API_VERSIONS_V3, TAGGED_FIELDS_AT) == (
        {0: b"\x01", 1: b"\xff" * 8, 2: b"\x01", 3: b"\x00"}, len(TANSU_API_VERSIONS_V3))

    rewritten = without_default_tagged_fields(TANSU_API_VERSIONS_V3, version=3)

    assert rewritten == TANSU_API_VERSIONS_V3[:TAGGED_FIELDS_AT] + b"\x00"
    assert api_versions(rewritten) == api_versions(TANSU_API_VERSIONS_V3)
    assert len(api_versions(rewritten)[0]) == 36


def test_old_librdkafka_misreads_tansus_tags_but_reads_the_rewritten_answer_to_its_end():
    # The cause of "ApiVersionRequest failed: Local: Read underflow" in kcat 1.7 (librdkafka 2.0.2):
    # one byte too few skipped per field, so a value byte is read as the next tag.
    # Its third "tag" is 0x08 (FinalizedFeaturesEpoch's size) and its "size" the varint ff..ff02
    # at 269, which kcat's debug log reports as "underflow ... at 274/279: expected
    # 216172782113783806 bytes > 5 remaining" (offsets after the correlation id, size - 1 bytes).
    assert read_uvarint(TANSU_API_VERSIONS_V3, 269) == (216172782113783807, 278)
    assert skip_tags_as_librdkafka_2_0_does(TANSU_API_VERSIONS_V3, TAGGED_FIELDS_AT) > len(TANSU_API_VERSIONS_V3)

    rewritten = without_default_tagged_fields(TANSU_API_VERSIONS_V3, version=4)
    assert skip_tags_as_librdkafka_2_0_does(rewritten, TAGGED_FIELDS_AT) == len(rewritten)


def test_tagged_fields_with_other_values_are_kept():
    features = {0: bytes.fromhex("020f6d657461646174612e76657273696f6e000100140000"), 1: struct.pack(">q", 7), 2: b"\x01", 3: b"\x01", 9: b"abc"}

    rewritten = without_default_tagged_fields(with_tags(features), version=3)

    assert read_tagged_fields(rewritten, TAGGED_FIELDS_AT)[0] == {0: features[0], 1: features[1], 3: b"\x01", 9: b"abc"}


@pytest.mark.parametrize("response, version", [
    (TANSU_API_VERSIONS_V3, 2),  # v0-v2 have no tagged fields
    (bytes.fromhex("00000001" "0023" "00000001" "00120000" "0003"), 4),  # UNSUPPORTED_VERSION, answered in v0 format
    (TANSU_API_VERSIONS_V3[:-3], 3),  # cut short
    (TANSU_API_VERSIONS_V3 + b"\x00", 3),  # trailing bytes
    (b"\x00\x00", 3),
])
def test_answers_it_does_not_fully_understand_pass_unchanged(response, version):
    assert without_default_tagged_fields(response, version) == response


def tagged_fields() -> st.SearchStrategy[Dict[int, bytes]]:
    """ApiVersions' tags 0-3 absent, at their default or anything else, plus unknown tags."""
    known = st.fixed_dictionaries({}, optional={
        tag: st.just(default) | st.binary(max_size=9) for tag, default in DEFAULT_TAGGED_FIELDS.items()})
    unknown = st.dictionaries(st.integers(4, 300), st.binary(max_size=12), max_size=2)
    return st.builds(lambda a, b: {**a, **b}, known, unknown)


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.just(TANSU_API_VERSIONS_V3[:TAGGED_FIELDS_AT]) | st.binary(max_size=300),
    fields=tagged_fields(),
    suffix=st.just(b"") | st.binary(max_size=4),
    version=st.sampled_from([-1, 0, 2, 3, 4, 5]),
)
def test_any_bytes_come_back_unchanged_or_as_the_same_answer_without_default_fields(prefix, fields, suffix, version):
    response = prefix + write_tagged_fields(fields) + suffix

    rewritten = without_default_tagged_fields(response, version)

    if rewritten != response:
        assert version >= 3 and len(rewritten) < len(response)
        apis, tags_at = api_versions(rewritten)
        assert (apis, tags_at) == api_versions(response)
        kept, end = read_tagged_fields(rewritten, tags_at)
        assert end == len(rewritten)
        original = read_tagged_fields(response, tags_at)[0]
        assert kept == {tag: value for tag, value in original.items() if DEFAULT_TAGGED_FIELDS.get(tag) != value}
        if not kept:
            assert skip_tags_as_librdkafka_2_0_does(rewritten, tags_at) == len(rewritten)


def frame(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


def read_frame(sock: socket.socket) -> bytes:
    (size,) = struct.unpack(">i", recv_exactly(sock, 4))
    return recv_exactly(sock, size)


@pytest.fixture
def shim_to_fake_broker() -> Iterator[Tuple[Tuple[str, int], List[bytes]]]:
    """A shim in front of a fake broker that answers ApiVersions (key 18) with Tansu's bytes and
    echoes any other request's body back under its correlation id; yields the shim's address and
    the requests the broker received."""
    broker_listener, received = listen(("127.0.0.1", 0)), []

    def fake_broker() -> None:
        conn, _ = broker_listener.accept()
        with conn:
            while True:
                try:
                    request = read_frame(conn)
                except (EOFError, OSError):
                    return
                received.append(request)
                api_key, _, correlation_id = struct.unpack_from(">hhi", request)
                body = TANSU_API_VERSIONS_V3[4:] if api_key == 18 else request[8:]
                conn.sendall(frame(struct.pack(">i", correlation_id) + body))

    shim_listener = listen(("127.0.0.1", 0))
    threads = [threading.Thread(target=fake_broker, daemon=True),
               threading.Thread(target=serve, args=(shim_listener, broker_listener.getsockname()), daemon=True)]
    for thread in threads:
        thread.start()
    yield shim_listener.getsockname(), received
    for listener in (shim_listener, broker_listener):
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()


def test_through_the_shim_api_versions_answers_are_rewritten_and_everything_else_passes_byte_for_byte(shim_to_fake_broker):
    address, received = shim_to_fake_broker
    api_versions_v3 = bytes.fromhex("0012000300000007000772646b61666b6100") + b"\x0blibrdkafka\x062.0.2\x00"
    big_request = struct.pack(">hhi", 0, 7, 8) + bytes(range(256)) * 8192  # a 2 MiB "produce"

    with socket.create_connection(address) as client:
        client.sendall(frame(api_versions_v3))
        first = read_frame(client)
        client.sendall(frame(struct.pack(">hhi", 18, 3, 9)) + frame(big_request))  # a second ApiVersions, then other traffic
        second, echoed = read_frame(client), read_frame(client)

    assert first == struct.pack(">i", 7) + TANSU_API_VERSIONS_V3[4:TAGGED_FIELDS_AT] + b"\x00"
    assert second == struct.pack(">i", 9) + TANSU_API_VERSIONS_V3[4:TAGGED_FIELDS_AT] + b"\x00"
    assert echoed == struct.pack(">i", 8) + big_request[8:]
    assert received[0] == api_versions_v3 and received[2] == big_request
