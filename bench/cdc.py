"""Change data capture throughput and lag on a real worker, in one run.

    python bench/cdc.py [--changes 20000] [--rate 1000] [--seconds 20] [--producer-batch-size N] [--capture-service]

Starts a local broker, a throwaway PostgreSQL (source and replica databases), a throwaway Redis,
the Elasticsearch-compatible test server and one ``faust -A app worker``, measures bench/metrics.py's
bare-agent ceiling (how fast this machine runs Faust right now) (capturing and applying;
with ``--capture-service`` the worker only applies and ``python -m agents.cdc.capture`` captures
in its own process, the Procfile's ``capture:`` line), then prints:
1. with ``--capture-service``, before the worker starts: the capture alone (a backlog of
   ``--changes`` row changes, transactions of 5 inserts and 5 updates written as fast as one
   connection can, to the change topic), then the worker's apply alone (draining that backlog
   from the change topic, with the worker's CPU time per change), so each stage's own rate shows
   without the other stages sharing its two cores;
2. written, captured and applied changes/s for a second such backlog, all stages at once;
3. p50/p99 lag from a change's source commit to visible in Redis and in the replica, while a
   steady ``--rate`` changes/s flows (a probe row is updated every 50 ms and watched every 5 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import psycopg  # noqa: E402
import redis  # noqa: E402
from metrics import bare_ceiling  # noqa: E402

from app.local_broker import LocalBroker  # noqa: E402
from tests.support.es_server import ElasticsearchTestServer  # noqa: E402
from tests.support.postgres import ThrowawayPostgres  # noqa: E402
from tests.support.redis_server import ThrowawayRedis  # noqa: E402
from tests.support.workers import WorkerProcess, wait_for, wait_until_ready  # noqa: E402

TABLE = "bench.items"
DDL = """
CREATE SCHEMA bench;
CREATE TABLE bench.items (id bigint PRIMARY KEY, seq bigint, price numeric(12,2), note text, at timestamptz DEFAULT now(), doc jsonb);
"""


def write_backlog(dsn: str, changes: int, first_id: int) -> None:
    """``changes`` row changes in transactions of 10: five inserts of new rows, then an update of
    each (two statements per transaction, so that the script itself costs little CPU)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for start in range(0, changes, 10):
            first, last = first_id + start // 2, first_id + min(start + 10, changes) // 2 - 1
            with conn.transaction():
                conn.execute(
                    "INSERT INTO bench.items (id, seq, price, note, doc) SELECT g, 0, 1.5, 'x', '{\"k\": 1}' FROM generate_series(%s, %s) g",
                    (first, last),
                )
                conn.execute("UPDATE bench.items SET seq = seq + 1, price = price + 1 WHERE id BETWEEN %s AND %s", (first, last))


def applied_total(worker: WorkerProcess) -> int:
    try:
        status, body = worker.get("/cdc/status/")
    except OSError:  # not listening yet
        return 0
    return body["tables"].get(TABLE, {}).get("total", 0) if status == 200 else 0


def confirmed_lsn(dsn: str, slot: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn - '0/0'::pg_lsn, pg_current_wal_lsn() - '0/0'::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        ).fetchone()
    return row


def write_and_capture(dsn: str, slot: str, changes: int, first_id: int) -> Tuple[float, float, float]:
    """Write a backlog and wait until the slot is confirmed past it: (began, written, captured) times."""
    began = time.monotonic()
    write_backlog(dsn, changes, first_id)
    written = time.monotonic()
    with psycopg.connect(dsn) as conn:
        target = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0]
    wait_for(lambda: confirmed_lsn(dsn, slot)[0] >= target, timeout=600, interval=0.05, message="slot confirmed past the backlog")
    return began, written, time.monotonic()


