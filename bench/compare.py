"""Consumer throughput of this project's Faust setup next to Quix Streams, Bytewax, raw aiokafka and stock Faust.

    python bench/compare.py [--records 100000] [--partitions 4] [--keys 1000] [--repeat 1]
                            [--bootstrap host:port] [--no-shim] [--variants quix,bytewax,streamspine-runtime]

One run produces ONE fresh topic (small JSON records, keys from a bounded key space) on a local
broker started here (or on ``--bootstrap``), then measures every variant in a subprocess of its own
with a consumer group of its own: records/s from the first record to the Nth record, counted after
partition assignment (start-up is reported apart). Stateful variants also count the time to get
their state out (Faust: producer flush of the changelog; Quix: the forced checkpoint commit;
Bytewax keeps its state in memory) and report the sum of their per-key counts, which must equal N.
Every variant reaches the broker the same way (through the local broker's shim, or with
``--no-shim`` all directly). bench/README.md explains the numbers.

``--variant NAME`` (with ``--topic``, ``--bootstrap``, ``--work-dir``, ``--result``) is the
subprocess mode the parent uses; it can be run by hand, e.g. under py-spy.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import operator
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VARIANTS: Dict[str, str] = {
    "aiokafka": "raw aiokafka getmany loop: json.loads + count in a dict",
    "quix": "Quix Streams: per-key count in RocksDB state, changelog on",
    "bytewax": "Bytewax: Kafka input, stateful_map per-key count (state in memory, no recovery store)",
    "bytewax-recovery": "same, with a recovery store: state snapshots in SQLite at every 1 s epoch",
    "faust-bare": "stock Faust (kafka://, default settings): agent only iterates",
    "faust-table": "stock Faust: RocksDB table, table[key] += 1 per record",
    "streamspine-bare": "faust_settings() + streamspine:// transport: agent only iterates",
    "streamspine-runtime": "the jobs' pattern: app.runtime.decoded_batches (orjson) + fold per key per partition, "
                           "one RocksDB table write per key per batch under until_applied",
}
PEERS = ("quix", "bytewax")  # the ratio columns
STATEFUL = {"quix", "bytewax", "bytewax-recovery", "faust-table", "streamspine-runtime"}
RETENTION = {"retention.ms": "604800000", "retention.bytes": "-1"}  # Tansu needs both for Quix


# --------------------------------------------------------------------------------------------
# Subprocess side: one variant, one consumer group, one RESULT file.


class Meter:
    """Counts records from the first one seen and writes the result file when N is reached."""

    def __init__(self, variant: str, target: int, result_path: Path) -> None:
        self.variant = variant
        self.target = target
        self.result_path = result_path
        self.started = time.perf_counter()
        self.count = 0
        self.first: Optional[float] = None
        self.cpu_first = 0.0
        self.reached_at: Optional[float] = None

    def add(self, n: int = 1) -> bool:
        """Count ``n`` records; True exactly once, when the target is reached."""
        if self.first is None:
            self.first = time.perf_counter()
            self.cpu_first = time.process_time()
        before = self.count
        self.count += n
        if before < self.target <= self.count:
            self.reached_at = time.perf_counter()
            return True
        return False

    def finish(self, total: Optional[int] = None, **extra: Any) -> None:
        """Write the result (the end is now: after any flush/commit) and end the process at once."""
        end = time.perf_counter()
        assert self.first is not None and self.reached_at is not None
        elapsed = end - self.first
        result = {
            "variant": self.variant,
            "records": self.count,
            "elapsed": elapsed,
            "rate": self.count / elapsed,
            "rate_to_nth": self.count / (self.reached_at - self.first),
            "flush": end - self.reached_at,
            "startup": self.first - self.started,
            "cpu": (time.process_time() - self.cpu_first) / elapsed,
            "total": total,
            **extra,
        }
        self.result_path.write_text(json.dumps(result))
        os._exit(0)  # a benchmark process: skip the graceful shutdown, the parent cleans up


def run_aiokafka(args: argparse.Namespace, meter: Meter) -> None:
    """aiokafka's own consumer loop, the floor under any Python Kafka framework here."""
    from aiokafka import AIOKafkaConsumer

    async def consume() -> None:
        consumer = AIOKafkaConsumer(
            args.topic, bootstrap_servers=args.bootstrap, group_id=f"bench-aiokafka-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest", enable_auto_commit=False,
        )
        await consumer.start()
        counts: Dict[bytes, int] = {}
        while True:
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                for record in records:
                    json.loads(record.value)
                    counts[record.key] = counts.get(record.key, 0) + 1
                if meter.add(len(records)):
                    meter.finish(total=sum(counts.values()))

    asyncio.run(consume())


