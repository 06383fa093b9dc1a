"""Centralized logging.

logs -> ship_logs -> Elasticsearch (logs-<service>-YYYY.MM.DD, bulk, retried until stored)
                  -> log-counts (per service and batch) -> count_log_lines -> log_stats, log_recent
                                                                           -> metrics (log_error_rate)
Pages: /logs/stats/{service}/, /logs/recent/{service}/, /logs/status/
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, Iterable, Iterator, List, Optional, Set, Tuple

import faust
import orjson
from faust import web
from faust.types import EventT

from app import app, settings
from app.aggregation import enter_partition
from app.dead_letters import dead_letter
from app.runtime import (
    DecodedBatch,
    PipelinedWrites,
    ReleaseOrder,
    decoded_batches,
    held_batches,
    reason_of,
    release_in_order,
    require_encodable,
    until_applied,
)
from app.search import BulkPair, BulkWriter, Rejection, optional_writer, put_index_template
from app.settings import Settings
from app.topics import key_text, metrics_topic, raw_topic
from models.logs import (
    LEVELS,
    InvalidRecord,
    LogCounts,
    RecordContext,
    count_rows,
    document_id,
    document_origin,
    fold_counts,
    header_text,
    index_name,
    index_template_patterns,
    is_error,
    log_counts_from_json,
    parse_record,
    split_rows,
    window_key,
    window_start,
    window_summary,
    windows_to_close,
)
from tables.logs import log_stats, recent_lines

# Raw bytes: a record may be JSON, logfmt, plain text or a JSON array; the agent detects which.
logs_topic = raw_topic("logs")
# LogCounts as JSON bytes, decoded (and checked) by count_log_lines itself.
log_counts_topic = raw_topic("log-counts")

INDEX_TEMPLATE = "streamspine-logs"
CLOSE_GRACE = 5.0  # seconds past a window's end (wall clock) before a quiet service's window closes
KEEP_WINDOWS = 10
# log_recent keeps a line's message up to RECENT_MESSAGE_CHARS (the whole line is in Elasticsearch)
# and a service's newest lines up to RECENT_BYTES of JSON, so they fit in one Kafka record (1 MB by
# default) in a LogCounts and in log_recent's changelog, whatever the lines' length.
RECENT_MESSAGE_CHARS = 8192
RECENT_BYTES = 256 * 1024
# Offsets in one LogCounts (about 13 bytes each with its line count): a batch of many records, each
# with lines at several levels or in two windows, is sent as several, in offset order.
MAX_COUNTED_OFFSETS = 20_000
LOG_ERROR_RATE = "log_error_rate"
COUNTS_BATCH_MAX = 500  # LogCounts folded per batch of count_log_lines
COUNTS_BATCH_WITHIN = 0.1  # seconds take_events waits for more (a stream without a batch channel)
INDEX_MAPPINGS: Dict[str, Any] = {
    "dynamic_templates": [
        {"labels": {"path_match": "labels.*", "mapping": {"type": "keyword", "ignore_above": 1024}}},
        {"strings_as_keyword": {"match_mapping_type": "string", "mapping": {"type": "keyword", "ignore_above": 1024}}},
    ],
    "properties": {
        "@timestamp": {"type": "date"},
        "message": {"type": "match_only_text"},
        "log": {"properties": {"level": {"type": "keyword"}, "logger": {"type": "keyword"}}},
        "service": {"properties": {"name": {"type": "keyword"}, "environment": {"type": "keyword"}}},
        "trace": {"properties": {"id": {"type": "keyword"}}},
        "span": {"properties": {"id": {"type": "keyword"}}},
        "host": {"properties": {"name": {"type": "keyword"}}},
        "error": {"properties": {"message": {"type": "match_only_text"}, "stack_trace": {"type": "wildcard"}}},
        "event": {"properties": {"dataset": {"type": "keyword"}}},
    },
}

writer: Optional[BulkWriter] = None  # the Elasticsearch writer, built by register() when ELASTICSEARCH_URL is set


def register(app: faust.App, settings: Settings) -> None:
    """Build the Elasticsearch writer of ELASTICSEARCH_URL (none: lines are counted, not indexed)."""
    global writer
    writer = optional_writer(settings.elasticsearch_url, settings.elasticsearch_max_backoff)


@dataclass
class ShippingCounters:
    """This worker's shipping totals, for /logs/status/."""

    records: int = 0
    lines: int = 0
    indexed: int = 0
    rejected: int = 0
    dead_lettered: int = 0
    last_batch_at: Optional[float] = None


