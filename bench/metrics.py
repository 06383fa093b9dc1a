"""Throughput and alert latency of the monitoring pipeline on a real worker, in one run.

    python bench/metrics.py [--records 60000] [--batched-records 1500] [--rate 2000] [--spikes 200]

Against a local broker started here it prints:
1. the ceiling: a bare agent of this project's Faust setup that only iterates a topic (records/s),
   measured by bench/compare.py's ``streamspine-bare`` variant on the same broker;
2. the metrics pipeline (``faust -A app worker``, default alert rules plus a spike rule) draining a
   backlog of single-sample records (records/s, also as a share of the ceiling);
3. the same with batched records of 100 samples (samples/s);
4. p50/p99 latency from producing a sample that breaks a rule to its firing alert on ``alerts``,
   while background traffic flows at ``--rate`` samples/s.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import compare  # noqa: E402  (bench/compare.py: the bare-agent ceiling)
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402

from app.local_broker import LocalBroker, free_port  # noqa: E402
from models.alerts import alert_fingerprint  # noqa: E402

SERVICES = [f"svc-{i}" for i in range(10)]
SPIKE_RULE = """
  - name: BenchSpike
    metric: spike
    aggregate: max
    window: 10s
    op: ">"
    threshold: 0.9
    severity: info
    summary: "spike on {service}/{instance}"
"""


def rules_file(work_dir: Path) -> Path:
    """The shipped default rules plus a rule that fires on the first spike sample."""
    path = work_dir / "rules.yaml"
    path.write_text((REPO / "app" / "alert_rules.yaml").read_text() + SPIKE_RULE)
    return path


def sample(service: str, index: int, now: float, metric: str = "cpu") -> Dict:
    return {"service": service, "instance": f"{service}-{index % 3}", "metric": metric, "value": 0.3 + (index % 7) / 100, "ts": now}


async def produce_backlog(bootstrap: str, records_count: int, per_record: int) -> None:
    """``records_count`` records on ``metrics``, each one sample or an array of ``per_record`` samples."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    now = time.time() - 60

    def records():
        for i in range(records_count):
            service = SERVICES[i % len(SERVICES)]
            batch = [sample(service, i * per_record + j, now + (i * per_record + j) / 1e4) for j in range(per_record)]
            yield service.encode(), json.dumps(batch[0] if per_record == 1 else batch).encode()

    try:
        await compare.send_all(producer, "metrics", records())
    finally:
        await producer.stop()


