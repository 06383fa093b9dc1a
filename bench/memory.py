"""Memory of one real worker under a steady load: does its RSS level off?

    python bench/memory.py [--duration 660] [--rate 600] [--keys 200 | --keys 0] [--sample-every 15]
                           [--profile 60 [--gauges-only]] [--env NAME=VALUE ...]

Starts a local broker and one ``faust -A app worker``, then for ``--duration`` seconds sends
``--rate`` records/s spread evenly over the job topics: metric samples (``metrics``), log lines
(``logs``), user events (``user-events``) and V1 orders (``orders.v1``). Keys (services, users,
items, orders) come from a fixed set of ``--keys`` of each, or with ``--keys 0`` each record
brings new ones (ever-new keys). Every ``--sample-every`` seconds it samples the worker's RSS
(psutil) and the consumer group's lag on those topics (so growth from falling behind is told
apart from growth of state). With ``--profile N`` the worker runs app/memory.py's profiler
(``MEMORY_PROFILE=N``): every N seconds a tracemalloc comparison with a baseline taken once the
worker is up, plus the size of every bounded structure (gauges); the last report's top growth
sites are printed. tracemalloc's snapshots add to the RSS they measure: ``--gauges-only`` reports
RSS and the gauges without tracing (the figures to compare). ``--env`` passes settings to the
worker (e.g. ``--env ROCKSDB_CACHE_MB=64``).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import compare  # noqa: E402
import psutil  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402
from metrics import Worker  # noqa: E402

from app.local_broker import WORKER_ENV, LocalBroker, free_port  # noqa: E402

TOPICS = ("metrics", "logs", "user-events", "orders.v1")
METRIC_NAMES = ("cpu", "memory", "latency_ms")
LEVELS = ["info"] * 8 + ["warn", "error"]
EVENT_KINDS = ["view"] * 6 + ["click"] * 3 + ["add_to_cart", "purchase"]
MIB = 1024 * 1024
TICK = 0.05  # seconds between two rounds of sends


class KeySet:
    """Key numbers: cycling over ``size`` of them, or a new one every time (``size`` 0)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent = 0

    def next(self) -> int:
        self.sent += 1
        return self.sent if self.size == 0 else self.sent % self.size


def metric_record(k: int, i: int, now: float) -> Tuple[bytes, Dict]:
    service = f"svc-{k}"
    return service.encode(), {
        "service": service,
        "instance": f"{service}-{i % 3}",
        "metric": METRIC_NAMES[i % 3],
        "value": 0.3 + (i % 7) / 100,
        "ts": now,
    }


def log_record(k: int, i: int, now: float) -> Tuple[bytes, Dict]:
    return f"svc-{k}".encode(), {
        "ts": now,
        "level": LEVELS[i % len(LEVELS)],
        "message": f"request {i} handled in {i % 97} ms",
        "trace_id": f"{i:016x}",
        "host": f"node-{i % 4}",
        "route": "/api/orders",
    }


def user_record(k: int, i: int, now: float, items: KeySet) -> Tuple[bytes, Dict]:
    user = f"u{k}"
    return user.encode(), {"user_id": user, "item_id": f"sku-{items.next()}", "event": EVENT_KINDS[i % len(EVENT_KINDS)], "ts": now}


def order_record(k: int, i: int, now: float) -> Tuple[bytes, Dict]:
    order = f"o-{k}"
    return order.encode(), {
        "schema_version": 2,
        "event_id": f"e-{i}",
        "id": order,
        "customer": f"c-{k % 97}",
        "total": f"{10 + i % 50}.25",
        "currency": "EUR",
        "status": "PAID",
        "created_at": "2024-11-01T10:00:00Z",
    }