def run_quix(args: argparse.Namespace, meter: Meter) -> None:
    """Quix Streams: stateful count (RocksDB state with changelog topic, the defaults)."""
    from quixstreams import Application
    from quixstreams.processing.context import ProcessingContext

    app = Application(
        broker_address=args.bootstrap, consumer_group=f"bench-quix-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest", state_dir=str(args.work_dir / "quix-state"), loglevel="INFO",
        consumer_extra_config={"session.timeout.ms": 6000},  # as the Faust variants; 45 s default joins slowly
    )
    last_count: Dict[bytes, int] = {}

    def count(value: Any, key: bytes, timestamp: int, headers: Any, state: Any) -> None:
        total = state.get("count", 0) + 1
        state.set("count", total)
        last_count[key] = total
        if meter.add(1):
            app.stop()  # the loop ends after this record; Quix then force-commits its checkpoint

    commit_checkpoint = ProcessingContext.commit_checkpoint

    def timed_commit(self: Any, force: bool = False, revoking: bool = False) -> None:
        commit_checkpoint(self, force=force, revoking=revoking)
        if force and meter.reached_at is not None:  # state flushed to RocksDB + changelog produced
            meter.finish(total=sum(last_count.values()))

    ProcessingContext.commit_checkpoint = timed_commit  # type: ignore[method-assign]  # timing only
    topic = app.topic(args.topic, value_deserializer="json", key_deserializer="bytes")
    app.dataframe(topic).update(count, stateful=True, metadata=True)
    app.run()
    raise SystemExit("quix: application stopped before its final checkpoint commit")


def run_bytewax(args: argparse.Namespace, meter: Meter) -> None:
    """Bytewax's stateful count: its Kafka input (librdkafka), ``stateful_map`` keyed by the record
    key, one worker; the state lives in memory, or (``bytewax-recovery``) is snapshotted to its
    SQLite recovery store at the end of every 1 s epoch (the last epoch's snapshot is not timed)."""
    from datetime import timedelta

    import bytewax.operators as op
    from bytewax._bytewax import cli_main
    from bytewax.connectors.kafka import operators as kop
    from bytewax.dataflow import Dataflow

    last_count: Dict[bytes, int] = {}

    def count(total: Optional[int], value: bytes) -> Tuple[int, int]:
        json.loads(value)
        total = (total or 0) + 1
        return total, total

    def seen(key: str, total: int) -> None:
        last_count[key] = total
        if meter.add(1):
            meter.finish(total=sum(last_count.values()))

    flow = Dataflow(f"bench-bytewax-{uuid.uuid4().hex[:8]}")
    source = kop.input("kafka", flow, brokers=[args.bootstrap], topics=[args.topic],
                       add_config={"group.id": f"bench-bytewax-{uuid.uuid4().hex[:8]}"})
    keyed = op.map("key", source.oks, lambda message: (message.key.decode(), message.value))
    counted = op.stateful_map("count", keyed, count)
    op.inspect("meter", counted, lambda _step, item: seen(*item))
    if args.variant == "bytewax-recovery":
        from bytewax.recovery import RecoveryConfig, init_db_dir

        db_dir = args.work_dir / "bytewax-recovery"
        db_dir.mkdir(parents=True, exist_ok=True)
        init_db_dir(db_dir, 1)
        cli_main(flow, workers_per_process=1, epoch_interval=timedelta(seconds=1), recovery_config=RecoveryConfig(db_dir))
    else:
        cli_main(flow, workers_per_process=1)
    raise SystemExit("bytewax: the dataflow ended before the Nth record")


