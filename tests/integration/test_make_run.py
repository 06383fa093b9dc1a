"""`make run`'s entry point: broker + worker + demo traffic come up, and Ctrl-C stops them all."""
from __future__ import annotations

import os
import signal
import subprocess
import shutil
import sys
from pathlib import Path

import psutil

from tests.support.ports import free_port
from tests.support.workers import REPO_ROOT, environment_with, http_get, wait_for


def fresh_checkout(destination: Path) -> Path:
    """The repository's tracked files as they are now, without data/ or anything a run left."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (REPO_ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, destination / name)
    return destination


def listening_addresses(process: psutil.Process, port: int) -> set:
    return {c.laddr.ip for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_dev_runner_serves_health_and_demo_data_then_stops_everything_on_ctrl_c(tmp_path):
    web_port, broker_port = free_port(), free_port()
    checkout = fresh_checkout(tmp_path / "checkout")
    assert not (checkout / "data").exists()
    env = environment_with(WEB_PORT=str(web_port), LOCAL_BROKER_PORT=str(broker_port), STORE="rocksdb://")
    for variable in ("KAFKA_BROKER", "DATA_DIR", "WEB_HOST"):
        env.pop(variable, None)
    runner = subprocess.Popen(
        [sys.executable, "-m", "app.dev"], cwd=checkout, env=env, start_new_session=True,
        stdout=open(tmp_path / "run.log", "wb"), stderr=subprocess.STDOUT,
    )
    web = f"http://127.0.0.1:{web_port}"
    try:
        def answers(path):
            try:
                status, body = http_get(web + path)
            except OSError:
                return None
            return status == 200 and body

        health = wait_for(lambda: answers("/health/"), timeout=90, message="make run health")
        assert health["status"] == "ok"
        cart = wait_for(lambda: answers("/metrics/services/cart/"), timeout=60, message="demo traffic processed")
        assert set(cart["metrics"]) >= {"cpu", "memory", "latency_ms", "error_rate"}
        def recent_levels_once_debug_and_warn_arrived():
            # The first lines processed may come before the round's JSON array of debug lines.
            logs = answers("/logs/recent/cart/?limit=20")
            levels = {line["level"] for line in logs["lines"]} if logs else set()
            return levels if levels >= {"warn", "debug"} else None

        wait_for(recent_levels_once_debug_and_warn_arrived, timeout=60, message="demo log lines of every form processed")
        recommended = wait_for(lambda: (lambda r: r and r["items"] and r)(answers("/recommendations/u7/?k=5")), timeout=60, message="demo recommendations")
        assert all(item["item_id"].startswith("sku-") for item in recommended["items"])
        children = psutil.Process(runner.pid).children(recursive=True)
        assert len(children) >= 3  # broker, worker, demo traffic
        worker = next(child for child in children if "worker" in child.cmdline())
        assert listening_addresses(worker, web_port) == {"127.0.0.1"}  # WEB_HOST's default, not 0.0.0.0
    finally:
        os.killpg(runner.pid, signal.SIGINT)
        runner.wait(timeout=60)
    assert runner.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert not [child for child in children if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]
