"""Platform pages: liveness, readiness and the admin-token guard for state-changing endpoints."""
from __future__ import annotations

import hmac
import time

from faust import web

from app import app, settings

STARTED_AT = time.time()
_routing_tables_known = False


@app.on_rebalance_complete.connect
async def learn_table_partitions(sender: object = None, **kwargs: object) -> None:
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
    return (
        recovery.completed.is_set()
        and _routing_tables_known
        and not app.in_recovery
        and not app.rebalancing
    )


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
