"""The streamspine Faust application: ``faust -A app worker -l info``."""

from __future__ import annotations

import gc

import faust

from app.redaction import redact_log_records, remember_secrets
from app.settings import Settings, faust_settings, load_settings

redact_log_records()
settings: Settings = load_settings()
remember_secrets(settings.secret_values)

app = faust.App(settings.app_id, **faust_settings(settings))


@app.on_worker_init.connect
def create_data_dir(sender: faust.App, /, *args: object, **kwargs: object) -> None:
    """Faust creates DATA_DIR without its parents: a fresh checkout has no ./data yet."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)


# Register the platform pages and every job's agents, tables and pages.
from agents import cdc, dead_letters, logs, metrics, migration, recommendations  # noqa: E402,F401
from app import cli, dashboard, prometheus, web  # noqa: E402,F401

# Each job builds its clients and loads its files here or at the worker's start, not at import.
dead_letters.register(app, settings)
logs.register(app, settings)
metrics.register(app, settings)
cdc.register(app, settings)
migration.register(app, settings)
recommendations.register(app, settings)


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