def faust_app(args: argparse.Namespace) -> Any:
    """The faust.App of a Faust variant: stock settings, or the project's ``faust_settings``."""
    import faust

    app_id = getattr(args, "app_id", None) or f"bench-{args.variant}-{uuid.uuid4().hex[:8]}"
    data_dir = args.work_dir / "faust-data"
    if args.variant.startswith("streamspine"):
        from app.local_broker import free_port
        from app.settings import Settings, faust_settings

        settings = Settings(
            kafka_broker=f"kafka://{args.bootstrap}", app_id=app_id, data_dir=data_dir, web_port=free_port(),
            topic_partitions=args.partitions, store="rocksdb://", fast_consumer=True,
            # Anything else (e.g. PRODUCER_MAX_BATCH_SIZE) from the environment, as the worker does.
        )
        conf = {**faust_settings(settings), "web_enabled": False}
        if args.commit_every:  # experiment: Faust's inline commit every N acknowledged records
            conf["broker_commit_every"] = args.commit_every
        return faust.App(app_id, **conf)
    return faust.App(
        app_id, broker=f"kafka://{args.bootstrap}", datadir=str(data_dir), web_enabled=False,
        topic_partitions=args.partitions, store="rocksdb://" if args.variant == "faust-table" else "memory://",
        broker_session_timeout=6.0, broker_rebalance_timeout=6.0, broker_heartbeat_interval=1.0,
    )


def add_iterating_agent(app: Any, topic: Any, meter: Meter) -> None:
    """faust-bare, streamspine-bare: an agent that only iterates its stream."""
    @app.agent(topic)
    async def iterate(stream: Any) -> None:
        async for _value in stream:
            if meter.add(1):
                meter.finish()


def add_counting_agent(app: Any, topic: Any, meter: Meter, args: argparse.Namespace) -> None:
    """Stock Faust's per-record ``table[key] += 1`` in a RocksDB table."""
    counts = app.Table("counts", default=int, partitions=args.partitions, key_type=bytes, value_type=int)

    @app.agent(topic)
    async def count_naive(stream: Any) -> None:
        async for event in stream.events():
            counts[event.key] += 1
            if meter.add(1):
                await app.producer.flush()  # the changelog records of the last writes are out
                meter.finish(total=sum(counts.values()))


def runtime_topic(app: Any, args: argparse.Namespace) -> Any:
    """The topic as the jobs declare theirs (app/topics.py's ``raw_topic``): raw bytes, read in
    batches (a ``BatchTopic``: each partition's fetched records reach the agent at once)."""
    from app.transport import BatchTopic

    return BatchTopic(app, topics=[args.topic], key_type=bytes, value_type=bytes, key_serializer="raw",
                      value_serializer="raw", partitions=args.partitions)


def add_runtime_counting_agent(app: Any, topic: Any, meter: Meter, args: argparse.Namespace,
                               gate: Optional[Callable[[], Awaitable[None]]] = None) -> Any:
    """The jobs' pattern (agents/metrics.py, agents/migration.py): app/runtime.py's
    ``decoded_batches`` decodes each value with orjson (a failure would be a dead letter), the
    batch is folded per key per partition and each key written once, under ``until_applied``.
    ``gate`` is awaited before the first record (bench/scaleout.py: until the group is formed).
    Returns the counts table."""
    import orjson

    from app.aggregation import BATCH_MAX, BATCH_WITHIN, fold_deltas, write_deltas
    from app.runtime import Decoded, decoded_batches, until_applied

    counts = app.Table("counts", default=int, partitions=args.partitions, key_type=bytes, value_type=int)
    if args.producer_buffer_max:  # experiment: the conductor stalls while more changelog sends than this wait
        app.producer.buffer.max_messages = args.producer_buffer_max
    tally = {"batches": 0, "writes": 0}

    def decode(event: Any) -> Any:
        return orjson.loads(event.value)

    async def count_batch(stream: Any, batch: List[Decoded[Any]]) -> int:
        # A count has no offset guard: a retry would count twice. Writes to the local store do not
        # fail here; a job's body keeps the highest applied offset per key to be idempotent.
        pending = fold_deltas(((entry.event, ((entry.event.key, 1),)) for entry in batch), combine=operator.add)
        return write_deltas(stream, counts, pending, apply=operator.add)

    @app.agent(topic)
    async def count_batched(stream: Any) -> None:
        if gate is not None:
            await gate()
        async for batch in decoded_batches(stream, decode, max_=args.batch_max or BATCH_MAX,
                                           within=args.batch_within or BATCH_WITHIN):
            tally["writes"] += await until_applied(count_batch, stream, batch, what="bench counts")
            tally["batches"] += 1
            if meter.add(len(batch)):
                await app.producer.flush()
                meter.finish(total=sum(counts.values()), **tally)

    return counts


