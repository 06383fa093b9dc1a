"""Throughput of the migration pipeline on one real worker, in one run.

    python bench/migration.py [--events 20000] [--pairs 10000]

Against a local broker started here it prints bench/metrics.py's bare-agent ceiling (how fast
this machine runs Faust right now), then, for one ``faust -A app worker``:
1. the bridge: V1 events translated to ``orders.v2`` per second, from a backlog on ``orders.v1``
   (schema 1 and 2 alternating, one event per record), each also reconciled against its V2 copy;
2. the comparison: result pairs compared per second, from a backlog of V1 and V2 results
   (one in ten V2 results carries a bug, so mismatches and samples are recorded too).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import compare  # noqa: E402
from aiokafka import AIOKafkaProducer  # noqa: E402
from metrics import Worker, bare_ceiling, rate_until  # noqa: E402

from app.local_broker import LocalBroker  # noqa: E402
from models.migration import translate  # noqa: E402


def v1_event(i: int) -> dict:
    if i % 2:
        return {"id": f"o-{i}", "customer": f"c-{i % 97}", "total_cents": 1000 + i, "status": "NEW",
                "created": "2024-11-01 10:00:00"}
    return {"schema_version": 2, "event_id": f"e-{i}", "id": f"o-{i}", "customer": f"c-{i % 97}",
            "total": f"{10 + i % 50}.25", "currency": "EUR", "status": "PAID", "created_at": "2024-11-01T10:00:00Z"}


def v1_backlog(count: int) -> Iterator[Tuple[bytes, bytes]]:
    for i in range(count):
        event = v1_event(i)
        yield event["id"].encode(), json.dumps(event).encode()


def result_pairs(count: int, side: str) -> Iterator[Tuple[bytes, bytes]]:
    for i in range(count):
        event = v1_event(i)
        if side == "v1":
            yield f"r-{i}".encode(), json.dumps(event).encode()
        else:
            v2 = translate(dict(event)).asdict()
            if i % 10 == 0:
                v2["state"] = "shipped"
            yield f"r-{i}".encode(), json.dumps(v2).encode()


async def produce(bootstrap: str, topic: str, records: Iterator[Tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    try:
        await compare.send_all(producer, topic, records)
    finally:
        await producer.stop()


def rate(worker: Worker, read: Callable[[dict], int], target: int) -> float:
    """Items/s from the first item counted by ``read(status)`` to ``target``."""
    def done() -> int:
        status = worker.get("/migration/status/")
        return read(status) if status else 0

    return rate_until(worker, done, target, "done")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000, help="V1 events for the bridge")
    parser.add_argument("--pairs", type=int, default=10000, help="result pairs to compare")
    args = parser.parse_args()
    work_dir = Path(tempfile.mkdtemp(prefix="bench-migration-"))
    worker: Optional[Worker] = None
    try:
        with LocalBroker() as broker:
            ceiling = bare_ceiling(broker, work_dir / "ceiling", 60000)
            worker = Worker(broker, work_dir, REPO / "app" / "alert_rules.yaml")
            worker.wait_ready()
            asyncio.run(produce(broker.bootstrap, "orders.v1", v1_backlog(args.events)))
            bridge = rate(worker, lambda s: s["bridge"]["translated"], args.events)
            asyncio.run(produce(broker.bootstrap, "migration.v1.results", result_pairs(args.pairs, "v1")))
            asyncio.run(produce(broker.bootstrap, "migration.v2.results", result_pairs(args.pairs, "v2")))
            compared = rate(worker, lambda s: s["compared"], args.pairs)
            status = worker.get("/migration/status/") or {}
    finally:
        if worker is not None:
            worker.stop()
        shutil.rmtree(work_dir, ignore_errors=True)
    print(f"command: python bench/migration.py --events {args.events} --pairs {args.pairs}  ({os.cpu_count()} cores, local broker)")
    print(f"bare agent ceiling (streamspine-bare)   {ceiling:10,.0f} records/s  (this machine's speed now)")
    print(f"bridge, V1 events translated to V2      {bridge:10,.0f} events/s")
    print(f"comparison, result pairs compared       {compared:10,.0f} pairs/s  "
          f"(mismatched {status.get('mismatched')}, fields {status.get('field_mismatches')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
