"""A throwaway Redis server for integration tests.

Usage::

    with ThrowawayRedis() as rs:
        client = redis.asyncio.Redis.from_url(rs.url)

The server listens on a free port on 127.0.0.1, persists nothing and runs
from a temporary directory that is removed on exit.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from tests.support.ports import free_port

__all__ = ["ThrowawayRedis"]

HOST = "127.0.0.1"
START_ATTEMPTS = 3
LOG_TAIL_LINES = 30


def _send_command(port: int, command: bytes, timeout: float = 1.0) -> bytes:
    """Send one inline command to Redis and return the raw reply."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(command + b"\r\n")
        try:
            return sock.recv(64)
        except (ConnectionError, socket.timeout):
            return b""


class ThrowawayRedis:
    """Context manager running a private ``redis-server`` on a free port.

    Attributes:
        port: TCP port the server listens on (127.0.0.1).
        url: ``redis://127.0.0.1:PORT/0``.
        base_dir: temporary working directory (also holds ``redis.log``).
    """

    def __init__(self, start_timeout: float = 10.0) -> None:
        """Prepare (but do not start) the server."""
        self.start_timeout = start_timeout
        self.port: int = 0
        self.base_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """Redis URL for database 0."""
        return f"redis://{HOST}:{self.port}/0"

    def __enter__(self) -> "ThrowawayRedis":
        """Start the server and wait for PING."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found on PATH: install redis-server")
        self.base_dir = Path(tempfile.mkdtemp(prefix="streamspine-redis-"))
        try:
            self._start_on_free_port(binary)
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Stop the server and remove the temporary directory."""
        self._cleanup()

    def stop(self) -> None:
        """Stop the server: SHUTDOWN NOSAVE, then terminate/kill as fallback."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            _send_command(self.port, b"SHUTDOWN NOSAVE")
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """Return the last ``lines`` lines of the server output."""
        if self.base_dir is None:
            return ""
        path = self.base_dir / "redis.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _start_on_free_port(self, binary: str) -> None:
        """Start on a free port, retrying if the port was taken meanwhile."""
        error: RuntimeError | None = None
        for _ in range(START_ATTEMPTS):
            self.port = free_port(HOST)
            try:
                self._spawn(binary)
                self._wait_for_ping()
                return
            except RuntimeError as exc:
                error = exc
                self.stop()
        assert error is not None
        raise error

    def _spawn(self, binary: str) -> None:
        """Launch redis-server in the foreground as a child process."""
        assert self.base_dir is not None
        if self._log is None:
            self._log = open(self.base_dir / "redis.log", "ab")
        self._proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", HOST,
             "--save", "", "--appendonly", "no", "--dir", str(self.base_dir),
             "--daemonize", "no"],
            cwd=self.base_dir, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    def _wait_for_ping(self) -> None:
        """Wait until the server answers PING with PONG."""
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self._proc.returncode} on port "
                    f"{self.port}\n--- server log tail ---\n{self.log_tail()}"
                )
            try:
                if _send_command(self.port, b"PING").startswith(b"+PONG"):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(
            f"redis-server on port {self.port} did not answer PING within "
            f"{self.start_timeout}s\n--- server log tail ---\n{self.log_tail()}"
        )

    def _cleanup(self) -> None:
        """Stop the server, close the log and remove the temp dir."""
        try:
            self.stop()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            if self.base_dir is not None:
                shutil.rmtree(self.base_dir, ignore_errors=True)
                self.base_dir = None
