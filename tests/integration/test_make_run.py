"""`make run`'s entry point: broker + worker + demo traffic come up, and Ctrl-C stops them all."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil

from tests.support.ports import free_port
from tests.support.workers import REPO_ROOT, environment_with, http_get, wait_for


def test_dev_runner_serves_health_and_demo_data_then_stops_everything_on_ctrl_c(tmp_path):
    web_port, broker_port = free_port(), free_port()
    env = environment_with(WEB_PORT=str(web_port), LOCAL_BROKER_PORT=str(broker_port), DATA_DIR=str(tmp_path), STORE="rocksdb://")
    env.pop("KAFKA_BROKER", None)
    runner = subprocess.Popen(
        [sys.executable, "-m", "app.dev"], cwd=REPO_ROOT, env=env, start_new_session=True,
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
        logs = wait_for(lambda: answers("/logs/recent/cart/?limit=20"), timeout=60, message="demo log lines processed")
        assert {line["level"] for line in logs["lines"]} >= {"warn", "debug"}
        recommended = wait_for(lambda: (lambda r: r and r["items"] and r)(answers("/recommendations/u7/?k=5")), timeout=60, message="demo recommendations")
        assert all(item["item_id"].startswith("sku-") for item in recommended["items"])
        children = psutil.Process(runner.pid).children(recursive=True)
        assert len(children) >= 3  # broker, worker, demo traffic
    finally:
        os.killpg(runner.pid, signal.SIGINT)
        runner.wait(timeout=60)
    assert runner.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert not [child for child in children if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]
