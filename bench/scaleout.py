"""Aggregate throughput of 1, 2 and 4 worker processes of bench/compare.py's counting app.

    python bench/scaleout.py [--records 200000] [--partitions 8] [--keys 1000] [--workers 1,2,4]
                             [--bootstrap host:port] [--no-shim]

One topic of ``--partitions`` partitions is filled with N records first. Each round then starts
that many worker processes of the ``streamspine-runtime`` app of bench/compare.py (the jobs'
pattern: decoded_batches + one table write per key per batch, RocksDB table with changelog) in
ONE consumer group, fresh for the round. The workers wait until the group is formed (every worker
holds some partitions, together all of them) so no rebalance falls inside the measurement, then
count. The rate is N from the first record any worker counted to the last one any worker counted.
The check: the sum of the per-key table counts over the workers must be N; more is reported as
duplicates (at-least-once), less as lost.

``--worker`` (with ``--app-id``, ``--topic``, ``--work-dir``, ...) is the subprocess mode.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import (  # noqa: E402  (bench/ is not a package)
    REPO,
    Meter,
    add_runtime_counting_agent,
    broker_at,
    create_topic,
    faust_app,
    log_tail,
    produce,
    runtime_topic,
    stop_process_group,
)

PROGRESS_INTERVAL = 0.25  # seconds between two progress files of a worker
QUIET_AFTER_N = 2.0  # seconds without a new record after N before the counts are final


# --------------------------------------------------------------------------------------------
# Worker side: compare.py's counting app under a shared app id, reporting progress to a file.


class Progress(Meter):
    """Counts this worker's records (wall-clock times, comparable across processes); never ends
    the process: the parent decides when the group is done."""

    def __init__(self) -> None:
        self.count = 0
        self.first: Optional[float] = None
        self.last: Optional[float] = None

    def add(self, n: int = 1) -> bool:
        now = time.time()
        if self.first is None:
            self.first = now
        self.last = now
        self.count += n
        return False


def run_worker(args: argparse.Namespace) -> int:
    """One worker: the streamspine-runtime app, gated until the parent creates ``go``."""
    import faust

    args.variant = "streamspine-runtime"
    args.work_dir.mkdir(parents=True, exist_ok=True)
    app = faust_app(args)
    topic = runtime_topic(app, args)
    go, stop, progress_path = args.control / "go", args.control / "stop", args.progress
    progress, assigned = Progress(), {"partitions": []}

    async def group_formed() -> None:
        while not go.exists():
            await asyncio.sleep(0.05)

    counts = add_runtime_counting_agent(app, topic, progress, args, gate=group_formed)

    @app.on_partitions_assigned.connect
    async def remember_assignment(sender: Any, tps: Set[Any], **kwargs: Any) -> None:
        assigned["partitions"] = sorted(tp.partition for tp in tps if tp.topic == args.topic)

    @app.timer(PROGRESS_INTERVAL)
    async def report() -> None:
        state = {"pid": os.getpid(), "count": progress.count, "first": progress.first, "last": progress.last,
                 "assigned": assigned["partitions"], "total": None}
        if stop.exists():  # the counts are final: read this worker's (active) table partitions
            state["total"] = sum(counts.values())
        tmp = progress_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(progress_path)

    faust.Worker(app, loglevel="info", quiet=True).execute_from_commandline()
    return 1


# --------------------------------------------------------------------------------------------
# Parent side: broker, topic, rounds of 1, 2, 4 workers, the table.


@dataclass
class Round:
    """One round's outcome."""

    workers: int
    load: float
    startup: float = 0.0
    rate: float = 0.0
    counted: int = 0
    total: int = 0
    error: Optional[str] = None


def read_progress(paths: List[Path]) -> List[Dict[str, Any]]:
    states = []
    for path in paths:
        with contextlib.suppress(OSError, ValueError):
            states.append(json.loads(path.read_text()))
    return states


def group_formed(states: List[Dict[str, Any]], workers: int, partitions: int) -> bool:
    """Every worker holds some partitions of the topic, and together exactly all of them."""
    held = [state["assigned"] for state in states]
    flat = [p for partitions_of in held for p in partitions_of]
    return len(states) == workers and all(held) and sorted(flat) == list(range(partitions))


