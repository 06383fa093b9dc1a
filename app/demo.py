"""Demo traffic for every pipeline that exists: ``python -m app.demo`` (started by ``make run``).

Sends metric samples for a few services twice a second, with a CPU spike now and then, log lines
of every form (JSON, logfmt, plain text, JSON arrays) with an error now and then, shoppers' views,
clicks and purchases for the recommendations, and one malformed record every 30 s so the
dead-letter path can be seen working.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

from aiokafka import AIOKafkaProducer

SERVICES = {"cart": 3, "order": 2, "payment": 2}
METRICS = {"cpu": (0.35, 0.1), "memory": (0.55, 0.05), "latency_ms": (80.0, 25.0), "error_rate": (0.01, 0.005)}


def metric_samples(service: str, instances: int, spike: bool) -> list:
    """One sample of every metric for every instance of a service."""
    now = time.time()
    samples = []
    for index in range(1, instances + 1):
        for metric, (mean, spread) in METRICS.items():
            value = max(0.0, random.gauss(mean, spread))
            if spike and metric == "cpu" and index == 1:
                value = 0.97
            samples.append({"service": service, "instance": f"{service}-{index}", "metric": metric, "value": round(value, 4), "ts": now})
    return samples


def log_records(service: str, tick: int) -> list:
    """A round of log records of a service, one of each form the logging pipeline accepts."""
    now = time.time()
    level = "error" if random.random() < 0.05 else "info"
    return [
        {"ts": now, "service": service, "level": level, "message": f"handled request {tick}", "trace_id": f"{tick:016x}"},
        f'ts={now:.3f} level=warn service={service} msg="slow downstream call: {random.randint(200, 900)} ms"',
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(now))} INFO {service} cache refreshed",
        [{"ts": now, "level": "debug", "message": f"batched line {i}"} for i in range(5)],
    ]


DEMO_ITEMS = [f"sku-{i}" for i in range(40)]
EVENT_KINDS = ["view"] * 6 + ["click"] * 3 + ["add_to_cart", "purchase"]


def user_event(tick: int) -> dict:
    """A shopper's next event: items of a user's 'taste' (neighbouring skus) are seen together."""
    user = f"u{random.randint(1, 25)}"
    taste = int(user[1:]) % 8 * 5
    item = DEMO_ITEMS[(taste + min(int(random.expovariate(0.5)), 9)) % len(DEMO_ITEMS)]
    return {"user_id": user, "item_id": item, "event": random.choice(EVENT_KINDS), "ts": time.time()}


async def send_demo_traffic(bootstrap: str, interval: float, duration: float) -> None:
    # One record per batch: the local broker's high watermark is wrong for multi-record batches.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=10, max_batch_size=1)
    await producer.start()
    started = time.monotonic()
    tick = 0
    try:
        while duration <= 0 or time.monotonic() - started < duration:
            for service, instances in SERVICES.items():
                spike = service == "cart" and tick % 120 >= 100
                batch = metric_samples(service, instances, spike)
                await producer.send("metrics", json.dumps(batch).encode(), key=service.encode())
                for record in log_records(service, tick):
                    value = record.encode() if isinstance(record, str) else json.dumps(record).encode()
                    await producer.send("logs", value, key=service.encode())
            for _ in range(4):
                event = user_event(tick)
                await producer.send("user-events", json.dumps(event).encode(), key=event["user_id"].encode())
            if tick % 60 == 59:
                await producer.send("metrics", b"{this is not json", key=b"order")
                await producer.send("logs", b'{"message": "truncated', key=b"order")
            tick += 1
            await asyncio.sleep(interval)
    finally:
        await producer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka bootstrap host:port")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between rounds")
    parser.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: run until stopped)")
    args = parser.parse_args()
    try:
        asyncio.run(send_demo_traffic(args.bootstrap, args.interval, args.duration))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
