"""``make run``: the local broker (unless KAFKA_BROKER is set), one worker and demo traffic.

Ctrl-C stops everything this started.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import List

from app.local_broker import LocalBroker, worker_env_defaults
from app.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
FAUST = Path(sys.executable).with_name("faust")


def wait_for_health(url: str, worker: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited with {worker.returncode}; see its log above")
        try:
            with urllib.request.urlopen(url + "/ready/", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the worker did not become ready within {timeout:.0f}s")


def print_urls(web: str, broker_url: str) -> None:
    print(
        f"""
streamspine is running (KAFKA_BROKER={broker_url})
  {web}/ui/                          the live dashboard
  {web}/health/                      liveness
  {web}/metrics                      Prometheus exposition
  {web}/ready/                       readiness (table recovery complete)
  {web}/metrics/services/cart/       latest metric values of a service
  {web}/table/metrics_latest/cart/   the same, from Faust's built-in table view
  {web}/dead-letters/metrics/        malformed records sent to metrics.dlq
  {web}/logs/stats/cart/             log lines per level, current and previous minute
  {web}/logs/recent/cart/?level=warn latest log lines of a service
  {web}/recommendations/u7/?k=5      recommendations for a demo shopper
  {web}/migration/status/            the V1 -> V2 migration's phase, comparison and bridge
  {web}/router/                      which worker owns which table partitions
Ctrl-C stops everything.
""",
        flush=True,
    )


def main() -> None:
    settings = load_settings()
    broker = None
    processes: List[subprocess.Popen] = []
    env = dict(os.environ)
    if "KAFKA_BROKER" not in os.environ:
        broker = LocalBroker(port=int(os.environ.get("LOCAL_BROKER_PORT", 9092))).start()
        env["KAFKA_BROKER"] = broker.url
        env.update(worker_env_defaults(os.environ))
        if "DATA_DIR" not in os.environ:
            # The local broker keeps topics in memory: table state from an earlier run would
            # describe changelogs that no longer exist, so every run starts with empty tables.
            env["DATA_DIR"] = str(ROOT / "data" / "dev")
            shutil.rmtree(env["DATA_DIR"], ignore_errors=True)
        print(f"local broker listening on {broker.bootstrap}", flush=True)
    bootstrap = env["KAFKA_BROKER"].split("://", 1)[1].split(",")[0]
    try:
        worker = subprocess.Popen([str(FAUST), "-A", "app", "worker", "-l", "info"], cwd=ROOT, env=env)
        processes.append(worker)
        wait_for_health(settings.web_url, worker)
        processes.append(subprocess.Popen([sys.executable, "-m", "app.demo", "--bootstrap", bootstrap], cwd=ROOT, env=env))
        print_urls(settings.web_url, env["KAFKA_BROKER"])
        while all(process.poll() is None for process in processes):
            time.sleep(0.5)
        print("a process exited; stopping the rest", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGINT if process is processes[0] else signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    main()