async def steady_load(bootstrap: str, rate: float, keys: int, duration: float, sent: List[int]) -> None:
    """``rate`` records/s for ``duration`` seconds, the topics in turn; ``sent[0]`` counts them."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    key_sets = {topic: KeySet(keys) for topic in TOPICS}
    items = KeySet(keys)
    per_tick, started, tick = max(1, round(rate * TICK)), time.perf_counter(), 0
    try:
        while time.perf_counter() - started < duration:
            now = time.time()
            for _ in range(per_tick):
                i = sent[0]
                topic = TOPICS[i % len(TOPICS)]
                k = key_sets[topic].next()
                if topic == "metrics":
                    key, value = metric_record(k, i, now)
                elif topic == "logs":
                    key, value = log_record(k, i, now)
                elif topic == "user-events":
                    key, value = user_record(k, i, now, items)
                else:
                    key, value = order_record(k, i, now)
                await producer.send(topic, json.dumps(value).encode(), key=key)
                sent[0] += 1
            tick += 1
            await asyncio.sleep(max(0.0, started + tick * TICK - time.perf_counter()))
        await producer.flush()
    finally:
        await producer.stop()


@dataclass
class Sample:
    elapsed: float
    rss: int
    lag: Optional[int]
    cpu: float  # share of one core since the sample before
    sent: int


@dataclass
class Run:
    samples: List[Sample] = field(default_factory=list)
    reports: List[Dict] = field(default_factory=list)


async def group_lag(group_view: AIOKafkaConsumer) -> Optional[int]:
    """Records of the job topics the worker's group has not committed yet (None before it commits).
    ``group_view`` is a consumer of the worker's group that never joins it (it only reads offsets;
    the local broker's answer to the admin client's OffsetFetch does not parse)."""
    await group_view.topics()  # fresh metadata: the partitions of every topic
    partitions = [TopicPartition(topic, p) for topic in TOPICS for p in (group_view.partitions_for_topic(topic) or ())]
    if not partitions:
        return None
    end_offsets = await group_view.end_offsets(partitions)
    committed = {tp: await group_view.committed(tp) for tp in partitions}
    if not any(committed.values()):
        return None
    return sum(end - (committed[tp] or 0) for tp, end in end_offsets.items())


async def sample_worker(bootstrap: str, group: str, pid: int, every: float, until: float, sent: List[int], run: Run) -> None:
    """RSS, CPU and lag of the worker every ``every`` seconds until ``until`` (monotonic)."""
    process = psutil.Process(pid)
    group_view = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await group_view.start()
    started = time.monotonic()
    cpu_before, at_before = sum(process.cpu_times()[:2]), started
    try:
        while True:
            now = time.monotonic()
            cpu = sum(process.cpu_times()[:2])
            try:
                lag = await group_lag(group_view)
            except Exception:  # noqa: BLE001 - the group may not exist yet
                lag = None
            run.samples.append(
                Sample(now - started, process.memory_info().rss, lag, (cpu - cpu_before) / max(now - at_before, 1e-9), sent[0])
            )
            cpu_before, at_before = cpu, now
            if now >= until:
                return
            await asyncio.sleep(min(every, max(0.0, until - time.monotonic())))
    finally:
        await group_view.stop()


async def load_and_sample(args: argparse.Namespace, bootstrap: str, worker: Worker, group: str) -> Run:
    run, sent = Run(), [0]
    until = time.monotonic() + args.duration
    await asyncio.gather(
        steady_load(bootstrap, args.rate, args.keys, args.duration, sent),
        sample_worker(bootstrap, group, worker.process.pid, args.sample_every, until, sent, run),
    )
    return run


class MemoryWorker(Worker):
    """bench/metrics.py's worker, with this run's settings (and the profiler when asked)."""

    def __init__(self, broker: LocalBroker, work_dir: Path, env: Dict[str, str]) -> None:
        import subprocess

        self.port = free_port()
        self.log = work_dir / "worker.log"
        self.data_dir = work_dir / "data"
        self.app_id = f"bench-memory-{uuid.uuid4().hex[:6]}"
        full_env = {
            **os.environ,
            **WORKER_ENV,
            "KAFKA_BROKER": broker.url,
            "APP_ID": self.app_id,
            "DATA_DIR": str(self.data_dir),
            "WEB_PORT": str(self.port),
            **env,
        }
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [str(Path(sys.executable).with_name("faust")), "-A", "app", "worker", "-l", "info"],
                cwd=REPO,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def profile_reports(self) -> List[Dict]:
        path = self.data_dir / "memory-profile.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def at(samples: List[Sample], seconds: float) -> Sample:
    """The sample nearest to ``seconds`` into the run."""
    return min(samples, key=lambda sample: abs(sample.elapsed - seconds))


def slope_mib_per_min(samples: List[Sample], since: float) -> float:
    """Least-squares RSS growth (MiB/min) of the samples from ``since`` seconds on."""
    points = [(s.elapsed / 60, s.rss / MIB) for s in samples if s.elapsed >= since]
    if len(points) < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    var = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0


def describe(args: argparse.Namespace, run: Run, reports: List[Dict], worker_env: Dict[str, str]) -> str:
    samples = run.samples
    keys = "ever-new keys" if args.keys == 0 else f"{args.keys} keys per kind"
    settings = " ".join(f"{name}={value}" for name, value in sorted(worker_env.items())) or "defaults"
    lines = [
        f"command: python bench/memory.py --duration {args.duration:g} --rate {args.rate:g} --keys {args.keys} "
        f"--sample-every {args.sample_every:g} --profile {args.profile:g}"
        + (" --gauges-only" if args.gauges_only else "")
        + "".join(f" --env {name}={value}" for name, value in sorted(worker_env.items())),
        f"  ({os.cpu_count()} cores, local broker, {keys}, worker settings: {settings})",
        f"sent {samples[-1].sent:,} records in {samples[-1].elapsed:.0f} s ({samples[-1].sent / max(samples[-1].elapsed, 1):,.0f}/s)",
        "   t(s)   RSS(MiB)   lag(records)   worker CPU",
    ]
    for sample in samples:
        lag = "-" if sample.lag is None else f"{sample.lag:,}"
        lines.append(f"{sample.elapsed:7.0f} {sample.rss / MIB:10.1f} {lag:>14} {sample.cpu:10.0%}")
    marks = [
        (label, at(samples, seconds))
        for label, seconds in (("start", 0), ("1 min", 60), ("5 min", 300), ("10 min", 600))
        if seconds <= samples[-1].elapsed + args.sample_every
    ]
    lines.append(
        "RSS "
        + ", ".join(f"{label} {sample.rss / MIB:.0f} MiB" for label, sample in marks)
        + f", end {samples[-1].rss / MIB:.0f} MiB; growth after 5 min {slope_mib_per_min(samples, 300):+.2f} MiB/min, "
        f"minutes 1-5 {slope_mib_per_min([s for s in samples if s.elapsed <= 300], 60):+.2f} MiB/min"
    )
    if reports:
        first, last = reports[0], reports[-1]
        traced = f"traced Python heap {first['traced'] / MIB:.1f} -> {last['traced'] / MIB:.1f} MiB" if last["traced"] else "gauges only"
        lines.append(
            f"profiler: {len(reports)} reports, {traced} (first at {first['uptime']:.0f} s of uptime, last at {last['uptime']:.0f} s)"
        )
        lines.append("gauges (first report -> last):")
        for name, value in last["gauges"].items():
            lines.append(f"  {name:48} {first['gauges'].get(name, float('nan')):>14,.0f} -> {value:14,.0f}")
        if last["sites"]:
            lines.append("top growth sites since the baseline (last report):")
        for site in last["sites"][: args.top]:
            lines.append(f"  {site['size_diff'] / 1024:+10.0f} KiB {site['count_diff']:+9d} blocks  {site['site']}")
    return "\n".join(lines)


def parse_env(pairs: List[str]) -> Dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--env wants NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=660, help="seconds of load")
    parser.add_argument("--rate", type=float, default=600, help="records/s over all four topics")
    parser.add_argument("--keys", type=int, default=200, help="keys per kind (services, users, items, orders); 0: ever-new")
    parser.add_argument("--sample-every", type=float, default=15, help="seconds between RSS samples")
    parser.add_argument("--profile", type=float, default=0, help="MEMORY_PROFILE of the worker: seconds between heap reports (0: off)")
    parser.add_argument("--profile-frames", type=int, default=1, help="MEMORY_PROFILE_FRAMES: frames kept per allocation")
    parser.add_argument(
        "--gauges-only",
        action="store_true",
        help="MEMORY_PROFILE_TRACE=false: reports of RSS and gauges, no tracemalloc (whose snapshots add to RSS)",
    )
    parser.add_argument("--top", type=int, default=15, help="growth sites printed")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE passed to the worker")
    parser.add_argument("--json", type=Path, help="also write the samples and reports here")
    args = parser.parse_args()
    worker_env = parse_env(args.env)
    env = dict(worker_env)
    if args.profile:
        env.update(
            MEMORY_PROFILE=f"{args.profile:g}",
            MEMORY_PROFILE_FRAMES=str(args.profile_frames),
            MEMORY_PROFILE_TRACE=str(not args.gauges_only).lower(),
        )
    work_dir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    worker: Optional[MemoryWorker] = None
    try:
        with LocalBroker() as broker:
            worker = MemoryWorker(broker, work_dir, env)
            worker.wait_ready()
            run = asyncio.run(load_and_sample(args, broker.bootstrap, worker, worker.app_id))
            if worker.process.poll() is not None:
                raise RuntimeError(f"worker exited:\n{compare.log_tail(worker.log)}")
            reports = worker.profile_reports()
    finally:
        if worker is not None:
            worker.stop()
        shutil.rmtree(work_dir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"samples": [s.__dict__ for s in run.samples], "reports": reports}))
    print(describe(args, run, reports, worker_env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