counters = ShippingCounters()


@dataclass
class ParsedBatch:
    """A batch of ``logs`` records: what each line adds to the statistics, and the records refused
    at parsing (the documents are in its parts, each dropped once written)."""

    records: Dict[Tuple[int, int], EventT] = field(default_factory=dict)  # (partition, offset) -> record
    # (service, partition) -> {(window start, level): [offset of each line]}
    counts: Dict[Tuple[str, int], Dict[Tuple[float, str], List[int]]] = field(default_factory=dict)
    recent: Dict[Tuple[str, int], List[Tuple[str, Dict[str, Any]]]] = field(default_factory=dict)  # (_id, doc)
    invalid: List[Tuple[EventT, str]] = field(default_factory=list)
    lines: int = 0


@dataclass
class BulkPart:
    """Whole records of a batch written in one bulk write: their bulk actions and the records whose
    offsets it releases (refused records with no line included)."""

    events: List[EventT] = field(default_factory=list)
    actions: List[BulkPair] = field(default_factory=list)  # ({"index": {"_index", "_id"}}, document)


def record_context(event: EventT) -> RecordContext:
    """Service (record key, else a ``service`` header), host header and record time of a record."""
    message = event.message
    service = (key_text(message.key) or "").strip() or None
    headers = message.headers
    service = service or header_text(headers, "service")
    return RecordContext(service, header_text(headers, "host"), message.timestamp or time.time())


def recent_entry(doc_id: str, doc: Dict[str, Any]) -> Dict[str, Any]:
    """The fields of a line kept in log_recent (a long message cut, marked ``truncated``)."""
    message = doc["message"]
    entry = {"id": doc_id, "@timestamp": doc["@timestamp"], "level": doc["log"]["level"], "message": message}
    if len(message) > RECENT_MESSAGE_CHARS:
        entry["message"], entry["truncated"] = message[:RECENT_MESSAGE_CHARS], True
    trace = doc.get("trace")
    if isinstance(trace, dict) and "id" in trace:
        entry["trace_id"] = trace["id"]
    host = doc.get("host")
    if isinstance(host, dict) and "name" in host:
        entry["host"] = host["name"]
    return entry


class WindowStarts(dict):
    """Window start of an ISO timestamp, computed once per second of the timestamps seen."""

    def __init__(self, window: float) -> None:
        super().__init__()
        self.window = window

    def __missing__(self, second: str) -> float:
        start = self[second] = window_start(second + "Z", self.window)
        return start


def parse_parts(batch: ParsedBatch, events: List[EventT], part_lines: int) -> Iterator[BulkPart]:
    """Parse the records of a batch into ``batch``, yielding each part (whole records, about
    ``part_lines`` lines: the unit of a bulk write) as soon as it is parsed, so its write can start
    while the rest of the batch is parsed. Pure apart from reading the events."""
    pattern, keep_recent = settings.log_index_pattern, settings.log_recent_limit
    window_starts = WindowStarts(settings.log_stats_window)
    part = BulkPart()
    for event in events:
        if len(part.actions) >= part_lines:
            yield part
            part = BulkPart()
        part.events.append(event)
        message = event.message
        if (message.partition, message.offset) in batch.records:
            continue  # read twice in one batch (a seek back across it): its lines count once
        try:
            docs = parse_record(message.value, record_context(event))
            for doc in docs:
                require_encodable(doc)  # what Elasticsearch's bulk write will serialize
        except InvalidRecord as error:
            batch.invalid.append((event, str(error)))
            continue
        except Exception as error:  # noqa: BLE001 - any failure a record causes is its own (app/runtime.py)
            batch.invalid.append((event, reason_of(error)))
            continue
        partition, offset = message.partition, message.offset
        batch.records[(partition, offset)] = event
        for line, doc in enumerate(docs):
            service, level, timestamp = doc["service"]["name"], doc["log"]["level"], doc["@timestamp"]
            doc_id = document_id(message.topic, partition, offset, line)
            part.actions.append(({"index": {"_index": index_name(pattern, service, timestamp), "_id": doc_id}}, doc))
            series = (service, partition)
            counts = batch.counts.get(series)
            if counts is None:
                counts = batch.counts[series] = defaultdict(list)
                batch.recent[series] = []
            counts[(window_starts[timestamp[:19]], level)].append(offset)
            recent = batch.recent[series]
            recent.append((doc_id, doc))
            if len(recent) > 2 * keep_recent:
                del recent[:-keep_recent]
        batch.lines += len(docs)
    if part.events:
        yield part


