"""Memory bounds of the worker (docs/memory.md) and an opt-in heap profiler.

``MemorySettings`` holds the bounds of the worker's in-memory structures that are not a job's own:
RocksDB's shared block cache and memtable budget (app/stores.py) and the bytes of unsent records
(app/transport.py's ProducerBuffer), plus the profiler's switch. Like app/settings.py it is read
once from the environment and validated at start.

The profiler is off unless ``MEMORY_PROFILE`` is a number of seconds: then the consumer
(app/transport.py) runs ``profile_memory``, which traces Python allocations with ``tracemalloc``
(or uses the tracing ``PYTHONTRACEMALLOC`` started with the interpreter), takes a baseline once
the worker is up, and every ``MEMORY_PROFILE`` seconds (and on SIGUSR2, which then no longer
starts mode's debugger) appends one JSON line to ``DATA_DIR/memory-profile.jsonl``: RSS, traced
bytes, the sites whose allocations grew most since the baseline, and every registered gauge (the
gauge of app/gauges.py, the size of each bounded structure among them). Tracing costs CPU, and each snapshot
allocates a copy of every trace (RSS grows by it): ``MEMORY_PROFILE_TRACE=false`` reports RSS and
the gauges only. bench/memory.py reads that file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
import tracemalloc
from pathlib import Path
from typing import Any, Dict, List, Optional

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.gauges import flat_values

log = logging.getLogger(__name__)

MIB = 1024 * 1024
PROFILE_FILE = "memory-profile.jsonl"


class MemorySettings(BaseSettings):
    """Memory bounds and the profiler switch; the environment variable is the field name in upper case."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, env_ignore_empty=True)

    memory_profile: float = Field(
        0.0,
        ge=0,
        le=86400,
        description="Seconds between two heap reports to DATA_DIR/memory-profile.jsonl; 0: no profiler (tracing costs CPU and memory).",
    )
    memory_profile_top: int = Field(20, ge=1, le=500, description="Growth sites per heap report.")
    memory_profile_frames: int = Field(1, ge=1, le=100, description="Frames kept per traced allocation (1: the line).")
    memory_profile_trace: bool = Field(True, description="`false`: heap reports carry RSS and gauges only, no tracemalloc.")
    rocksdb_cache_mb: int = Field(
        128,
        ge=8,
        le=1024 * 1024,
        description="MiB of the one RocksDB block cache every table database of the worker shares (memtables are charged to it).",
    )
    rocksdb_write_buffers_mb: int = Field(
        64, ge=4, le=1024 * 1024, description="MiB all RocksDB memtables of the worker may hold together (less than ROCKSDB_CACHE_MB)."
    )
    producer_buffer_mb: int = Field(
        32,
        ge=1,
        le=64 * 1024,
        description="MiB of unsent records (mostly changelog writes) before the stream waits for the producer.",
    )
    stream_buffer_maxsize: int = Field(
        32768,
        ge=16,
        le=1_000_000,
        description="Records read and not yet processed per agent (its batch channel's queue); past it the agent's partitions are "
        "fetched no more until it catches up. Fewer: less memory under overload, and a slow agent's partitions pause sooner.",
    )

    @model_validator(mode="after")
    def _write_buffers_fit_in_cache(self) -> "MemorySettings":
        if self.rocksdb_write_buffers_mb >= self.rocksdb_cache_mb:
            raise ValueError("ROCKSDB_WRITE_BUFFERS_MB must be less than ROCKSDB_CACHE_MB (the memtables are charged to the cache)")
        return self


def load_memory_settings() -> MemorySettings:
    """Read the environment; on a bad value print one clear line and stop the process."""
    try:
        return MemorySettings()
    except ValidationError as error:
        from app.settings import describe_error

        raise SystemExit(describe_error(error)) from None


# --- the profiler ----------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where it is not available)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


SNAPSHOT_FILTERS = (
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
    tracemalloc.Filter(False, "<unknown>"),
)


def take_snapshot() -> tracemalloc.Snapshot:
    return tracemalloc.take_snapshot().filter_traces(SNAPSHOT_FILTERS)


def growth_sites(snapshot: tracemalloc.Snapshot, baseline: tracemalloc.Snapshot, top: int) -> List[Dict[str, Any]]:
    """The ``top`` allocation sites whose live bytes grew most since ``baseline``."""
    stats = snapshot.compare_to(baseline, "traceback" if tracemalloc.get_traceback_limit() > 1 else "lineno")
    return [
        {
            "site": " <- ".join(f"{frame.filename}:{frame.lineno}" for frame in stat.traceback),
            "size_diff": stat.size_diff,
            "size": stat.size,
            "count_diff": stat.count_diff,
            "count": stat.count,
        }
        for stat in stats[:top]
    ]


class MemoryProfiler:
    """Heap reports every ``interval`` seconds (and on SIGUSR2) into ``path``, one JSON line each."""

    def __init__(self, path: Path, interval: float, top: int, frames: int, trace: bool = True) -> None:
        self.path = path
        self.interval = interval
        self.top = top
        self.frames = frames
        self.trace = trace
        self.started = time.monotonic()
        self.baseline: Optional[tracemalloc.Snapshot] = None
        self.wake = asyncio.Event()

    def start_tracing(self) -> None:
        if self.trace and not tracemalloc.is_tracing():  # PYTHONTRACEMALLOC started it with the interpreter
            tracemalloc.start(self.frames)

    async def run(self) -> None:
        """Report until cancelled: the first report is the baseline, later ones its growth."""
        self.start_tracing()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGUSR2, self.wake.set)  # instead of mode's debugger
        log.info("memory profiler: a report every %gs (and on SIGUSR2) in %s", self.interval, self.path)
        try:
            while True:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), self.interval)
                self.wake.clear()
                await self.report()
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGUSR2)

    async def report(self) -> Dict[str, Any]:
        """Append one report to the file and return it."""
        entry: Dict[str, Any] = {
            "at": time.time(),
            "uptime": round(time.monotonic() - self.started, 1),
            "rss": rss_bytes(),
            "traced": 0,
            "traced_peak": 0,
            "gauges": flat_values(),
            "sites": [],
        }
        if tracemalloc.is_tracing():
            entry["traced"], entry["traced_peak"] = tracemalloc.get_traced_memory()
            snapshot = take_snapshot()
            if self.baseline is None:
                self.baseline, entry["baseline"] = snapshot, True
            else:
                entry["sites"] = await asyncio.to_thread(growth_sites, snapshot, self.baseline, self.top)
            del snapshot
        await asyncio.to_thread(self._append, json.dumps(entry))
        log.info(
            "memory: rss %.1f MiB, traced %.1f MiB, top growth %s",
            entry["rss"] / MIB,
            entry["traced"] / MIB,
            entry["sites"][0]["site"] if entry["sites"] else "-",
        )
        return entry

    def _append(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(line + "\n")


async def profile_memory(data_dir: Path, settings: Optional[MemorySettings] = None) -> None:
    """Run the profiler when MEMORY_PROFILE is set (returns at once otherwise)."""
    settings = settings or memory_settings
    if not settings.memory_profile:
        return
    profiler = MemoryProfiler(
        Path(data_dir) / PROFILE_FILE,
        settings.memory_profile,
        settings.memory_profile_top,
        settings.memory_profile_frames,
        settings.memory_profile_trace,
    )
    await profiler.run()


memory_settings: MemorySettings = load_memory_settings()
