"""CDC pages and Prometheus gauges: /cdc/status/ (slot, capturing worker, per-table counts and
lag from every worker), /cdc/status/local/, /cdc/rows/{schema}.{table}/{pk}/.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List, Optional, Tuple

import psycopg
from faust import web
from faust.exceptions import SameNode

from agents.cdc.capture import Capture
from app import app, settings
from app.gauges import gauge
from app.web import from_other_workers, this_worker
from models.cdc import int_to_lsn, key_json
from tables.cdc import cdc_rows, cdc_table_stats

capture: Optional[Capture] = None  # this worker's capture (CDC_CAPTURE=worker), set by agents.cdc.register


def merge_table_stats(entries: Iterable[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per-partition entries -> per table: summed counts, the highest LSN, the latest lag."""
    tables: Dict[str, Dict[str, Any]] = {}
    for entry in entries:
        merged = tables.setdefault(
            entry["table"], {"counts": {}, "lsn": 0, "lag_ms": None, "applied_at_ms": 0, "sinks": entry.get("sinks", [])}
        )
        for op, count in entry.get("counts", {}).items():
            merged["counts"][op] = merged["counts"].get(op, 0) + count
        merged["lsn"] = max(merged["lsn"], entry.get("lsn", 0))
        if entry.get("applied_at_ms", 0) >= merged["applied_at_ms"]:
            merged["applied_at_ms"], merged["lag_ms"] = entry.get("applied_at_ms", 0), entry.get("lag_ms")
    for merged in tables.values():
        merged["last_applied_lsn"] = {sink: int_to_lsn(merged["lsn"]) for sink in merged["sinks"]}
        merged["total"] = sum(merged["counts"].values())
    return tables


def local_stats() -> List[Dict[str, Any]]:
    """This worker's per-partition entries (actives and standbys; merged by key on the status page)."""
    return [dict(entry) for entry in cdc_table_stats.values()]


async def slot_status() -> Optional[Dict[str, Any]]:
    """The slot as the source reports it (None without CDC_SOURCE_DSN)."""
    if not settings.cdc_source_dsn:
        return None
    status: Dict[str, Any] = {
        "slot": settings.cdc_slot,
        "publication": settings.cdc_publication,
        "capturing_worker": None,
        "tables": settings.cdc_table_names,
    }
    try:
        async with await psycopg.AsyncConnection.connect(settings.cdc_source_dsn, autocommit=True, connect_timeout=3) as conn:
            row = await (
                await conn.execute(
                    "SELECT confirmed_flush_lsn::text, active, pg_current_wal_lsn()::text FROM pg_replication_slots WHERE slot_name = %s",
                    (settings.cdc_slot,),
                )
            ).fetchone()
        if row is not None:
            status.update(confirmed_lsn=row[0], active=row[1], source_wal_lsn=row[2])
    except psycopg.Error as error:
        status["error"] = str(error)
    return status


@app.page("/cdc/status/local/")
async def cdc_status_of_this_worker(view: web.View, request: web.Request) -> web.Response:
    """This worker's share of /cdc/status/."""
    return view.json(
        {
            "stats": local_stats(),
            "capturing": bool(capture is not None and capture.capturing),
            "confirmed_lsn": capture.confirmed_lsn if capture is not None and capture.capturing else None,
            "published": capture.published if capture is not None else 0,
        }
    )


@app.page("/cdc/status/")
async def cdc_status(view: web.View, request: web.Request) -> web.Response:
    """Slot, confirmed LSN, last applied LSN per sink and table, lag and counts, from every worker."""
    entries: Dict[Tuple[str, int], Dict[str, Any]] = {}
    capturing: Optional[str] = None
    parts = await from_other_workers("/cdc/status/local/")
    parts[this_worker()] = {"stats": local_stats(), "capturing": bool(capture is not None and capture.capturing)}
    for worker, part in sorted(parts.items()):
        if part["capturing"]:
            capturing = worker
        for entry in part["stats"]:
            key = (entry["table"], entry["partition"])
            if key not in entries or entry.get("applied_at_ms", 0) > entries[key].get("applied_at_ms", 0):
                entries[key] = entry
    slot = await slot_status()
    if slot is not None:
        slot["capturing_worker"] = capturing
    return view.json({"slot": slot, "tables": merge_table_stats(entries.values())})


def key_from_path(pk: str) -> Dict[str, Any]:
    """``id=5`` / ``a=1,b=x`` / ``{"id":5}`` -> the key object; values are JSON where they parse."""
    if pk.startswith("{"):
        key = json.loads(pk)
        if not isinstance(key, dict) or not key:
            raise ValueError("a JSON key must be a non-empty object")
        return key
    key = {}
    for part in pk.split(","):
        name, sep, raw = part.partition("=")
        if not sep or not name:
            raise ValueError("pk must be column=value[,column=value] or a JSON object")
        try:
            key[name] = json.loads(raw)
        except ValueError:
            key[name] = raw
    return key


@app.page("/cdc/rows/{table}/{pk}/")
async def cdc_row(view: web.View, request: web.Request, table: str, pk: str) -> web.Response:
    """The current image of one row from the state table, answered by the worker that owns its key."""
    try:
        key = key_from_path(pk)
    except ValueError as error:
        raise view.ValidationError(str(error)) from None
    key_bytes = key_json(key)
    try:
        return await app.router.route_req(cdc_rows.name, key_bytes, view.web, request)
    except SameNode:
        pass
    state = (cdc_rows.get(key_bytes) or {}).get(table)
    if state is None:
        raise view.NotFound("unknown row", table=table, key=key)
    if state["row"] is None:
        raise view.NotFound("row deleted", table=table, key=key, lsn=int_to_lsn(state["lsn"]))
    return view.json(
        {"table": table, "key": key, "lsn": int_to_lsn(state["lsn"]), "op": state["op"], "ts_ms": state["ts_ms"], "row": state["row"]}
    )


# --- Prometheus ----------------------------------------------------------------------------------


@gauge("streamspine_cdc_lag_seconds", "Source commit to applied, of the latest change applied per table.", ["table"])
def cdc_lag_by_table() -> Dict[Tuple[str, ...], float]:
    return {(table,): stats["lag_ms"] / 1000.0 for table, stats in merge_table_stats(local_stats()).items() if stats["lag_ms"] is not None}


@gauge("streamspine_cdc_capturing", "1 on the worker that holds the capture slot, else 0.")
def cdc_capturing() -> Dict[Tuple[str, ...], float]:
    return {(): 1.0 if capture is not None and capture.capturing else 0.0}
