"""The streamspine Faust application: ``faust -A app worker -l info``."""
from __future__ import annotations

import gc

import faust

from app.settings import Settings, faust_settings, load_settings

settings: Settings = load_settings()

app = faust.App(settings.app_id, **faust_settings(settings))

# Register the platform pages and every job's agents, tables and pages.
from app import web  # noqa: E402,F401
from agents import cdc, dead_letters, logs, metrics, migration, recommendations  # noqa: E402,F401


def tune_garbage_collector(settings: Settings) -> None:
    """Apply GC_THRESHOLDS and GC_FREEZE (see app/settings.py): fewer, cheaper cyclic collections."""
    counts = settings.gc_threshold_counts
    if counts is not None:
        gc.set_threshold(*counts)
    if settings.gc_freeze:
        gc.collect()  # no garbage of the imports is frozen with the rest
        gc.freeze()


tune_garbage_collector(settings)  # after every module of the worker is imported

__all__ = ["app", "settings", "tune_garbage_collector"]