def run_faust(args: argparse.Namespace, meter: Meter) -> None:
    """Faust variants: one agent on the topic, run by a Faust worker at log level info."""
    import faust

    app = faust_app(args)
    if args.variant == "streamspine-runtime":  # the jobs' topics are raw bytes, decoded by the runtime
        add_runtime_counting_agent(app, runtime_topic(app, args), meter, args)
    else:
        topic = app.topic(args.topic, key_type=bytes, value_serializer="json", partitions=args.partitions)
        if args.variant == "faust-table":
            add_counting_agent(app, topic, meter, args)
        else:
            add_iterating_agent(app, topic, meter)
    # loglevel "info": Faust's default (WARN) keeps its spinner, which sets the root logger to DEBUG.
    faust.Worker(app, loglevel="info", quiet=True).execute_from_commandline()


RUNNERS: Dict[str, Callable[[argparse.Namespace, Meter], None]] = {
    "aiokafka": run_aiokafka,
    "quix": run_quix,
    "bytewax": run_bytewax,
    "bytewax-recovery": run_bytewax,
    "faust-bare": run_faust,
    "faust-table": run_faust,
    "streamspine-bare": run_faust,
    "streamspine-runtime": run_faust,
}


def run_variant(args: argparse.Namespace) -> int:
    """Subprocess entry: measure one variant and write its result file."""
    args.work_dir.mkdir(parents=True, exist_ok=True)
    RUNNERS[args.variant](args, Meter(args.variant, args.records, args.result))
    return 1  # the runners end the process when done


# --------------------------------------------------------------------------------------------
# Parent side: broker, topic, data, one subprocess per variant, the report.


@dataclass
class Result:
    """One variant's measurement in one repeat (``error`` set when it failed)."""

    variant: str
    repeat: int
    data: Dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None

    @property
    def rate(self) -> Optional[float]:
        return self.data.get("rate") if self.error is None else None


def require_peers(variants: List[str]) -> None:
    """Quix Streams and Bytewax are benchmark-only dependencies; stop with a clear line when one is missing."""
    modules = {"quix": "quixstreams", "bytewax": "bytewax", "bytewax-recovery": "bytewax"}
    missing = [module for variant, module in modules.items()
               if variant in variants and importlib.util.find_spec(module) is None]
    if missing:
        print(f"bench/compare.py needs {' and '.join(missing)} (the 'bench' extra): run `make bench`, "
              "which installs it with pip install -e '.[dev,bench]'", file=sys.stderr)
        raise SystemExit(2)


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    """Create the source topic with explicit retention configs."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1, topic_configs=RETENTION)])
    finally:
        await admin.close()


async def send_all(producer: Any, topic: str, records: Iterable[Tuple[bytes, bytes]], chunk: int = 5000) -> None:
    """Send (key, value) records, waiting for acknowledgements every ``chunk`` records."""
    pending = []
    for key, value in records:
        pending.append(await producer.send(topic, value, key=key))
        if len(pending) >= chunk:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)


async def produce(bootstrap: str, topic: str, records: int, keys: int) -> float:
    """Produce ``records`` small JSON records keyed ``k0..k{keys-1}``; returns seconds taken."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=262144)
    await producer.start()
    started = time.perf_counter()
    try:
        await send_all(producer, topic, (
            (f"k{i % keys}".encode(), json.dumps({"id": i, "user": f"u{i % keys}", "amount": i % 17}).encode())
            for i in range(records)
        ))
    finally:
        await producer.stop()
    return time.perf_counter() - started


