"""The operator's dashboard: ``GET /ui/``, one page served by every worker.

The page (app/static/) polls the JSON endpoints every job already serves and draws the metric
windows with uPlot (vendored under app/static/vendor/uplot/). What no job serves is the list of
services and of dead-letter topics across the cluster; ``/ui/api/overview`` gathers it from every
worker's ``/ui/api/local/`` (table keys only, nothing is written).

The page loads nothing but its own worker's files and endpoints: a Content-Security-Policy says so.
State-changing actions send the admin token the operator typed into the page; the server never
puts it there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping

import faust
from faust import web

from app import app
from app.web import WorkerUnavailable, ask_worker, other_workers
from tables.dead_letters import dead_letter_counts
from tables.logs import log_stats, recent_lines
from tables.metrics import latest_samples

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
# The page may talk to its own origin only; uPlot sets element styles through the CSSOM, which
# style-src does not restrict, so no 'unsafe-inline' is needed.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def key_name(key: Any) -> str:
    """A table key as text: the tables here keep raw UTF-8 keys (bytes)."""
    return key.decode("utf-8", errors="replace") if isinstance(key, (bytes, bytearray)) else str(key)


def local_overview() -> Dict[str, List[str]]:
    """The services and dead-letter topics this worker's tables hold (actives and standbys alike)."""
    return {
        "metric_services": sorted({key_name(key) for key in latest_samples.keys()}),
        "log_services": sorted({key_name(key) for key in log_stats.keys()} | {key_name(key) for key in recent_lines.keys()}),
        "dead_letter_topics": sorted({key_name(key) for key in dead_letter_counts.keys()}),
    }


def merge_overviews(parts: Iterable[Mapping[str, List[str]]], unreachable: List[str]) -> Dict[str, Any]:
    """The cluster's overview from every worker's share: each service says which pages it has."""
    metric_services: set[str] = set()
    log_services: set[str] = set()
    topics: set[str] = set()
    for part in parts:
        metric_services.update(part.get("metric_services", []))
        log_services.update(part.get("log_services", []))
        topics.update(part.get("dead_letter_topics", []))
    services = [
        {"name": name, "metrics": name in metric_services, "logs": name in log_services} for name in sorted(metric_services | log_services)
    ]
    return {"services": services, "dead_letter_topics": sorted(topics), "unreachable": sorted(unreachable)}


async def other_workers_overview() -> tuple[List[Dict[str, List[str]]], List[str]]:
    """Every other worker's ``/ui/api/local/``; a worker that does not answer is listed, not fatal."""
    parts, unreachable = [], []
    for worker in other_workers():
        try:
            parts.append(await ask_worker(worker, "/ui/api/local/"))
        except WorkerUnavailable as error:
            log.warning("dashboard overview: %s", error)
            unreachable.append(worker)
    return parts, unreachable


@app.page("/ui/api/local/")
async def overview_of_this_worker(view: web.View, request: web.Request) -> web.Response:
    """This worker's share of /ui/api/overview."""
    return view.json(local_overview())


@app.page("/ui/api/overview")
async def overview(view: web.View, request: web.Request) -> web.Response:
    """``{"services": [{"name", "metrics", "logs"}], "dead_letter_topics", "unreachable"}`` of the cluster."""
    parts, unreachable = await other_workers_overview()
    return view.json(merge_overviews([local_overview(), *parts], unreachable))


@app.page("/ui/")
async def dashboard_page(view: web.View, request: web.Request) -> web.Response:
    """The dashboard's HTML; its script and styles come from /ui/static/."""
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    return view.html(page, headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"})


@app.page("/ui")
async def dashboard_redirect(view: web.View, request: web.Request) -> web.Response:
    """``/ui`` -> ``/ui/``: the page's relative links need the trailing slash."""
    return view.text("", status=308, headers={"Location": "/ui/"})


@app.on_worker_init.connect
def serve_dashboard_files(sender: faust.App, /, *args: object, **kwargs: object) -> None:
    """Serve app/static/ under /ui/static/ (from the checkout the worker runs from)."""
    sender.web.add_static("/ui/static/", STATIC_DIR)


__all__ = ["key_name", "local_overview", "merge_overviews", "STATIC_DIR"]