def capture_alone(dsn: str, slot: str, changes: int) -> Tuple[float, float]:
    """(written/s, captured/s) of a backlog while no worker applies."""
    began, written, captured = write_and_capture(dsn, slot, changes, first_id=2_000_000)
    return changes / (written - began), changes / (captured - began)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def apply_alone(worker: WorkerProcess, changes: int) -> Tuple[float, float]:
    """(applied/s, the worker's CPU microseconds per change) of a worker draining ``changes``
    changes already in the change topic, timed from the first applied change it reports (its
    start and group join are not counted). CPU time per change varies less than the rate with
    what else runs on the machine."""
    assert worker.process is not None
    first = wait_for(lambda: applied_total(worker), timeout=120, interval=0.1, message="first change applied")
    began, cpu_began = time.monotonic(), cpu_seconds(worker.process.pid)
    wait_for(lambda: applied_total(worker) >= changes, timeout=600, interval=0.1, message="backlog applied")
    cpu = cpu_seconds(worker.process.pid) - cpu_began
    return (changes - first) / (time.monotonic() - began), cpu / (changes - first) * 1e6


def backlog_rates(worker: WorkerProcess, dsn: str, slot: str, changes: int) -> Tuple[float, float, float]:
    """(written/s, captured/s, applied/s) for ``changes`` changes written as fast as possible."""
    before = applied_total(worker)
    began, written, captured = write_and_capture(dsn, slot, changes, first_id=1_000_000)
    wait_for(lambda: applied_total(worker) >= before + changes, timeout=600, interval=0.1, message="backlog applied")
    return changes / (written - began), changes / (captured - began), changes / (time.monotonic() - began)


def steady_load(dsn: str, rate: int, stop: threading.Event) -> None:
    """``rate`` changes/s: a transaction updating 10 rows every 10 ms (scaled), on 1000 rows."""
    per_tick, tick = 10, 10 / rate
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO bench.items (id, seq) SELECT g, 0 FROM generate_series(1, 1000) g ON CONFLICT DO NOTHING")
        n, next_at = 0, time.monotonic()
        while not stop.is_set():
            rows = [1 + (n + i) % 1000 for i in range(per_tick)]
            n += per_tick
            conn.execute("UPDATE bench.items SET seq = %s, note = 'load' WHERE id = ANY(%s)", (n, rows))  # one transaction
            next_at += tick
            time.sleep(max(0.0, next_at - time.monotonic()))


def probe_lags(dsn: str, replica_dsn: str, redis_url: str, seconds: float) -> Tuple[List[float], List[float]]:
    """Update a probe row every 50 ms; watch Redis and the replica for each new value."""
    commits: Dict[int, float] = {}
    redis_lag: Dict[int, float] = {}
    replica_lag: Dict[int, float] = {}
    stop = threading.Event()
    client = redis.Redis.from_url(redis_url)

    def watch_redis() -> None:
        while not stop.is_set():
            value = client.hget(f"{TABLE}:0", "seq")
            seen = time.time()
            if value is not None:
                seq = json.loads(value)
                if seq in commits and seq not in redis_lag:
                    redis_lag[seq] = seen - commits[seq]
            time.sleep(0.005)

    def watch_replica() -> None:
        with psycopg.connect(replica_dsn, autocommit=True) as conn:
            while not stop.is_set():
                row = conn.execute("SELECT seq FROM bench.items WHERE id = 0").fetchone()
                seen = time.time()
                if row and row[0] in commits and row[0] not in replica_lag:
                    replica_lag[row[0]] = seen - commits[row[0]]
                time.sleep(0.005)

    watchers = [threading.Thread(target=watch_redis), threading.Thread(target=watch_replica)]
    for watcher in watchers:
        watcher.start()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO bench.items (id, seq) VALUES (0, 0) ON CONFLICT DO NOTHING")
        end, seq = time.monotonic() + seconds, 0
        while time.monotonic() < end:
            seq += 1
            conn.execute("UPDATE bench.items SET seq = %s WHERE id = 0", (seq,))
            commits[seq] = time.time()
            time.sleep(0.05)
    time.sleep(3)  # the last probes land
    stop.set()
    for watcher in watchers:
        watcher.join()
    return list(redis_lag.values()), list(replica_lag.values())


