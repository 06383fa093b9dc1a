"""Run real ``faust -A app worker`` processes, each with its own data dir and web port."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from app.local_broker import worker_env_defaults
from tests.support.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
FAUST = Path(sys.executable).with_name("faust")


def http_get(url: str, timeout: float = 5.0) -> Tuple[int, Any]:
    """GET a JSON page; returns (status, decoded body) also for 4xx/5xx answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body or b"null")
        except json.JSONDecodeError:
            return error.code, body.decode(errors="replace")


def http_post(url: str, body: Any, headers: Optional[Mapping[str, str]] = None, timeout: float = 5.0) -> Tuple[int, Any]:
    """POST JSON; returns (status, decoded body)."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


class WorkerProcess:
    """One worker process; ``env`` adds or overrides environment variables."""

    def __init__(
        self, broker_url: str, work_dir: Path, *, app_id: str,
        env: Optional[Mapping[str, str]] = None, port: Optional[int] = None,
    ) -> None:
        self.port = port or free_port()
        self.work_dir = work_dir
        self.log_path = work_dir / "worker.log"
        self.env = {
            **os.environ,
            **worker_env_defaults(os.environ),  # the tests run against the local broker
            "KAFKA_BROKER": broker_url,
            "APP_ID": app_id,
            "DATA_DIR": str(work_dir / "data"),
            "STORE": "rocksdb://",
            "WEB_HOST": "127.0.0.1",
            "WEB_PORT": str(self.port),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "WorkerProcess":
        if not FAUST.exists():
            raise RuntimeError(f"faust CLI not found at {FAUST}: install the project (make test does)")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(FAUST), "-A", "app", "worker", "-l", "info"],
                cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    def get(self, path: str) -> Tuple[int, Any]:
        return http_get(self.url + path)

    def is_ready(self) -> bool:
        try:
            return self.get("/ready/")[0] == 200
        except OSError:
            return False

    def assert_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"worker on port {self.port} exited: {self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Stop the worker (SIGTERM: clean shutdown; SIGKILL: a crash)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def wait_until_ready(workers: List[WorkerProcess], timeout: float = 90.0, settle: float = 2.0) -> None:
    """Wait until every worker answers /ready/ with 200 continuously for ``settle`` seconds."""
    deadline = time.monotonic() + timeout
    ready_since: Optional[float] = None
    while time.monotonic() < deadline:
        for worker in workers:
            worker.assert_alive()
        if all(worker.is_ready() for worker in workers):
            ready_since = ready_since or time.monotonic()
            if time.monotonic() - ready_since >= settle:
                return
        else:
            ready_since = None
        time.sleep(0.25)
    tails = "\n\n".join(f"--- worker {w.port}\n{w.log_tail()}" for w in workers)
    raise TimeoutError(f"workers not ready within {timeout}s\n{tails}")


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.25, message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"{message} not reached within {timeout}s (last: {last!r})")


def environment_with(**overrides: str) -> Dict[str, str]:
    """The current environment with some variables set."""
    return {**os.environ, **overrides}
