"""A throwaway PostgreSQL server for integration tests.

Usage::

    with ThrowawayPostgres() as pg:
        with psycopg.connect(pg.dsn()) as conn:
            ...

The server runs from a fresh temporary data directory on a free port on
127.0.0.1, with ``wal_level=logical`` so logical replication (pgoutput) works.
PostgreSQL refuses to run as root, so when the current process is root the
server binaries are run as an unprivileged system user via ``runuser``.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Sequence

import psycopg
from psycopg import sql

from tests.support.ports import free_port

__all__ = ["ThrowawayPostgres", "find_pg_bin_dir"]

PG_ROOT = "/usr/lib/postgresql"
FALLBACK_USER = "streamspine-pg"
PREFERRED_USER = "postgres"
SUPERUSER = "postgres"
HOST = "127.0.0.1"
START_ATTEMPTS = 3
LOG_TAIL_LINES = 40


def _version_key(path: str) -> tuple[int, ...]:
    """Sort key turning ``/usr/lib/postgresql/15/bin`` into ``(15,)``."""
    version = Path(path).parent.name
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)


def find_pg_bin_dir(root: str = PG_ROOT) -> Path:
    """Return the bin dir of the highest PostgreSQL version under ``root``.

    Falls back to ``initdb`` on ``PATH``. Raises RuntimeError if not found.
    """
    candidates = [
        d for d in glob.glob(os.path.join(root, "*", "bin"))
        if os.access(os.path.join(d, "initdb"), os.X_OK)
    ]
    if candidates:
        return Path(max(candidates, key=_version_key))
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise RuntimeError(
        f"initdb not found under {root}/*/bin or on PATH: install postgresql"
    )


def _ensure_service_user() -> str:
    """Return an unprivileged user to run PostgreSQL as (root only).

    Uses the ``postgres`` system user if it exists, else creates
    ``streamspine-pg`` with ``useradd --system``.
    """
    for name in (PREFERRED_USER, FALLBACK_USER):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    if shutil.which("useradd") is None:
        raise RuntimeError(
            "running as root, no 'postgres' user and useradd not found: "
            "install passwd or create an unprivileged user"
        )
    result = subprocess.run(
        ["useradd", "--system", "--no-create-home",
         "--shell", "/usr/sbin/nologin", FALLBACK_USER],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"useradd {FALLBACK_USER} failed: {result.stderr.strip()}"
        )
    return FALLBACK_USER


class ThrowawayPostgres:
    """Context manager running a private PostgreSQL server on a free port.

    Attributes:
        port: TCP port the server listens on (127.0.0.1).
        base_dir: temporary directory holding data dir, socket and log.
        bin_dir: directory holding initdb/pg_ctl.
        startup_seconds: wall time of the last successful start.
    """

    def __init__(self, bin_dir: str | os.PathLike[str] | None = None,
                 start_timeout: float = 30.0) -> None:
        """Prepare (but do not start) the server.

        Args:
            bin_dir: PostgreSQL bin directory; found automatically if None.
            start_timeout: seconds to wait for the server to accept connections.
        """
        self._bin_dir_arg = bin_dir
        self.start_timeout = start_timeout
        self.bin_dir: Path | None = None
        self.base_dir: Path | None = None
        self.port: int = 0
        self.startup_seconds: float = 0.0
        self._run_as: str | None = None
        self._running = False

    # -- context manager -------------------------------------------------

    def __enter__(self) -> "ThrowawayPostgres":
        """Create the cluster and start the server."""
        try:
            self._setup()
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Stop the server and remove the temporary directory."""
        self._cleanup()

    # -- public API --------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self._base() / "data"

    @property
    def log_file(self) -> Path:
        """The server log written by ``pg_ctl -l``."""
        return self._base() / "server.log"

    def dsn(self, dbname: str = "postgres") -> str:
        """Return a libpq URL for ``dbname`` as the trusted superuser."""
        return f"postgresql://{SUPERUSER}@{HOST}:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its DSN."""
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def start(self) -> None:
        """Start the server (no-op if running) and wait until it accepts connections."""
        if self._running:
            return
        began = time.monotonic()
        self._pg_ctl("start", "-w", "-t", str(int(self.start_timeout)),
                     "-l", str(self.log_file), "-o", self._server_options())
        self._running = True
        self._wait_until_ready()
        self.startup_seconds = time.monotonic() - began

    def stop(self) -> None:
        """Stop the server with ``pg_ctl stop -m fast`` (no-op if stopped)."""
        if not self._running:
            return
        self._pg_ctl("stop", "-w", "-m", "fast")
        self._running = False

    def restart(self) -> None:
        """Stop and start again on the same port with the same data."""
        self.stop()
        self.start()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """Return the last ``lines`` lines of the server log ('' if none)."""
        if self.base_dir is None or not self.log_file.exists():
            return ""
        text = self.log_file.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # -- internals -----------------------------------------------------------

    def _base(self) -> Path:
        """Return base_dir or fail if the context was not entered."""
        if self.base_dir is None:
            raise RuntimeError("ThrowawayPostgres is not set up; use it as a context manager")
        return self.base_dir

    def _setup(self) -> None:
        """Locate binaries, create the temp dir, initdb and start."""
        self.bin_dir = Path(self._bin_dir_arg) if self._bin_dir_arg else find_pg_bin_dir()
        for tool in ("initdb", "pg_ctl"):
            if not os.access(self.bin_dir / tool, os.X_OK):
                raise RuntimeError(f"{tool} not found in {self.bin_dir}: install postgresql")
        if os.geteuid() == 0:
            self._run_as = _ensure_service_user()
            if shutil.which("runuser") is None:
                raise RuntimeError("running as root but runuser not found: install util-linux")
        self._make_base_dir()
        self._initdb()
        self._start_on_free_port()

    def _make_base_dir(self) -> None:
        """Create the temp dir, owned by the service user when running as root."""
        parent = "/tmp" if self._run_as and os.path.isdir("/tmp") else None
        self.base_dir = Path(tempfile.mkdtemp(prefix="streamspine-pg-", dir=parent))
        if self._run_as:
            user = pwd.getpwnam(self._run_as)
            os.chown(self.base_dir, user.pw_uid, user.pw_gid)

    def _initdb(self) -> None:
        """Initialise a fresh cluster in ``data_dir``."""
        self._run(self._tool("initdb"), "-D", str(self.data_dir), "-A", "trust",
                  "-U", SUPERUSER, "--no-sync", "-E", "UTF8", "--locale=C",
                  what="initdb")

    def _start_on_free_port(self) -> None:
        """Start on a free port, retrying if another process grabbed it."""
        error: RuntimeError | None = None
        for _ in range(START_ATTEMPTS):
            self.port = free_port(HOST)
            try:
                self.start()
                return
            except RuntimeError as exc:
                error = exc
                self._force_stop()
        assert error is not None
        raise error

    def _server_options(self) -> str:
        """Return the ``-o`` options passed to the postgres server."""
        return (f"-c listen_addresses={HOST} -p {self.port} -c wal_level=logical "
                f"-c max_replication_slots=10 -c max_wal_senders=10 "
                f"-c unix_socket_directories={self._base()} -c fsync=off")

    def _wait_until_ready(self) -> None:
        """Poll with psycopg until a connection succeeds or time runs out."""
        deadline = time.monotonic() + self.start_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                last_error = exc
                time.sleep(0.1)
        raise RuntimeError(
            f"PostgreSQL on port {self.port} did not accept connections within "
            f"{self.start_timeout}s: {last_error}\n--- server log tail ---\n{self.log_tail()}"
        )

    def _tool(self, name: str) -> str:
        """Return the full path of a PostgreSQL binary."""
        assert self.bin_dir is not None
        return str(self.bin_dir / name)

    def _pg_ctl(self, *args: str) -> None:
        """Run ``pg_ctl -D data_dir <args>``."""
        self._run(self._tool("pg_ctl"), "-D", str(self.data_dir), *args,
                  what=f"pg_ctl {args[0]}")

    def _command(self, argv: Sequence[str]) -> list[str]:
        """Wrap ``argv`` with runuser when running as root."""
        if self._run_as:
            return ["runuser", "-u", self._run_as, "--", *argv]
        return list(argv)

    def _run(self, *argv: str, what: str) -> None:
        """Run a command; raise RuntimeError with output and log tail on failure."""
        result = subprocess.run(
            self._command(argv), cwd=self._base(), stdin=subprocess.DEVNULL,
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise RuntimeError(
                f"{what} failed (exit {result.returncode}): {output}\n"
                f"--- server log tail ---\n{self.log_tail()}"
            )

    def _force_stop(self) -> None:
        """Best-effort immediate stop, ignoring errors."""
        if self.base_dir is None or not (self.data_dir / "postmaster.pid").exists():
            self._running = False
            return
        subprocess.run(
            self._command([self._tool("pg_ctl"), "-D", str(self.data_dir),
                           "stop", "-w", "-m", "immediate"]),
            cwd=self.base_dir, stdin=subprocess.DEVNULL,
            capture_output=True, check=False,
        )
        self._running = False

    def _cleanup(self) -> None:
        """Stop the server (fast, then immediate) and remove the temp dir."""
        try:
            if self._running:
                try:
                    self.stop()
                except RuntimeError:
                    self._force_stop()
            else:
                self._force_stop()
        finally:
            if self.base_dir is not None:
                shutil.rmtree(self.base_dir, ignore_errors=True)
                self.base_dir = None
