"""Platform pages: liveness, readiness, the admin-token guard for state-changing endpoints, and
JSON answers for every error the web server gives."""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from typing import Awaitable, Callable

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
    except Exception:  # noqa: BLE001 - answered as JSON, logged with the traceback
        log.exception("%s %s failed", request.method, request.path)
        return json_error(500, "internal error")


@app.on_worker_init.connect
def answer_errors_as_json(sender: faust.App, /, *args: object, **kwargs: object) -> None:
    """Install ``json_errors`` on the worker's aiohttp application before it starts serving."""
    sender.web.web_app.middlewares.append(json_errors)
