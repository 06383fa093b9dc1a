"""Latency of the recommendations endpoint on real workers, and event-to-updated-recommendation delay.

    python bench/recs_latency.py [--workers 2] [--sessions 3000] [--requests 5000] [--concurrency 32] [--probes 50]

Against a local broker started here:
1. loads a synthetic click-stream (models/clickstream.py, shifted to end now) into ``user-events`` and
   waits until the workers consumed it and the leader published an item model;
2. GETs ``/recommendations/{user}/?k=20`` for random users from ``--concurrency`` concurrent clients,
   spread over the workers (a request for a user another worker owns is forwarded): p50/p95/p99, req/s;
3. for ``--probes`` fresh users: sends one view and polls the endpoint until the answer reflects it
   (the strategy leaves "trending"); the delay is from before the send to the first such answer.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import aiohttp  # noqa: E402
from aiokafka import AIOKafkaProducer  # noqa: E402

import compare  # noqa: E402  (bench/compare.py: send_all)
from app.local_broker import LocalBroker  # noqa: E402
from models.clickstream import ClickstreamConfig, synthetic_events  # noqa: E402
from tests.support.workers import WorkerProcess, http_get, wait_for, wait_until_ready  # noqa: E402


PROBE_TIMEOUT = 30.0  # seconds a probe waits for its event to show


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def history(sessions: int) -> List[dict]:
    """The synthetic stream, shifted so its last event is a minute ago (inside the trending window)."""
    events = synthetic_events(ClickstreamConfig(sessions=sessions))
    shift = time.time() - 60 - events[-1]["ts"]
    return [{**event, "ts": round(event["ts"] + shift, 3)} for event in events]


async def load(bootstrap: str, events: List[dict]) -> None:
    # One record per producer batch: the local broker's watermark bug otherwise (README findings).
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, max_batch_size=1)
    await producer.start()
    try:
        await compare.send_all(producer, "user-events", ((e["user_id"].encode(), json.dumps(e).encode()) for e in events))
    finally:
        await producer.stop()


def items_with_neighbours(events: List[dict]) -> List[str]:
    """Items that share a session with another item (a session of one item gives no neighbours)."""
    by_session: dict = {}
    for event in events:
        by_session.setdefault(event["session_id"], set()).add(event["item_id"])
    return sorted({item for items in by_session.values() if len(items) > 1 for item in items})


def consumed(workers: List[WorkerProcess], last_users: List[str]) -> bool:
    """The last users' latest events are in their sessions and a model is served."""
    for user in last_users:
        status, body = http_get(f"{workers[0].url}/recommendations/{user}/?k=5")
        if status != 200 or body["strategy"] == "trending" or body["model_version"] < 1:
            return False
    return True


async def concurrent_load(urls: List[str], users: List[str], requests: int, concurrency: int) -> tuple:
    latencies: List[float] = []
    queue: asyncio.Queue = asyncio.Queue()
    for number in range(requests):
        queue.put_nowait((urls[number % len(urls)], random.choice(users)))

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            url, user = queue.get_nowait()
            started = time.perf_counter()
            async with session.get(f"{url}/recommendations/{user}/?k=20") as response:
                await response.read()
                assert response.status == 200, response.status
            latencies.append((time.perf_counter() - started) * 1000)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return latencies, requests / elapsed


async def update_delays(bootstrap: str, urls: List[str], items: List[str], probes: int) -> List[float]:
    delays: List[float] = []
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, max_batch_size=1)
    await producer.start()
    try:
        async with aiohttp.ClientSession() as session:
            for number in range(probes):
                user, url = f"probe-{uuid.uuid4().hex[:8]}", urls[number % len(urls)]
                event = {"user_id": user, "item_id": random.choice(items), "event": "view", "ts": time.time()}
                started = time.perf_counter()
                await producer.send("user-events", json.dumps(event).encode(), key=user.encode())
                while time.perf_counter() - started < PROBE_TIMEOUT:
                    async with session.get(f"{url}/recommendations/{user}/?k=20") as response:
                        if (await response.json())["strategy"] != "trending":
                            delays.append((time.perf_counter() - started) * 1000)
                            break
                else:
                    print(f"probe {user} ({event['item_id']}) not reflected within {PROBE_TIMEOUT:g} s")
    finally:
        await producer.stop()
    return delays


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=3000)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--probes", type=int, default=50)
    args = parser.parse_args()
    random.seed(1)

    work_dir = Path(tempfile.mkdtemp(prefix="recs-latency-"))
    events = history(args.sessions)
    users = sorted({event["user_id"] for event in events})
    probe_items = items_with_neighbours(events)
    workers: List[WorkerProcess] = []
    with LocalBroker() as broker:
        try:
            app_id = f"recs-latency-{uuid.uuid4().hex[:6]}"
            workers = [WorkerProcess(broker.url, work_dir / f"w{n}", app_id=app_id, env={"RECS_REFIT_INTERVAL": "5"}).start() for n in range(args.workers)]
            wait_until_ready(workers, timeout=300)  # a loaded machine takes a few rebalances
            started = time.perf_counter()
            asyncio.run(load(broker.bootstrap, events))
            last_users = list(dict.fromkeys(event["user_id"] for event in reversed(events)))[:5]
            wait_for(lambda: consumed(workers, last_users), timeout=900, interval=1.0, message="history consumed")
            print(f"{len(events)} events of {len(users)} users consumed and a model served after {time.perf_counter() - started:.1f} s "
                  f"({args.workers} worker(s), {len(events) / (time.perf_counter() - started):.0f} events/s incl. producing)")

            urls = [worker.url for worker in workers]
            asyncio.run(concurrent_load(urls, users, 500, args.concurrency))  # warm-up
            latencies, rate = asyncio.run(concurrent_load(urls, users, args.requests, args.concurrency))
            print(f"GET /recommendations/{{user}}/?k=20, {args.requests} requests, {args.concurrency} concurrent, over {len(urls)} worker(s): "
                  f"p50 {statistics.median(latencies):.1f} ms, p95 {percentile(latencies, 95):.1f} ms, p99 {percentile(latencies, 99):.1f} ms, "
                  f"{rate:.0f} req/s")
            delays = asyncio.run(update_delays(broker.bootstrap, urls, probe_items, args.probes))
            print(f"event -> updated recommendation, {len(delays)} of {args.probes} fresh users: p50 {statistics.median(delays):.1f} ms, "
                  f"p99 {percentile(delays, 99):.1f} ms, max {max(delays):.1f} ms")
        finally:
            for worker in workers:
                worker.stop()
            shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