def send_counts(batch: ParsedBatch) -> "asyncio.Future[Any]":
    """Send one LogCounts per service and source partition (the first of a service also carries its
    newest lines) through the producer's buffer, in order, without waiting for room in a producer
    batch (a LogCounts with recent lines is larger than one); returns the future of Kafka's
    acknowledgement of them all (the batch's records are released only after it)."""
    deliveries = []
    with_lines: Set[str] = set()
    for (service, partition), counts in batch.counts.items():
        recent = [] if service in with_lines else newest_lines(batch, service, settings.log_recent_limit)
        with_lines.add(service)
        for rows in split_rows(count_rows(counts), MAX_COUNTED_OFFSETS):
            value = LogCounts(service=service, source_partition=partition, counts=rows, recent=recent)
            deliveries.append(log_counts_topic.send_soon(key=service.encode(), value=value.dumps()))
            recent = []
    return asyncio.gather(*deliveries)


def newest_lines(batch: ParsedBatch, service: str, limit: int) -> List[Dict[str, Any]]:
    """The ``limit`` newest lines (by @timestamp) of a service in a batch, oldest first, at most
    RECENT_BYTES of them: what log_recent would keep of them, so each service's lines are sent and
    merged once per batch."""
    lines = [line for (name, _), kept in batch.recent.items() if name == service for line in kept[-limit:]]
    lines.sort(key=line_time)
    entries = [recent_entry(doc_id, doc) for doc_id, doc in lines[-limit:]]
    return entries[len(entries) - entries_within(reversed(entries), RECENT_BYTES) :]


def entries_within(entries: Iterable[Dict[str, Any]], budget: int) -> int:
    """How many of ``entries`` (the ones to keep first) fit in ``budget`` bytes of JSON."""
    size, count = 1, 0  # "[" and "]", and a "," after every entry but the last
    for entry in entries:
        size += len(orjson.dumps(entry)) + 1
        if size > budget:
            break
        count += 1
    return count


def line_time(line: Tuple[str, Dict[str, Any]]) -> str:
    return line[1]["@timestamp"]


async def send_counts_in_turn(batch: ParsedBatch, previous: asyncio.Future, counted: asyncio.Future) -> None:
    """Send a batch's counts once Kafka acknowledged the batch before's (``previous``), and settle
    ``counted`` with the outcome. If the earlier counts failed, these are not sent: the statistics
    skip a partition's records up to the newest offset counted, so a later batch counted before an
    earlier batch's redelivery would lose the earlier batch's lines."""
    try:
        await asyncio.shield(previous)
        await asyncio.shield(send_counts(batch))  # cancelling this task must not cancel Kafka's acknowledgements
    except asyncio.CancelledError:
        counted.cancel()  # its parts, and every later one, stay held
        raise
    except BaseException as error:
        counted.set_exception(error)
        raise
    counted.set_result(None)


async def dead_letter_rejections(rejections: List[Rejection], batch: ParsedBatch) -> None:
    """A record with a line Elasticsearch refused goes to the DLQ once, naming the line and why."""
    reasons: Dict[int, Tuple[EventT, List[str]]] = {}
    for rejection in rejections:
        doc_id = rejection.doc_id
        assert doc_id is not None  # every line's action carries its document_id
        partition, offset, line = document_origin(doc_id)
        event = batch.records[(partition, offset)]
        entry = reasons.setdefault(id(event), (event, []))
        entry[1].append(f"line {line}: Elasticsearch refused it ({rejection.status}): {rejection.reason}")
    for event, lines in reasons.values():
        await dead_letter("; ".join(lines), event)
        counters.dead_lettered += 1


async def finish_part(
    stream: Any,
    batch: ParsedBatch,
    part: BulkPart,
    counted: asyncio.Future,
    turn: Tuple[asyncio.Future, asyncio.Future],
    rejections: List[Rejection],
) -> None:
    """After a part's bulk write (every line stored or refused): dead-letter the refused lines,
    then release the part's events in their turn (app/runtime.py's ``release_in_order``)."""
    lines, part.actions = len(part.actions), []  # the documents are not kept while the counts are awaited
    await until_applied(dead_letter_rejections, rejections, batch, what="log dead letters")
    counters.indexed += lines - len(rejections)
    counters.rejected += len(rejections)
    await release_in_order(stream, part.events, counted, turn)


