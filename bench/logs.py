"""Throughput and delay of the logging pipeline on a real worker, in one run.

    python bench/logs.py [--records 200000] [--batched-records 3000] [--rate 2000] [--probes 300]

Against a local broker and the in-repo Elasticsearch-compatible server (tests/support/es_server.py,
in a thread of this process; the official client on the worker side) it prints:
1. the ceiling: a bare agent of this project's Faust setup that only iterates a topic (records/s),
   bench/compare.py's ``streamspine-bare`` variant on the same broker;
2. lines/s indexed by one ``faust -A app worker`` from a backlog of one-line JSON records
   (also as a share of the ceiling);
3. lines/s indexed from a backlog of records of 100 lines (JSON arrays);
4. p50/p99 delay from producing a line to its document arriving at the search server, while lines
   flow at ``--rate`` lines/s.

Each rate runs from the first record (or document) seen to the last, so what the consumer fetched
before the first one is seen comes free: the backlogs are long enough (a ceiling run of several
seconds) that this does not decide the rate. With 60,000 records the ceiling ran about 1.2 s and
measured 10-15 % above its steady rate, and the drains swung by as much.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import compare  # noqa: E402
from aiokafka import AIOKafkaProducer  # noqa: E402
from metrics import Worker, bare_ceiling, percentile, rate_until  # noqa: E402

from app import settings  # noqa: E402  (the settings the ceiling and the worker read from the same environment)
from app.local_broker import LocalBroker  # noqa: E402
from tests.support.es_server import ElasticsearchTestServer  # noqa: E402

SERVICES = [f"svc-{i}" for i in range(10)]
LEVELS = ["info"] * 8 + ["warn", "error"]


def line(i: int, now: float) -> Dict:
    return {"ts": now, "level": LEVELS[i % len(LEVELS)], "message": f"request {i} handled in {i % 97} ms",
            "trace_id": f"{i:016x}", "host": f"node-{i % 4}", "route": "/api/orders"}


def backlog(records: int, per_record: int, start: int) -> Iterator[Tuple[bytes, bytes]]:
    now = time.time()
    for i in range(records):
        service = SERVICES[i % len(SERVICES)]
        lines = [line(start + i * per_record + j, now) for j in range(per_record)]
        yield service.encode(), json.dumps(lines[0] if per_record == 1 else lines).encode()


async def produce_backlog(bootstrap: str, records: int, per_record: int, start: int) -> None:
    # Big batches, so the backlog is there faster than the worker drains it (no restart follows,
    # so the local broker's watermark quirk with multi-record batches does not matter here).
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    try:
        await compare.send_all(producer, "logs", backlog(records, per_record, start))
    finally:
        await producer.stop()


class IndexedCounter:
    """Counts documents as the search server stores them, and when each probe line arrived. Only
    the server's thread writes; the benchmark's thread reads."""

    def __init__(self) -> None:
        self.count = 0
        self.probe_arrivals: Dict[str, float] = {}

    def __call__(self, index: str, doc_id: str, doc: Dict) -> None:
        self.count += 1
        labels = doc.get("labels")
        if labels and "probe" in labels:
            self.probe_arrivals.setdefault(labels["probe"], time.monotonic())


def drain_rate(counter: IndexedCounter, target: int, worker: Worker) -> float:
    """Lines/s from the first document stored to the ``target``-th."""
    return rate_until(worker, lambda: counter.count, target, "lines indexed", poll=0.02)


async def delays(bootstrap: str, counter: IndexedCounter, rate: float, probes: int) -> List[float]:
    """Seconds from producing each probe line to its document stored, under ``rate`` lines/s."""
    # Batched as a shipper sends (what arrives within 2 ms): one request per record would make the
    # local broker the bottleneck at this rate (2,000 produce requests/s took 110 % of a core).
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2)
    await producer.start()
    sent: Dict[str, float] = {}
    try:
        interval, started, tick = 0.05, time.perf_counter(), 0
        per_tick = max(1, int(rate * interval))
        while len(sent) < probes:
            now = time.time()
            for j in range(per_tick):
                service = SERVICES[(tick * per_tick + j) % len(SERVICES)]
                record = line(tick * per_tick + j, now)
                if j == 0:
                    probe = uuid.uuid4().hex
                    record["probe"] = probe
                    sent[probe] = time.monotonic()
                await producer.send("logs", json.dumps(record).encode(), key=service.encode())
            tick += 1
            await asyncio.sleep(max(0.0, started + tick * interval - time.perf_counter()))
        deadline = time.monotonic() + 60
        while len(counter.probe_arrivals) < probes and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        await producer.stop()
    return sorted(counter.probe_arrivals[p] - sent[p] for p in sent if p in counter.probe_arrivals)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000, help="one-line records (and the ceiling's)")
    parser.add_argument("--batched-records", type=int, default=3000, help="records of 100 lines")
    parser.add_argument("--rate", type=float, default=2000, help="lines/s in the delay phase")
    parser.add_argument("--probes", type=int, default=300, help="lines to time in the delay phase")
    args = parser.parse_args()
    work_dir = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    worker: Optional[Worker] = None
    counter = IndexedCounter()
    try:
        with LocalBroker() as broker, ElasticsearchTestServer.in_thread() as search:
            search.on_write = counter
            ceiling = bare_ceiling(broker, work_dir / "ceiling", args.records)
            os.environ["ELASTICSEARCH_URL"] = search.url
            worker = Worker(broker, work_dir, REPO / "app" / "alert_rules.yaml")
            worker.wait_ready()
            asyncio.run(produce_backlog(broker.bootstrap, args.records, 1, 0))
            single = drain_rate(counter, args.records, worker)
            asyncio.run(produce_backlog(broker.bootstrap, args.batched_records, 100, args.records))
            batched = drain_rate(counter, args.records + args.batched_records * 100, worker)
            latencies = asyncio.run(delays(broker.bootstrap, counter, args.rate, args.probes))
    finally:
        if worker is not None:
            worker.stop()
        shutil.rmtree(work_dir, ignore_errors=True)
    print(f"command: python bench/logs.py --records {args.records} --batched-records {args.batched_records} "
          f"--rate {args.rate:g} --probes {args.probes}  ({os.cpu_count()} cores, local broker, in-repo search server, "
          f"CONSUMER_FETCH_WAIT_MS={settings.consumer_fetch_wait_ms})")
    print(f"bare agent ceiling (streamspine-bare)       {ceiling:10,.0f} records/s")
    print(f"indexed, one line per record                {single:10,.0f} lines/s  ({single / ceiling:.0%} of the ceiling)")
    print(f"indexed, 100 lines per record               {batched:10,.0f} lines/s")
    if latencies:
        print(f"line -> stored document at {args.rate:g} lines/s: p50 {percentile(latencies, 50) * 1000:.0f} ms, "
              f"p99 {percentile(latencies, 99) * 1000:.0f} ms ({len(latencies)} of {args.probes} probes)")
    else:
        print("no probe line arrived: see the worker log")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