def wait_until(condition: Any, timeout: float, what: str, processes: List[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if any(process.poll() is not None for process in processes):
            raise RuntimeError(f"a worker exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout:.0f}s")
        time.sleep(0.05)


def run_round(workers: int, args: argparse.Namespace, bootstrap: str, topic: str, workdir: Path) -> Round:
    """Start ``workers`` processes in one fresh group, wait for the group, let them count N, read the counts."""
    result = Round(workers, os.getloadavg()[0])
    round_dir = workdir / f"round-{workers}"
    control = round_dir / "control"
    control.mkdir(parents=True)
    app_id = f"scaleout-{workers}w-{uuid.uuid4().hex[:8]}"
    paths = [round_dir / f"progress-{i}.json" for i in range(workers)]
    logs = [round_dir / f"worker-{i}.log" for i in range(workers)]
    processes: List[subprocess.Popen] = []
    started = time.monotonic()
    try:
        for i in range(workers):
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--app-id", app_id, "--topic", topic,
                       "--bootstrap", bootstrap, "--partitions", str(args.partitions),
                       "--work-dir", str(round_dir / f"worker-{i}"), "--control", str(control), "--progress", str(paths[i])]
            with open(logs[i], "wb") as log:
                processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                  start_new_session=True, cwd=REPO))
        wait_until(lambda: group_formed(read_progress(paths), workers, args.partitions), 180, "formed group", processes)
        result.startup = time.monotonic() - started
        (control / "go").touch()
        wait_until(lambda: sum(s["count"] for s in read_progress(paths)) >= args.records,
                   60 + args.records / 500, f"{args.records} records counted", processes)
        quiet_since = time.time()
        wait_until(lambda: time.time() - max(s["last"] or 0 for s in read_progress(paths)) >= QUIET_AFTER_N
                   and time.time() - quiet_since >= QUIET_AFTER_N, 120, "quiet group", processes)
        (control / "stop").touch()
        wait_until(lambda: all(s["total"] is not None for s in read_progress(paths)) and len(read_progress(paths)) == workers,
                   30, "final counts", processes)
        states = read_progress(paths)
        first = min(s["first"] for s in states if s["first"])
        last = max(s["last"] for s in states if s["last"])
        result.rate = args.records / (last - first)
        result.counted = sum(s["count"] for s in states)
        result.total = sum(s["total"] for s in states)
    except RuntimeError as error:
        result.error = f"{error}; logs {round_dir}:\n" + "\n".join(log_tail(path, 8) for path in logs)
    finally:
        for process in processes:
            stop_process_group(process)
    return result


def check_text(result: Round, records: int) -> str:
    if result.total == records:
        return "OK"
    if result.total > records:
        return f"OK at-least-once: {result.total - records} duplicates"
    return f"LOST {records - result.total}"


def format_rounds(rounds: List[Round], records: int) -> str:
    base = next((r.rate for r in rounds if r.workers == 1 and not r.error), None)
    header = f"{'workers':>7} {'records/s':>10} {'x 1 worker':>10} {'counted':>9} {'table sum':>9} {'group s':>7} {'load':>5}  check"
    rows = [header, "-" * len(header)]
    for r in rounds:
        if r.error:
            rows.append(f"{r.workers:>7}  FAILED: {r.error.splitlines()[0]}")
            continue
        ratio = f"{r.rate / base:.2f}" if base else "-"
        rows.append(f"{r.workers:>7} {r.rate:>10,.0f} {ratio:>10} {r.counted:>9,} {r.total:>9,} {r.startup:>7.1f} "
                    f"{r.load:>5.2f}  {check_text(r, records)}")
    return "\n".join(rows)


def scaleout(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="streamspine-scaleout-"))
    rounds: List[Round] = []
    try:
        with broker_at(args.bootstrap, workdir, shim=not args.no_shim) as bootstrap:
            topic = f"scaleout-{uuid.uuid4().hex[:10]}"
            asyncio.run(create_topic(bootstrap, topic, args.partitions))
            seconds = asyncio.run(produce(bootstrap, topic, args.records, args.keys))
            print(f"produced {args.records:,} records ({args.keys} keys) to {topic} ({args.partitions} partitions) "
                  f"on {bootstrap} in {seconds:.1f}s", flush=True)
            for workers in (int(n) for n in args.workers.split(",")):
                result = run_round(workers, args, bootstrap, topic, workdir)
                rounds.append(result)
                print(f"  {workers} worker(s): " + (f"{result.rate:,.0f} rec/s" if not result.error else f"FAILED\n{result.error}"),
                      flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print("command: " + " ".join(shlex.quote(a) for a in ["python", *sys.argv]))
    print(f"{os.cpu_count()} cores; load: 1-min load average when the round started. records/s: N from the "
          f"first record counted to the last, over all workers; group s: start -> group formed (not in the rate).")
    print()
    print(format_rounds(rounds, args.records))
    return 1 if any(r.error or r.total < args.records for r in rounds) else 0


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--records", type=int, default=200_000, help="records to produce and count (N)")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--keys", type=int, default=1000, help="size of the key space")
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts, one round each")
    parser.add_argument("--bootstrap", help="host:port of an existing broker (default: start a local one)")
    parser.add_argument("--no-shim", action="store_true",
                        help="clients reach Tansu directly, not through app/local_broker.py's ApiVersions shim")
    child = parser.add_argument_group("subprocess mode (used by the parent)")
    child.add_argument("--worker", action="store_true")
    child.add_argument("--app-id")
    child.add_argument("--topic")
    child.add_argument("--work-dir", type=Path)
    child.add_argument("--control", type=Path, help="folder of the go/stop files")
    child.add_argument("--progress", type=Path)
    args = parser.parse_args(argv)
    # compare.py's app builder reads its experiment knobs: the project's values here
    args.commit_every = args.producer_buffer_max = args.batch_max = args.batch_within = 0
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: kill, stop, clean
    return scaleout(args)


if __name__ == "__main__":
    raise SystemExit(main())