async def ship_batch(stream: Any, events: List[EventT], writes: PipelinedWrites, order: ReleaseOrder) -> None:
    """Parse a held batch, starting each part's bulk write as soon as it is parsed; dead-letter the
    invalid records and send the batch's counts (after the batch before's). Every part is released
    once its lines are stored and Kafka has acknowledged the counts (``counted``), in the
    background: the next batch is parsed meanwhile."""
    batch = ParsedBatch()
    counted = asyncio.get_running_loop().create_future()
    try:
        for part in parse_parts(batch, events, settings.log_bulk_lines):
            if writer is None or not part.actions:
                writes.track(release_in_order(stream, part.events, counted, order.next_turn()))
            else:
                turn = order.next_turn()
                write = until_applied(writer.write, part.actions, what="log bulk write")  # the one policy, for any error
                await writes.start(write, partial(finish_part, stream, batch, part, counted, turn), released=turn[1])
        for event, reason in batch.invalid:
            await dead_letter(reason, event)
        counters.dead_lettered += len(batch.invalid)
        writes.track(send_counts_in_turn(batch, order.batch_turn(counted), counted))
    except BaseException:
        counted.cancel()  # the batch's parts stay held: their offsets are not committed
        raise
    counters.records += len(events)
    counters.lines += batch.lines
    counters.last_batch_at = time.time()


@app.agent(logs_topic)
async def ship_logs(stream) -> None:
    """Parse each batch of records, count its lines, and bulk-index them into Elasticsearch, in
    the runtime's pipelined mode (app/runtime.py).

    Each batch's events are held (one more reference each, taken before anything is awaited) and
    released only after its counts are in Kafka and every line of their part of the batch (whole
    records, about LOG_BULK_LINES lines) is stored or dead-lettered, so an Elasticsearch outage or
    a failure holds the offsets back and nothing is lost; redelivered records overwrite their own
    documents (_id from the offset). Up to LOG_BULK_IN_FLIGHT parts are being written at once, so
    the search server stores one part while this worker serializes the next or parses the next
    batch.
    """
    if writer is not None:
        await put_index_template(
            writer.client,
            INDEX_TEMPLATE,
            index_template_patterns(settings.log_index_pattern),
            INDEX_MAPPINGS,
            max_backoff=settings.elasticsearch_max_backoff,
        )
    order = ReleaseOrder()
    async with PipelinedWrites(settings.log_bulk_in_flight) as writes:
        async for events in held_batches(stream, max_=settings.log_batch_max, within=settings.log_batch_within):
            await ship_batch(stream, events, writes, order)
            await writes.slot_free()  # while every write is busy, the next batch grows in the queue


# --- statistics ----------------------------------------------------------------------------------


def merge_recent(current: List[Dict[str, Any]], new: List[Dict[str, Any]], limit: int) -> List[Dict[str, Any]]:
    """Newest first, each line once (a redelivered record keeps its place), at most ``limit``
    lines and RECENT_BYTES."""
    seen = {entry["id"] for entry in new}
    merged = list(reversed(new)) + [entry for entry in current if entry["id"] not in seen]
    merged.sort(key=lambda entry: entry["@timestamp"], reverse=True)
    del merged[limit:]
    return merged[: entries_within(merged, RECENT_BYTES)]


async def send_error_rate(service: str, start: float, levels: Dict[str, int]) -> None:
    """A closed window's error ratio as a ``log_error_rate`` sample on ``metrics``."""
    summary = window_summary(start, settings.log_stats_window, levels)
    sample = {"service": service, "instance": "logs", "metric": LOG_ERROR_RATE, "value": summary["error_ratio"], "ts": summary["end"]}
    delivery = await metrics_topic.send(key=service.encode(), value=json.dumps(sample).encode())
    await delivery


async def close_windows(service: str, state: Dict[str, Any], now: float) -> Dict[str, Any]:
    """Send the sample of every window that ended; returns the state with ``closed_through`` moved."""
    window = settings.log_stats_window
    for start in windows_to_close(state, now=now, window=window, grace=CLOSE_GRACE):
        await send_error_rate(service, start, state["windows"][window_key(start)])
        state = {**state, "closed_through": start}
    return state


def decode_log_counts(event: EventT) -> LogCounts:
    return log_counts_from_json(event.value)


