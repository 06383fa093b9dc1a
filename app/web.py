"""Platform pages: liveness, readiness, the admin-token guard for state-changing endpoints, and
JSON answers for every error the web server gives."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional

import aiohttp
import faust
from aiohttp import web as aiohttp_web
from faust import web

from app import app, settings

log = logging.getLogger(__name__)
STARTED_AT = time.time()
# Faust's table views answer 503 "try again later" for a table that does not exist at all.
TABLE_VIEW_PATH = re.compile(r"^/(?:table|router)/(?P<name>[^/]+)/")
Handler = Callable[[aiohttp_web.Request], Awaitable[aiohttp_web.StreamResponse]]
_routing_tables_known = False


@app.on_rebalance_complete.connect
async def learn_table_partitions(sender: object = None, /, *args: object, **kwargs: object) -> None:
    """Fetch the partition metadata of every changelog topic, so table routes work at once.

    Faust's router hashes a key with its producer's metadata, which learns a topic only when the
    producer first sends to it: until a worker has written every table, a routed request (our
    pages and the built-in /table/ views) fails with a TypeError and a 500 text page. Tracking
    each changelog topic in aiokafka's metadata once per rebalance closes that gap.
    """
    global _routing_tables_known
    producer = app.producer._ensure_producer()  # the aiokafka producer behind Faust's
    for table in app.tables.values():
        topic = table.changelog_topic.get_topic_name()
        # Track the topic, or the next metadata refresh (which asks only for tracked topics) drops it.
        await producer.client.add_topic(topic)
        await producer.partitions_for(topic)
    _routing_tables_known = True


class WorkerUnavailable(Exception):
    """Another worker did not answer its share of a cluster-wide page."""


WORKER_TIMEOUT = 10.0  # seconds another worker has to answer its share


def this_worker() -> str:
    return str(app.conf.canonical_url).rstrip("/")


def other_workers() -> List[str]:
    """Every other worker that owns table partitions, by canonical URL."""
    return sorted({str(worker).rstrip("/") for worker in app.router.tables_metadata()} - {this_worker()})


async def ask_worker(worker: str, path: str, params: Optional[Mapping[str, str]] = None) -> Any:
    """GET ``path`` from ``worker``; raises WorkerUnavailable unless it answers 200 with JSON."""
    try:
        timeout = aiohttp.ClientTimeout(total=WORKER_TIMEOUT)
        async with app.http_client.get(f"{worker}{path}", params=params, timeout=timeout) as response:
            if response.status != 200:
                raise WorkerUnavailable(f"worker {worker} answered {response.status} for {path}")
            return await response.json()
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
        raise WorkerUnavailable(f"worker {worker} did not answer {path}: {error!r}") from error


async def from_other_workers(path: str, params: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """The one cluster fan-out: every other worker's answer to ``path`` (its share of a page),
    asked at once, by worker URL; raises WorkerUnavailable when one does not answer."""
    workers = other_workers()
    answers = await asyncio.gather(*(ask_worker(worker, path, params) for worker in workers))
    return dict(zip(workers, answers, strict=True))


def worker_is_ready() -> bool:
    """True once table recovery has completed, routing works and no rebalance is under way."""
    recovery = app.tables.recovery
    return recovery.completed.is_set() and _routing_tables_known and not app.in_recovery and not app.rebalancing


def require_admin_token(view: web.View, request: web.Request) -> None:
    """Refuse a state-changing request unless it carries ``Authorization: Bearer $ADMIN_TOKEN``."""
    if not settings.admin_token:
        raise view.PermissionDenied("ADMIN_TOKEN is not set on this worker: state-changing endpoints are disabled")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise view.NotAuthenticated("missing 'Authorization: Bearer <ADMIN_TOKEN>' header")
    if not hmac.compare_digest(token.encode(), settings.admin_token.encode()):
        raise view.PermissionDenied("invalid admin token")


@app.page("/health/")
async def health(view: web.View, request: web.Request) -> web.Response:
    """Liveness: the worker process is up and serving."""
    return view.json(
        {
            "status": "ok",
            "app": app.conf.id,
            "worker": str(app.conf.canonical_url),
            "uptime_s": round(time.time() - STARTED_AT, 3),
            "assigned_partitions": len(app.assignor.assigned_actives()),
        }
    )


@app.page("/ready/")
async def ready(view: web.View, request: web.Request) -> web.Response:
    """Readiness: 200 only when every table has recovered from its changelog."""
    is_ready = worker_is_ready()
    body = {
        "status": "ready" if is_ready else "recovering",
        "worker": str(app.conf.canonical_url),
        "rebalancing": app.rebalancing,
        "in_recovery": app.in_recovery,
    }
    return view.json(body, status=200 if is_ready else 503)


def json_error(status: int, message: str, **details: object) -> aiohttp_web.Response:
    return aiohttp_web.json_response({"error": message, **details}, status=status)


def unknown_table_in(path: str) -> str | None:
    """The table named by a /table/<name>/... or /router/<name>/... path, when no such table exists."""
    match = TABLE_VIEW_PATH.match(path)
    if match is None or match["name"] in app.tables:
        return None
    return match["name"]


@aiohttp_web.middleware
async def json_errors(request: aiohttp_web.Request, handler: Handler) -> aiohttp_web.StreamResponse:
    """Every error the server gives is JSON: a request's own fault (unknown path or table, wrong
    method, oversized or undecodable body) a 4xx, anything else a 500."""
    table = unknown_table_in(request.path)
    if table is not None:
        return json_error(404, "unknown table", name=table)
    try:
        return await handler(request)
    except aiohttp_web.HTTPException as error:
        if error.status < 400 or (error.content_type or "").endswith("json"):
            raise
        response = json_error(error.status, error.reason or "error", detail=error.text or "")
        if "Allow" in error.headers:  # a 405 says which methods the path takes
            response.headers["Allow"] = error.headers["Allow"]
        return response
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return json_error(400, f"request body is not JSON: {error}")
    except RecursionError:
        return json_error(400, "request body is nested too deeply")
    except WorkerUnavailable as error:
        log.warning("%s", error)
        return json_error(503, str(error))
    except Exception:  # noqa: BLE001 - answered as JSON, logged with the traceback
        log.exception("%s %s failed", request.method, request.path)
        return json_error(500, "internal error")


@app.on_worker_init.connect
def answer_errors_as_json(sender: faust.App, /, *args: object, **kwargs: object) -> None:
    """Install ``json_errors`` on the worker's aiohttp application before it starts serving."""
    sender.web.web_app.middlewares.append(json_errors)