class Worker:
    """One ``faust -A app worker`` of the project."""

    def __init__(self, broker: LocalBroker, work_dir: Path, rules: Path) -> None:
        self.port = free_port()
        self.log = work_dir / "worker.log"
        env = {**os.environ, "KAFKA_BROKER": broker.url, "APP_ID": f"bench-metrics-{uuid.uuid4().hex[:6]}",
               "DATA_DIR": str(work_dir / "data"), "WEB_PORT": str(self.port), "ALERT_RULES": str(rules)}
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([str(Path(sys.executable).with_name("faust")), "-A", "app", "worker", "-l", "info"],
                                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def get(self, path: str) -> Optional[dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            return None

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited:\n{compare.log_tail(self.log)}")
            if self.get("/ready/") is not None:
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready:\n{compare.log_tail(self.log)}")

    def samples_seen(self) -> int:
        return sum((self.get(f"/metrics/services/{service}/") or {}).get("samples", 0) for service in SERVICES)

    def stop(self) -> None:
        compare.stop_process_group(self.process)


def rate_until(worker: Worker, count: Callable[[], int], target: int, what: str,
               timeout: float = 900, poll: float = 0.05) -> float:
    """Items/s from the first item ``count()`` sees to the ``target``-th; fails if the worker exits."""
    deadline = time.monotonic() + timeout
    first: Optional[Tuple[float, int]] = None
    done = 0
    while time.monotonic() < deadline:
        done = count()
        if done and first is None:
            first = (time.perf_counter(), done)
        if done >= target and first is not None:
            return (done - first[1]) / (time.perf_counter() - first[0])
        if worker.process.poll() is not None:
            raise RuntimeError(f"worker exited:\n{compare.log_tail(worker.log)}")
        time.sleep(poll)
    raise TimeoutError(f"only {done} of {target} {what}")


def drain_rate(worker: Worker, target: int, timeout: float = 600) -> float:
    """Samples/s from the first sample seen to ``target`` samples, polling the worker's pages."""
    return rate_until(worker, worker.samples_seen, target, "samples processed", timeout)


async def alert_latencies(bootstrap: str, rate: float, spikes: int) -> List[float]:
    """Seconds from producing each spike sample to its firing alert arriving on ``alerts``."""
    # A short fetch wait: the local broker holds a waiting fetch for the whole wait (app/transport.py).
    consumer = AIOKafkaConsumer("alerts", bootstrap_servers=bootstrap, auto_offset_reset="latest", group_id=None,
                                fetch_max_wait_ms=20)
    await consumer.start()
    await consumer.seek_to_end()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2)
    await producer.start()
    sent_at: Dict[str, float] = {}
    arrived: Dict[str, float] = {}

    async def background_and_spikes() -> None:
        interval, started, i = 0.05, time.perf_counter(), 0
        per_tick = max(1, int(rate * interval))
        while len(sent_at) < spikes:
            service = SERVICES[i % len(SERVICES)]
            batch = [sample(service, i * per_tick + j, time.time()) for j in range(per_tick)]
            await producer.send("metrics", json.dumps(batch).encode(), key=service.encode())
            if i % 2 == 0:
                instance = f"spike-{len(sent_at)}"
                spike = {"service": service, "instance": instance, "metric": "spike", "value": 1.0, "ts": time.time()}
                sent_at[alert_fingerprint("BenchSpike", service, instance)] = time.perf_counter()
                await producer.send("metrics", json.dumps(spike).encode(), key=service.encode())
            i += 1
            await asyncio.sleep(max(0.0, started + i * interval - time.perf_counter()))

    async def collect() -> None:
        deadline = time.monotonic() + 60 + spikes * 0.2
        while len(arrived) < spikes and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                now = time.perf_counter()
                for record in records:
                    alert = json.loads(record.value)
                    if alert["rule"] == "BenchSpike" and alert["status"] == "firing":
                        arrived.setdefault(alert["fingerprint"], now)

    try:
        await asyncio.gather(background_and_spikes(), collect())
    finally:
        await producer.stop()
        await consumer.stop()
    return sorted(arrived[fp] - sent_at[fp] for fp in arrived if fp in sent_at)


def percentile(values: List[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def bare_ceiling(broker: LocalBroker, work_dir: Path, records: int) -> float:
    """bench/compare.py's streamspine-bare variant on a fresh topic of this broker."""
    topic = f"bench-ceiling-{uuid.uuid4().hex[:6]}"
    work_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(compare.create_topic(broker.bootstrap, topic, 8))
    asyncio.run(compare.produce(broker.bootstrap, topic, records, 1000))
    args = compare.parse_args(["--records", str(records), "--partitions", "8"])
    result = compare.measure("streamspine-bare", 1, args, broker.bootstrap, topic, work_dir)
    if result.error:
        raise RuntimeError(f"ceiling run failed: {result.error}")
    return result.rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=60000, help="single-sample records")
    parser.add_argument("--batched-records", type=int, default=1500, help="records of 100 samples")
    parser.add_argument("--rate", type=float, default=2000, help="background samples/s in the latency phase")
    parser.add_argument("--spikes", type=int, default=200, help="alerts to time")
    args = parser.parse_args()
    work_dir = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    worker: Optional[Worker] = None
    try:
        with LocalBroker() as broker:
            ceiling = bare_ceiling(broker, work_dir / "ceiling", args.records)
            worker = Worker(broker, work_dir, rules_file(work_dir))
            worker.wait_ready()
            asyncio.run(produce_backlog(broker.bootstrap, args.records, 1))
            single = drain_rate(worker, args.records)
            asyncio.run(produce_backlog(broker.bootstrap, args.batched_records, 100))
            batched = drain_rate(worker, args.records + args.batched_records * 100)
            latencies = asyncio.run(alert_latencies(broker.bootstrap, args.rate, args.spikes))
    finally:
        if worker is not None:
            worker.stop()
        shutil.rmtree(work_dir, ignore_errors=True)
    print(f"command: python bench/metrics.py --records {args.records} --batched-records {args.batched_records} "
          f"--rate {args.rate:g} --spikes {args.spikes}  ({os.cpu_count()} cores, local broker)")
    print(f"bare agent ceiling (streamspine-bare)        {ceiling:10,.0f} records/s")
    print(f"metrics pipeline, single-sample records      {single:10,.0f} records/s  ({single / ceiling:.0%} of the ceiling)")
    print(f"metrics pipeline, records of 100 samples     {batched:10,.0f} samples/s")
    if latencies:
        print(f"sample -> firing alert on 'alerts' at {args.rate:g} samples/s: p50 {percentile(latencies, 50) * 1000:.0f} ms, "
              f"p99 {percentile(latencies, 99) * 1000:.0f} ms ({len(latencies)} of {args.spikes} alerts)")
    else:
        print("no spike alert arrived: see the worker log")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