def percentiles(lags: List[float]) -> str:
    if len(lags) < 2:
        return f"{len(lags)} probes seen"
    ms = sorted(lag * 1000 for lag in lags)
    p99 = ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]
    return f"p50 {statistics.median(ms):.0f} ms, p99 {p99:.0f} ms ({len(ms)} probes)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=20000)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--producer-batch-size", type=int, default=None, help="the worker's PRODUCER_MAX_BATCH_SIZE (default: its own)")
    parser.add_argument("--capture-service", action="store_true", help="capture in its own process (CDC_CAPTURE=off on the worker)")
    args = parser.parse_args()
    suffix = uuid.uuid4().hex[:8]
    with LocalBroker() as broker, ThrowawayPostgres() as pg, ThrowawayRedis() as rds, ElasticsearchTestServer.in_thread() as es:
        ceiling = bare_ceiling(broker, Path(tempfile.mkdtemp(prefix="bench-cdc-ceiling-")), 60000)
        print(f"bare agent ceiling (streamspine-bare): {ceiling:,.0f} records/s (this machine's speed now)")
        source, replica = pg.create_database("bench_source"), pg.create_database("bench_replica")
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute(DDL)
        slot = f"bench_{suffix}"
        env = {
            "CDC_SOURCE_DSN": source,
            "REPLICA_DSN": replica,
            "REDIS_URL": rds.url,
            "ELASTICSEARCH_URL": es.url,
            "CDC_TABLES": TABLE,
            "CDC_SLOT": slot,
            "LOG_LEVEL": "warning",
        }
        if args.producer_batch_size:
            env["PRODUCER_MAX_BATCH_SIZE"] = str(args.producer_batch_size)
        work_dir = Path(tempfile.mkdtemp(prefix="bench-cdc-"))
        worker = WorkerProcess(
            broker.url, work_dir, app_id=f"bench-cdc-{suffix}", env={**env, **({"CDC_CAPTURE": "off"} if args.capture_service else {})}
        )
        service = None
        if args.capture_service:
            service = subprocess.Popen(
                [sys.executable, "-m", "agents.cdc.capture"],
                cwd=REPO,
                env={**worker.env, **env},
                stdout=open(work_dir / "capture.log", "wb"),
                stderr=subprocess.STDOUT,
            )
        try:
            if service is not None:
                wait_for(lambda: confirmed_lsn(source, slot) is not None, timeout=60, message="capture started")
                written, captured = capture_alone(source, slot, args.changes)
                print(f"capture alone, backlog of {args.changes} changes: written {written:,.0f}/s, captured {captured:,.0f}/s")
                worker.start()
                rate, cpu_us = apply_alone(worker, args.changes)
                print(
                    f"apply alone, draining those {args.changes} changes from the change topic: {rate:,.0f}/s, "
                    f"worker CPU {cpu_us:.0f} us per change"
                )
            else:
                worker.start()
            wait_until_ready([worker])
            wait_for(lambda: confirmed_lsn(source, slot) is not None, timeout=60, message="capture started")
            written, captured, applied = backlog_rates(worker, source, slot, args.changes)
            print(
                f"all stages at once, backlog of {args.changes} changes: written {written:,.0f}/s, captured {captured:,.0f}/s, "
                f"applied to replica + Redis + index {applied:,.0f}/s"
            )
            stop = threading.Event()
            load = threading.Thread(target=steady_load, args=(source, args.rate, stop))
            load.start()
            try:
                redis_lags, replica_lags = probe_lags(source, replica, rds.url, args.seconds)
            finally:
                stop.set()
                load.join()
            print(f"commit -> visible at {args.rate} changes/s: Redis {percentiles(redis_lags)}; replica {percentiles(replica_lags)}")
        finally:
            worker.stop()
            if service is not None:
                service.terminate()
                service.wait(timeout=30)


if __name__ == "__main__":
    main()