def stop_process_group(process: subprocess.Popen) -> None:
    """Terminate a child started in its own session (and anything it started), then kill it."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a child's log."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def measure(variant: str, repeat: int, args: argparse.Namespace, bootstrap: str, topic: str, workdir: Path) -> Result:
    """Run one variant in its own subprocess and read its result file."""
    run_dir = workdir / f"{variant}-{repeat}"
    result_path, log_path = run_dir / "result.json", workdir / f"{variant}-{repeat}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--topic", topic,
               "--bootstrap", bootstrap, "--records", str(args.records), "--partitions", str(args.partitions),
               "--work-dir", str(run_dir), "--result", str(result_path),
               "--batch-max", str(args.batch_max), "--batch-within", str(args.batch_within),
               "--producer-buffer-max", str(args.producer_buffer_max),
               "--commit-every", str(args.commit_every)]
    timeout = args.timeout or 60 + args.records / 1000
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            stop_process_group(process)
    if result_path.exists():
        return Result(variant, repeat, json.loads(result_path.read_text()))
    reason = f"no result within {timeout:.0f}s" if process.returncode in (-signal.SIGTERM, -signal.SIGKILL) else f"exit {process.returncode}"
    return Result(variant, repeat, error=f"{reason}; log {log_path}:\n{log_tail(log_path)}")


def check_text(result: Result, records: int) -> str:
    """The correctness column: stateful variants must count every record exactly once."""
    total = result.data.get("total")
    if total is None:
        return "-"
    mark = "OK" if total == records else "WRONG"
    writes = result.data.get("writes")
    batches = f", {writes:,} writes in {result.data['batches']} batches" if writes is not None else ""
    return f"sum={total} {mark}{batches}"


def ratio_text(rate: float, peer_rate: Optional[float]) -> str:
    return f"{rate / peer_rate:.2f}" if peer_rate else "-"


def format_table(results: List[Result], records: int) -> str:
    """A plain-text table: one row per variant and repeat, ratios to Quix and Bytewax of the same repeat."""
    peer_rates = {peer: {r.repeat: r.rate for r in results if r.variant == peer and r.rate} for peer in PEERS}
    header = f"{'variant':<23} {'rep':>3} {'records/s':>10} {'x Quix':>7} {'x Bwax':>7} {'to Nth/s':>9} {'flush s':>7} " \
             f"{'startup s':>9} {'cpu %':>5} {'cpu us/rec':>10}  check"
    rows = [header, "-" * len(header)]
    for r in results:
        if r.error:
            rows.append(f"{r.variant:<23} {r.repeat:>3}  FAILED: {r.error.splitlines()[0]}")
            continue
        d = r.data
        ratios = " ".join(f"{ratio_text(d['rate'], peer_rates[peer].get(r.repeat)):>7}" for peer in PEERS)
        rows.append(f"{r.variant:<23} {r.repeat:>3} {d['rate']:>10,.0f} {ratios} {d['rate_to_nth']:>9,.0f} "
                    f"{d['flush']:>7.3f} {d['startup']:>9.1f} {100 * d['cpu']:>5.0f} {cpu_per_record(d):>10.1f}  "
                    f"{check_text(r, records)}")
    return "\n".join(rows)


def cpu_per_record(data: Dict[str, Any]) -> float:
    """Process CPU time (all threads) per record, in microseconds: steadier than records/s when
    other jobs share the cores, but blind to waiting."""
    return 1e6 * data["cpu"] * data["elapsed"] / data["records"]


def format_medians(results: List[Result], variants: List[str]) -> str:
    """Median records/s per variant over the repeats, with its ratios to Quix's and Bytewax's medians."""
    medians = {v: statistics.median(rates) for v in variants
               if (rates := [r.rate for r in results if r.variant == v and r.rate])}
    cpu = {v: statistics.median(cpu_per_record(r.data) for r in results if r.variant == v and r.rate)
           for v in medians}
    lines = [f"{'variant':<23} {'median rec/s':>12} {'x Quix':>7} {'x Bwax':>7} {'median cpu us/rec':>17}"]
    for variant, rate in medians.items():
        ratios = " ".join(f"{ratio_text(rate, medians.get(peer)):>7}" for peer in PEERS)
        lines.append(f"{variant:<23} {rate:>12,.0f} {ratios} {cpu[variant]:>17.1f}")
    return "\n".join(lines)


def machine_note(load_before: float) -> str:
    """What the numbers were measured on; other jobs may share the cores."""
    return (f"machine: {platform.machine()} {platform.system()} {platform.release()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}; load avg (1 min) {load_before:.2f} before, "
            f"{os.getloadavg()[0]:.2f} after. Other jobs may share these cores: compare ratios within one run, "
            f"and repeat (--repeat) before trusting a difference.")


@contextlib.contextmanager
def broker_at(bootstrap: Optional[str], workdir: Path, shim: bool = True) -> Iterator[str]:
    """Yield ``host:port`` of the given broker, or of a local one started (and stopped) here."""
    if bootstrap:
        yield bootstrap
        return
    from app.local_broker import LocalBroker

    broker = LocalBroker(log_path=workdir / "tansu.log", shim=shim)
    try:
        broker.start()
        yield broker.bootstrap
    finally:
        broker.stop()


def compare(args: argparse.Namespace) -> int:
    """The whole run: broker, one fresh topic, every variant (in order, ``--repeat`` times), report."""
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    require_peers(variants)
    load_before = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="streamspine-bench-"))
    results: List[Result] = []
    try:
        with broker_at(args.bootstrap, workdir, shim=not args.no_shim) as bootstrap:
            topic = f"bench-{uuid.uuid4().hex[:10]}"
            asyncio.run(create_topic(bootstrap, topic, args.partitions))
            seconds = asyncio.run(produce(bootstrap, topic, args.records, args.keys))
            print(f"produced {args.records:,} records ({args.keys} keys) to {topic} "
                  f"({args.partitions} partitions) on {bootstrap} in {seconds:.1f}s", flush=True)
            for repeat in range(1, args.repeat + 1):
                for variant in variants:
                    result = measure(variant, repeat, args, bootstrap, topic, workdir)
                    results.append(result)
                    print(f"  {variant:<23} rep {repeat}: "
                          + (f"{result.rate:,.0f} rec/s" if result.rate else f"FAILED\n{result.error}"), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print("command: " + " ".join(shlex.quote(a) for a in ["python", *sys.argv]))
    print(machine_note(load_before))
    print("records/s: first record -> Nth record, plus (stateful) the flush/commit of the state; "
          "'to Nth/s' excludes that flush. cpu us/rec: process CPU time (all threads) per record.")
    print()
    print(format_table(results, args.records))
    if args.repeat > 1:
        print()
        print(format_medians(results, variants))
    print()
    for variant in variants:
        print(f"  {variant:<23} {VARIANTS[variant]}")
    failed = [r for r in results if r.error or (r.variant in STATEFUL and r.data.get("total") != args.records)]
    return 1 if failed else 0


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--records", type=int, default=100_000, help="records to produce and consume (N)")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--keys", type=int, default=1000, help="size of the key space")
    parser.add_argument("--repeat", type=int, default=1, help="measure every variant this many times")
    parser.add_argument("--bootstrap", help="host:port of an existing broker (default: start a local one)")
    parser.add_argument("--variants", help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--timeout", type=float, default=0, help="seconds per variant (default 60 + N/1000)")
    parser.add_argument("--no-shim", action="store_true",
                        help="clients reach Tansu directly, not through app/local_broker.py's ApiVersions shim")
    tuning = parser.add_argument_group("experiments (streamspine-runtime; default: the project's values)")
    tuning.add_argument("--batch-max", type=int, default=0, help="take_events size (default app BATCH_MAX)")
    tuning.add_argument("--batch-within", type=float, default=0, help="take_events within= seconds")
    tuning.add_argument("--producer-buffer-max", type=int, default=0,
                        help="ProducerBuffer.max_messages (default app/transport.py PRODUCER_BUFFER_MAX)")
    tuning.add_argument("--commit-every", type=int, default=0,
                        help="broker_commit_every of the streamspine apps (default app/settings.py)")
    child = parser.add_argument_group("subprocess mode (used by the parent)")
    child.add_argument("--variant", choices=list(VARIANTS))
    child.add_argument("--topic")
    child.add_argument("--work-dir", type=Path)
    child.add_argument("--result", type=Path)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.variant:
        return run_variant(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: kill, stop, clean
    return compare(args)


if __name__ == "__main__":
    raise SystemExit(main())
