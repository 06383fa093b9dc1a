"""The streamspine Faust application: ``faust -A app worker -l info``."""
from __future__ import annotations

import faust

from app.settings import Settings, faust_settings, load_settings

settings: Settings = load_settings()

app = faust.App(settings.app_id, **faust_settings(settings))

# Register the platform pages and every job's agents, tables and pages.
from app import web  # noqa: E402,F401
from agents import cdc, dead_letters, logs, metrics, migration, recommendations  # noqa: E402,F401

__all__ = ["app", "settings"]