async def fold_log_counts(stream: Any, batch: DecodedBatch[LogCounts]) -> None:
    """Fold each LogCounts into its service's windows and recent lines; close ended windows.
    Idempotent: fold_counts skips the source offsets a service's statistics already hold."""
    for entry in batch:
        enter_partition(stream, entry.event)
        counts = entry.value
        service = counts.service
        state = fold_counts(log_stats[service], counts, window=settings.log_stats_window, keep=KEEP_WINDOWS)
        log_stats[service] = await close_windows(service, state, time.time())
        if counts.recent:
            recent_lines[service] = merge_recent(recent_lines[service], counts.recent, settings.log_recent_limit)


@app.agent(log_counts_topic)
async def count_log_lines(stream) -> None:
    """The statistics side of shipping, on the runtime (app/runtime.py): a record it cannot decode
    is a dead letter, a batch is acknowledged once folded."""
    async for batch in decoded_batches(stream, decode_log_counts, max_=COUNTS_BATCH_MAX, within=COUNTS_BATCH_WITHIN):
        await until_applied(fold_log_counts, stream, batch, what="log statistics")


@app.timer(interval=max(1.0, min(settings.log_stats_window / 4, 15.0)))
async def close_quiet_windows() -> None:
    """Ask the owner of each quiet service of this worker to close its ended windows: a tick (a
    LogCounts without rows) through ``log-counts``, so the write happens in that partition."""
    now = time.time()
    for key, state in list(log_stats.items()):
        service = key.decode() if isinstance(key, bytes) else key
        if windows_to_close(state, now=now, window=settings.log_stats_window, grace=CLOSE_GRACE):
            await log_counts_topic.send(
                key=service.encode(),
                value=LogCounts(service=service, source_partition=-1, counts=[], recent=[]).dumps(),
            )


# --- pages ---------------------------------------------------------------------------------------


def stats_view(service: str, state: Dict[str, Any], now: float) -> Dict[str, Any]:
    """The current and previous windows (wall clock) of a service, and every window kept."""
    window = settings.log_stats_window
    windows = {float(start): levels for start, levels in state.get("windows", {}).items()}
    current = (now // window) * window
    return {
        "service": service,
        "window_s": window,
        "current": window_summary(current, window, windows.get(current, {})),
        "previous": window_summary(current - window, window, windows.get(current - window, {})),
        "windows": [window_summary(start, window, levels) for start, levels in sorted(windows.items())],
    }


@app.page("/logs/stats/{service}/")
@app.table_route(table=log_stats, match_info="service")
async def service_log_stats(view: web.View, request: web.Request, service: str) -> web.Response:
    """Counts per level and error ratio of the current and previous window of a service."""
    if service not in log_stats:
        raise view.NotFound("no log lines seen for this service", service=service)
    return view.json(stats_view(service, log_stats[service], time.time()))


def recent_query(view: web.View, request: web.Request) -> Tuple[Optional[str], int]:
    """``?level=`` (one of LEVELS) and ``?limit=`` (1..LOG_RECENT_LIMIT, default 50)."""
    level = request.query.get("level") or None
    if level is not None and level not in LEVELS:
        raise view.ValidationError(f"level must be one of {', '.join(LEVELS)}")
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        raise view.ValidationError("limit must be an integer") from None
    if not 1 <= limit <= settings.log_recent_limit:
        raise view.ValidationError(f"limit must be between 1 and {settings.log_recent_limit}")
    return level, limit


@app.page("/logs/recent/{service}/")
@app.table_route(table=recent_lines, match_info="service")
async def service_recent_lines(view: web.View, request: web.Request, service: str) -> web.Response:
    """The latest lines of a service, newest first, optionally of one level."""
    level, limit = recent_query(view, request)
    if service not in recent_lines:
        raise view.NotFound("no log lines seen for this service", service=service)
    lines = [entry for entry in recent_lines[service] if level is None or entry["level"] == level]
    return view.json({"service": service, "level": level, "lines": lines[:limit]})


@app.page("/logs/status/")
async def shipping_status(view: web.View, request: web.Request) -> web.Response:
    """This worker's shipping totals and whether Elasticsearch is configured."""
    return view.json(
        {
            "elasticsearch": settings.elasticsearch_url is not None,
            "index_pattern": settings.log_index_pattern,
            "es_retries": writer.retries if writer is not None else 0,
            **counters.__dict__,
        }
    )


__all__ = ["logs_topic", "log_counts_topic", "ship_logs", "count_log_lines", "is_error"]
