"""Service log lines: detect the format of a record, normalize each line to Elastic Common Schema.

A record on ``logs`` holds one line as JSON, logfmt or plain text (a logfmt or plain line may be
followed by a Python traceback, which gives the ``error`` fields), or a JSON array of such lines
(batching shippers). Parsing is pure: ``parse_record`` turns the record's bytes into ECS documents
or raises ``InvalidRecord`` with the reason that goes to the dead-letter queue. Every record is
hostile until parsed: nesting, field names and date texts are bounded, and a long line costs
time in proportion to its length (docs/logging.md lists what is refused).
"""

from __future__ import annotations

import json
import math
import re
from bisect import bisect_left, bisect_right
from collections import Counter
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import faust
import orjson
from dateutil import parser as dateparser

from models import windows
from models.metrics import InvalidRecord

ECS_VERSION = "8.11.0"
LEVELS = ("trace", "debug", "info", "warn", "error", "fatal")
ERROR_LEVELS = frozenset({"error", "fatal"})

# Spellings seen in the wild -> the level names of ECS/our statistics.
LEVEL_ALIASES = {
    "trace": "trace",
    "finest": "trace",
    "verbose": "trace",
    "debug": "debug",
    "dbug": "debug",
    "fine": "debug",
    "info": "info",
    "information": "info",
    "informational": "info",
    "notice": "info",
    "warn": "warn",
    "warning": "warn",
    "error": "error",
    "err": "error",
    "eror": "error",
    "severe": "error",
    "fatal": "fatal",
    "critical": "fatal",
    "crit": "fatal",
    "alert": "fatal",
    "emerg": "fatal",
    "panic": "fatal",
}
SYSLOG_SEVERITIES = {0: "fatal", 1: "fatal", 2: "fatal", 3: "error", 4: "warn", 5: "info", 6: "info", 7: "debug"}

# Shipper field names -> ECS field names (dotted). Anything else that is not already an ECS
# field is kept under ``labels``.
FIELD_ALIASES = {
    "@timestamp": "@timestamp",
    "ts": "@timestamp",
    "timestamp": "@timestamp",
    "time": "@timestamp",
    "t": "@timestamp",
    "datetime": "@timestamp",
    "level": "log.level",
    "lvl": "log.level",
    "severity": "log.level",
    "log.level": "log.level",
    "loglevel": "log.level",
    "service": "service.name",
    "service.name": "service.name",
    "app": "service.name",
    "application": "service.name",
    "message": "message",
    "msg": "message",
    "trace_id": "trace.id",
    "traceid": "trace.id",
    "traceId": "trace.id",
    "trace.id": "trace.id",
    "span_id": "span.id",
    "spanid": "span.id",
    "spanId": "span.id",
    "span.id": "span.id",
    "transaction_id": "transaction.id",
    "transaction.id": "transaction.id",
    "host": "host.name",
    "hostname": "host.name",
    "host.name": "host.name",
    "logger": "log.logger",
    "logger_name": "log.logger",
    "log.logger": "log.logger",
    "error": "error.message",
    "exc_info": "error.stack_trace",
    "stack_trace": "error.stack_trace",
    "error.message": "error.message",
    "error.type": "error.type",
    "error.stack_trace": "error.stack_trace",
    "pid": "process.pid",
    "process.pid": "process.pid",
    "thread": "process.thread.name",
    "environment": "service.environment",
    "env": "service.environment",
    "version": "service.version",
    "user_id": "user.id",
    "user.id": "user.id",
}
# Top-level ECS field sets: a dotted extra field under one of these is kept as it is.
ECS_ROOTS = frozenset(
    {
        "agent",
        "client",
        "cloud",
        "container",
        "destination",
        "dns",
        "ecs",
        "error",
        "event",
        "file",
        "host",
        "http",
        "log",
        "network",
        "observer",
        "orchestrator",
        "organization",
        "process",
        "related",
        "server",
        "service",
        "source",
        "span",
        "threat",
        "tls",
        "trace",
        "transaction",
        "url",
        "user",
        "user_agent",
    }
)
KEY_PATTERN = re.compile(r"^[A-Za-z_@][A-Za-z0-9_.@-]*$")
LEVEL_MARKER = re.compile(r"\b(TRACE|DEBUG|INFO|NOTICE|WARN|WARNING|ERROR|ERR|SEVERE|FATAL|CRITICAL|CRIT|PANIC)\b|\[(\w+)\]")
ERROR_MARKER = re.compile(r"Traceback \(most recent call last\)|\bException\b|\bpanic:")
MAX_LINES_PER_RECORD = 10_000
# A line nested deeper, or with a field name of more dotted parts, is refused: its document would
# be deeper than orjson writes (255 levels), and the stdlib json recurses into it.
MAX_NESTING = 100
MAX_TIMESTAMP_CHARS = 64  # a date text longer than this is no date (dateutil would take seconds)


class LogCounts(faust.Record, serializer="json"):
    """What one batch of one source partition adds to a service's log statistics.

    ``counts`` rows are ``[window_start, level, offsets, lines]``: the record offsets (ascending)
    with lines of that level in that window, and how many lines each has there, so a statistics
    partition can skip records it already counted (at-least-once redelivery) with one bisection
    per row (``counted_rows``). Rows of the earlier form ``[offset, window_start, level, lines]``
    (one per record, level and window) are still read.
    ``recent`` holds the batch's latest lines of the service (id, @timestamp, level, message, ...).
    """

    service: str
    source_partition: int
    counts: List[List[Any]]
    recent: List[Dict[str, Any]]


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return value.__class__ in (int, float) and math.isfinite(value)


def is_offset_list(value: Any) -> bool:
    return value.__class__ is list and all(item.__class__ is int and item >= 0 for item in value)


def is_count_row(row: Any) -> bool:
    """A row of either LogCounts form, with the types ``counted_rows`` and ``fold_counts`` rely on."""
    if row.__class__ is not list or len(row) != 4:
        return False
    if row[2].__class__ is list:  # [window_start, level, offsets, lines]
        start, level, offsets, lines = row
        return (
            is_number(start)
            and isinstance(level, str)
            and is_offset_list(offsets)
            and offsets == sorted(offsets)
            and is_offset_list(lines)
            and len(lines) == len(offsets)
        )
    offset, start, level, lines = row  # [offset, window_start, level, lines]
    return offset.__class__ is int and offset >= 0 and is_number(start) and isinstance(level, str) and lines.__class__ is int and lines >= 0


def is_recent_entry(entry: Any) -> bool:
    return entry.__class__ is dict and isinstance(entry.get("id"), str) and isinstance(entry.get("@timestamp"), str)


def log_counts_from_json(raw: Any) -> LogCounts:
    """A LogCounts read back from ``log-counts``, every field checked (InvalidRecord otherwise):
    the topic is internal, but a record the statistics cannot fold must become a dead letter, not
    a batch retried for ever."""
    if not isinstance(raw, (bytes, str)):
        raise InvalidRecord("not a JSON document")
    data = orjson.loads(raw)
    if data.__class__ is not dict:
        raise InvalidRecord("not a JSON object")
    service, partition, rows, recent = data.get("service"), data.get("source_partition"), data.get("counts"), data.get("recent")
    if not isinstance(service, str) or not service:
        raise InvalidRecord("service: not a non-empty string")
    if partition.__class__ is not int or partition < -1:
        raise InvalidRecord("source_partition: not a partition number (or -1)")
    if rows.__class__ is not list or not all(is_count_row(row) for row in rows):
        raise InvalidRecord("counts: not a list of count rows")
    if recent.__class__ is not list or not all(is_recent_entry(entry) for entry in recent):
        raise InvalidRecord("recent: not a list of lines with id and @timestamp")
    return LogCounts(service=service, source_partition=partition, counts=rows, recent=recent)


def normalize_level(value: Any) -> Optional[str]:
    """``"WARNING"`` -> ``"warn"``, syslog severity 3 -> ``"error"``; None when unknown."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return SYSLOG_SEVERITIES.get(value)
    if isinstance(value, str):
        return LEVEL_ALIASES.get(value.strip().lower())
    return None


def guess_level(text: str, default: str = "info") -> str:
    """The level of a plain-text line from common markers (``ERROR``, ``[warn]``, tracebacks),
    ``default`` when it has none."""
    for match in LEVEL_MARKER.finditer(text):
        level = normalize_level(match.group(1) or match.group(2))
        if level is not None:
            return level
    return "error" if ERROR_MARKER.search(text) else default


# --- Python tracebacks in text lines -----------------------------------------------------------

# The first line of a traceback; "  + Exception Group Traceback ..." opens an exception group.
TRACEBACK_HEADER = re.compile(
    r"^(?P<indent>[ \t]*)(?P<group>\+ )?(?:Exception Group )?Traceback \(most recent call last\):[ \t]*$",
    re.MULTILINE,
)
# Between the tracebacks of a chain, at the start of a line: the last exception follows the last one.
CHAIN_SEPARATOR = re.compile(
    r"^(?:The above exception was the direct cause of the following exception:"
    r"|During handling of the above exception, another exception occurred:)[ \t]*$",
    re.MULTILINE,
)
# "ValueError: card expired", "ValueError", "requests.exceptions.HTTPError: 502 ..."
EXCEPTION_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*)(?:: ?(?P<message>.*))?$", re.DOTALL)


def split_traceback(text: str) -> Tuple[str, Optional[str]]:
    """``(the text before the first traceback, the traceback)``, or ``(text, None)`` when the text
    holds no traceback (a header on a line of its own)."""
    match = TRACEBACK_HEADER.search(text)
    if match is None:
        return text, None
    return text[: match.start()].rstrip(), text[match.start() :].rstrip()


def traceback_error(stack_trace: str) -> Dict[str, str]:
    """``error.type`` and ``error.message`` of the exception a traceback ends with (the last of a
    chain), as far as they can be read; the message is left out when the exception has none."""
    last_start = 0
    for separator in CHAIN_SEPARATOR.finditer(stack_trace):
        last_start = separator.end()
    last = stack_trace[last_start:]
    lines = [text.rstrip("\r") for text in last.strip("\r\n").split("\n")]
    start, prefix = 0, ""  # prefix: "  | " on the lines of an exception group's own level
    for number, text in enumerate(lines):
        header = TRACEBACK_HEADER.match(text)
        if header is not None:
            start, prefix = number + 1, (header.group("indent") + "| ") if header.group("group") else ""
            break
    exception: List[str] = []
    for text in lines[start:]:
        if not text.startswith(prefix):
            if exception:
                break  # an exception group's sub-exceptions follow its own exception
            continue
        text = text[len(prefix) :]
        if exception or (text and not text[0].isspace()):  # frames, source and carets are indented
            exception.append(text)
    found = EXCEPTION_LINE.match("\n".join(exception).rstrip())
    if found is None:
        return {}
    error = {"type": found.group("type")}
    if found.group("message"):
        error["message"] = found.group("message")
    return error


def exception_summary(stack_trace: str) -> str:
    """The last line a reader sees of a traceback: ``ValueError: card expired``."""
    error = traceback_error(stack_trace)
    if "type" not in error:
        return stack_trace.rstrip().rsplit("\n", 1)[-1].strip()
    return f"{error['type']}: {error['message']}" if "message" in error else error["type"]


def add_traceback_error(doc: Dict[str, Any], stack_trace: str) -> None:
    """Set ``error.stack_trace``, and ``error.type``/``error.message`` read from it where the
    line did not give them."""
    error = child(doc, "error")
    error.setdefault("stack_trace", stack_trace)
    for name, value in traceback_error(stack_trace).items():
        error.setdefault(name, value)


EPOCH_TEXT = re.compile(r"^\d{9,13}(\.\d+)?$")


def to_timestamp(value: Any) -> datetime:
    """Epoch seconds or milliseconds, or an ISO-8601-like string, as an aware UTC datetime."""
    if isinstance(value, bool):
        raise InvalidRecord(f"timestamp must be a time, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = epoch_seconds(value)
        try:
            return datetime.fromtimestamp(seconds, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise InvalidRecord(f"timestamp is out of range: {value!r}") from None
    if isinstance(value, str) and EPOCH_TEXT.match(value):
        return to_timestamp(float(value))  # logfmt carries epoch times as text
    if isinstance(value, str):
        parsed = parse_date(value)
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=timezone.utc)
        try:
            return parsed.astimezone(timezone.utc)
        except (OverflowError, ValueError):  # 0001-01-01T00:00+01:00 is in year 0 in UTC
            raise InvalidRecord(f"timestamp is out of range in UTC: {value!r}") from None
    raise InvalidRecord(f"timestamp must be a number or a string, got {type(value).__name__}")


def parse_date(text: str) -> datetime:
    """An ISO-8601 or other common date text (dateutil); refuses what is none."""
    if len(text) <= MAX_TIMESTAMP_CHARS:
        try:
            return dateparser.isoparse(text)
        except ValueError:
            try:
                return dateparser.parse(text)
            except (ValueError, OverflowError):
                pass
    raise InvalidRecord(f"timestamp is not a date: {text[:MAX_TIMESTAMP_CHARS]!r}")


def epoch_seconds(value: float) -> float:
    """Epoch seconds of a number of seconds or milliseconds; refuses what is not a time."""
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer beyond float range
        finite = False
    if not finite or value <= 0:
        raise InvalidRecord(f"timestamp is not a time: {value!r}")
    return value / 1000.0 if value > 1e11 else float(value)  # 1e11 s is the year 5138


def timestamp_text(value: Any) -> str:
    """``iso_timestamp(to_timestamp(value))``; epoch numbers (most shippers send them) are formatted
    from a per-second cache, without a datetime per line."""
    if value.__class__ is float or value.__class__ is int:
        fraction, whole = math.modf(epoch_seconds(value))
        micros = round(fraction * 1e6)  # as datetime.fromtimestamp rounds
        if micros >= 1_000_000:
            whole, micros = whole + 1, micros - 1_000_000
        try:
            second = second_text(int(whole))
        except (OverflowError, OSError, ValueError):
            raise InvalidRecord(f"timestamp is out of range: {value!r}") from None
        return f"{second}.{micros // 1000:03d}Z"
    return iso_timestamp(to_timestamp(value))


@lru_cache(maxsize=1024)
def second_text(second: int) -> str:
    """``2024-11-01T12:00:00`` of an epoch second, UTC."""
    return datetime.fromtimestamp(second, tz=timezone.utc).isoformat()[:19]


def iso_timestamp(moment: datetime) -> str:
    """Elasticsearch's ``strict_date_optional_time`` with milliseconds, UTC."""
    if moment.tzinfo is not timezone.utc:
        moment = moment.astimezone(timezone.utc)
    return moment.isoformat(timespec="milliseconds")[:-6] + "Z"


# One piece of a logfmt line, split as a POSIX shell splits words (shlex.split): unquoted text,
# a backslash-escaped character, a "double-quoted" part (\" and \\ escaped), a 'single-quoted'
# part, or the blanks between words. shlex builds a word a character at a time, which is
# quadratic in a quoted value's length; this reads each piece in one match.
LOGFMT_PIECE = re.compile(
    r"""(?P<plain>[^ \t\r\n"'\\]+)|\\(?P<escaped>.)|"(?P<double>[^"\\]*(?:\\.[^"\\]*)*)"|'(?P<single>[^']*)'|(?P<blank>[ \t\r\n]+)""",
    re.DOTALL,
)
DOUBLE_QUOTED_ESCAPE = re.compile(r'\\(["\\])')


def logfmt_words(text: str) -> Optional[List[str]]:
    """``shlex.split(text)``, in linear time; None where it raises (an unbalanced quote, a
    backslash at the end)."""
    words: List[str] = []
    word: Optional[List[str]] = None
    position, end = 0, len(text)
    while position < end:
        piece = LOGFMT_PIECE.match(text, position)
        if piece is None:
            return None
        position, kind = piece.end(), piece.lastgroup
        if kind == "blank":
            if word is not None:
                words.append("".join(word))
                word = None
            continue
        value = piece.group(kind)  # type: ignore[arg-type]
        if kind == "double" and "\\" in value:
            value = DOUBLE_QUOTED_ESCAPE.sub(r"\1", value)
        if word is None:
            word = []
        word.append(value)
    if word is not None:
        words.append("".join(word))
    return words


def parse_logfmt(text: str) -> Optional[Dict[str, str]]:
    """``level=warn msg="a b"`` -> ``{"level": "warn", "msg": "a b"}``; None when the line is
    not logfmt (a token without ``key=``, unbalanced quotes, or no ``msg``/``level`` key)."""
    if "=" not in text:
        return None
    tokens = logfmt_words(text)
    if tokens is None:
        return None
    fields: Dict[str, str] = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not KEY_PATTERN.match(key):
            return None
        fields[key] = value
    known = {FIELD_ALIASES.get(key) for key in fields}
    return fields if known & {"message", "log.level"} else None


def child(node: Dict[str, Any], name: str) -> Dict[str, Any]:
    """``node[name]``, made an object if it is not one."""
    value = node.get(name)
    if value.__class__ is not dict:
        value = node[name] = {}
    return value


def set_dotted(doc: Dict[str, Any], path: str, value: Any) -> None:
    """``set_dotted(d, "log.level", "info")`` -> ``d["log"]["level"] = "info"``."""
    parents, leaf = path_parts(path)
    node = doc
    for part in parents:
        node = child(node, part)
    node[leaf] = value


@lru_cache(maxsize=4096)
def path_parts(path: str) -> Tuple[Tuple[str, ...], str]:
    """``"a.b.c"`` -> ``(("a", "b"), "c")``, once per field name seen; refuses a name of more
    than MAX_NESTING parts."""
    *parents, leaf = path.split(".", MAX_NESTING)
    if len(parents) == MAX_NESTING:
        raise InvalidRecord(f"field name {path[:60]!r}... has more than {MAX_NESTING} parts")
    return tuple(parents), leaf


def nesting_depth(value: Any, limit: int) -> int:
    """How deep objects and arrays nest in ``value`` (a scalar: 0), counting up to ``limit + 1``
    (iterative: orjson reads 1,024 levels, more than Python's recursion limit)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        node, depth = pending.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        pending.extend((item, depth + 1) for item in children if isinstance(item, (dict, list)))
    return deepest


def label_value(value: Any) -> str:
    """ECS labels are keywords: scalars as text, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), default=str)


def flatten_ecs_objects(fields: Mapping[str, Any]) -> Dict[str, Any]:
    """``{"log": {"level": "error"}}`` -> ``{"log.level": "error"}`` for objects under ECS roots,
    so nested and dotted spellings of the same field map the same way."""
    flat: Dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, dict) and key.split(".", 1)[0] in ECS_ROOTS and key != "labels":
            for inner_key, inner_value in flatten_ecs_objects(value).items():
                flat[f"{key}.{inner_key}"] = inner_value
        else:
            flat[key] = value
    return flat


def ecs_document(fields: Mapping[str, Any], context: "RecordContext", line: int, default_level: str = "info") -> Dict[str, Any]:
    """One line's fields (from JSON or logfmt) as an ECS document; a Python stack trace without
    ``error.type``/``error.message`` gives them."""
    doc: Dict[str, Any] = {}
    labels: Dict[str, str] = {}
    found: Dict[str, Any] = {}
    kinds = set(map(type, fields.values()))
    if (dict in kinds or list in kinds) and nesting_depth(fields, MAX_NESTING) > MAX_NESTING:
        raise InvalidRecord(f"line {line}: nested deeper than {MAX_NESTING} levels")
    if dict in kinds:
        fields = flatten_ecs_objects(fields)
    for key, value in fields.items():
        target = FIELD_ALIASES.get(key)
        if target is not None:
            if target not in found:
                found[target] = value
        elif key == "labels" and isinstance(value, dict):
            labels.update({str(k): label_value(v) for k, v in value.items()})
        elif "." in key and key.split(".", 1)[0] in ECS_ROOTS:
            set_dotted(doc, key, value)
        else:
            labels[key.replace(".", "_")] = label_value(value)

    message = found.pop("message", None)
    if message is None:
        message = ""
    elif not isinstance(message, str):
        message = label_value(message)
    raw_level = found.pop("log.level", None)
    level = normalize_level(raw_level) if raw_level is not None else None
    if raw_level is not None and level is None:
        labels["original_level"] = label_value(raw_level)
    service = found.pop("service.name", None)
    if service is not None and (not isinstance(service, str) or not service.strip()):
        raise InvalidRecord(f"line {line}: service must be a non-empty string, got {service!r}")
    timestamp = found.pop("@timestamp", None)
    doc = finish_document(
        doc,
        context,
        line,
        message=message,
        level=level or guess_level(message, default_level),
        service=(service or "").strip() or None,
        timestamp=timestamp_text(timestamp) if timestamp is not None else None,
        extra=found,
        labels=labels,
    )
    stack_trace = found.get("error.stack_trace")
    if isinstance(stack_trace, str) and TRACEBACK_HEADER.search(stack_trace):
        add_traceback_error(doc, stack_trace)
    return doc


LEADING_TIMESTAMP = re.compile(r"^\[?(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2})?)\]?\s")


def plain_document(text: str, context: "RecordContext", line: int, default_level: str = "info") -> Dict[str, Any]:
    """A plain-text line: the whole line is the message, the level is guessed from its markers,
    the time is a leading ISO-8601 timestamp if the line starts with one, else the record's."""
    match = LEADING_TIMESTAMP.match(text)
    timestamp = None
    if match:
        try:
            timestamp = timestamp_text(match.group(1).replace(",", "."))
        except InvalidRecord:
            timestamp = None
    return finish_document(
        {}, context, line, message=text, level=guess_level(text, default_level), service=None, timestamp=timestamp, extra={}, labels={}
    )


def finish_document(
    doc: Dict[str, Any],
    context: "RecordContext",
    line: int,
    *,
    message: str,
    level: str,
    service: Optional[str],
    timestamp: Optional[str],
    extra: Mapping[str, Any],
    labels: Dict[str, str],
) -> Dict[str, Any]:
    """Fill in what every document has: service, time, level, message, ids, enrichment."""
    service = service or context.service
    if not service:
        raise InvalidRecord(f"line {line}: no service: not in the line, the record key or a 'service' header")
    for path, value in extra.items():
        set_dotted(doc, path, value)
    doc["@timestamp"] = timestamp or iso_timestamp(context.record_time)
    doc["message"] = message
    child(doc, "log")["level"] = level
    child(doc, "service")["name"] = service
    if context.host and "host" not in doc:
        doc["host"] = {"name": context.host}
    if labels:
        doc["labels"] = labels
    child(doc, "event")["dataset"] = f"{service}.log"
    doc["ecs"] = {"version": ECS_VERSION}
    return doc


class RecordContext:
    """What the Kafka record tells about its lines: key/header service, host header, record time."""

    __slots__ = ("service", "host", "_record_time")

    def __init__(self, service: Optional[str], host: Optional[str], record_time: Union[datetime, float]) -> None:
        """``record_time``: a UTC datetime, or epoch seconds, turned into one only when a line
        has no time of its own."""
        self.service, self.host, self._record_time = service, host, record_time

    @property
    def record_time(self) -> datetime:
        """The record's time; refuses a line that needs it when it is no time (a producer sets it)."""
        moment = self._record_time
        if not isinstance(moment, datetime):
            try:
                moment = datetime.fromtimestamp(moment, tz=timezone.utc)  # type: ignore[arg-type]
            except (OverflowError, OSError, ValueError):
                raise InvalidRecord(f"the line has no time of its own and the record timestamp is out of range: {moment!r}") from None
            self._record_time = moment
        return moment  # type: ignore[return-value]


def text_document(text: str, context: RecordContext, line: int) -> Dict[str, Any]:
    """A logfmt or plain-text line, possibly followed by a Python traceback (a multi-line
    record): the line before the traceback is parsed as usual (the exception's last line when
    there is none), its level defaults to error, and the traceback gives the ``error`` fields."""
    head, stack_trace = split_traceback(text)
    default_level = "info"
    if stack_trace is not None:
        head, default_level = head or exception_summary(stack_trace), "error"
    fields = parse_logfmt(head)
    if fields is not None:
        doc = ecs_document(fields, context, line, default_level)
    else:
        doc = plain_document(head, context, line, default_level)
    if stack_trace is not None:
        add_traceback_error(doc, stack_trace)
    return doc


def line_documents(item: Any, context: RecordContext, line: int) -> Dict[str, Any]:
    """One element of a record (a JSON object, or a string holding logfmt or plain text)."""
    if isinstance(item, dict):
        return ecs_document(item, context, line)
    if isinstance(item, str):
        text = item.rstrip("\r\n")
        if text.lstrip().startswith("{"):
            try:
                decoded = orjson.loads(text)
            except ValueError:
                raise InvalidRecord(f"line {line}: looks like JSON but does not parse") from None
            if isinstance(decoded, dict):
                return ecs_document(decoded, context, line)
        if not text.strip():
            raise InvalidRecord(f"line {line}: empty line")
        return text_document(text, context, line)
    raise InvalidRecord(f"line {line}: a line must be a JSON object or a string, got {type(item).__name__}")


JSON_ARRAY_START = re.compile(r"^\[\s*([{\"\]]|$)")


def record_items(text: str) -> List[Any]:
    """The lines of a record's text."""
    stripped = text.strip()
    if not stripped:
        raise InvalidRecord("empty record")
    if stripped[0] in "[{":
        try:
            decoded = orjson.loads(stripped)
        except ValueError as error:
            if stripped[0] == "[" and not JSON_ARRAY_START.match(stripped):
                return [stripped]  # a plain line that starts with "[2024-11-01 ...]" or "[INFO]"
            raise InvalidRecord(f"record looks like JSON but does not parse: {error}") from None
        if isinstance(decoded, list):
            if not decoded:
                raise InvalidRecord("empty JSON array")
            if len(decoded) > MAX_LINES_PER_RECORD:
                raise InvalidRecord(f"{len(decoded)} lines in one record, more than {MAX_LINES_PER_RECORD}")
            return decoded
        if isinstance(decoded, dict):
            return [decoded]
        raise InvalidRecord(f"a JSON record must be an object or an array, got {type(decoded).__name__}")
    return [stripped]


def parse_record(value: Optional[bytes], context: RecordContext) -> List[Dict[str, Any]]:
    """A record's bytes as ECS documents, one per line, in order."""
    if value is None:
        raise InvalidRecord("record has no value")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRecord("record value is not UTF-8") from None
    items = record_items(text)
    return [line_documents(item, context, line) for line, item in enumerate(items)]


def header_text(headers: Union[Mapping[str, bytes], Iterable[Tuple[str, bytes]], None], name: str) -> Optional[str]:
    """A header's value as text (the first one named ``name``), or None."""
    if not headers:
        return None
    items = headers.items() if isinstance(headers, Mapping) else headers
    for key, value in items:
        if key == name and value:
            try:
                return value.decode("utf-8").strip() or None
            except UnicodeDecodeError:
                return None
    return None


def document_id(topic: str, partition: int, offset: int, line: int) -> str:
    """The ``_id`` of a line: the same record redelivered overwrites, never duplicates."""
    return f"{topic}-{partition}-{offset}-{line}"


def document_origin(doc_id: str) -> Tuple[int, int, int]:
    """(partition, offset, line) of a ``document_id``."""
    partition, offset, line = doc_id.rsplit("-", 3)[1:]
    return int(partition), int(offset), int(line)


INDEX_NAME_FORBIDDEN = re.compile(r'[\s\\/*?"<>|,#:]+')


def index_name(pattern: str, service: str, timestamp: str) -> str:
    """``logs-{service}-{date:%Y.%m.%d}`` for the document's service and UTC day."""
    return _index_name(pattern, service, timestamp[:10])


@lru_cache(maxsize=4096)
def _index_name(pattern: str, service: str, day: str) -> str:
    safe_service = INDEX_NAME_FORBIDDEN.sub("-", service.lower()).lstrip("-_+.") or "unknown"
    return pattern.format(service=safe_service, date=datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=timezone.utc))


def index_template_patterns(pattern: str) -> List[str]:
    """The wildcard an index template must match: the literal prefix of the pattern, then ``*``."""
    return [pattern.split("{", 1)[0] + "*"]


def window_start(timestamp: str, window: float) -> float:
    """The start (epoch seconds) of the tumbling window holding an ISO timestamp."""
    moment = datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
    return windows.pane_start(moment, window)


# --- statistics: pure folds over a service's state -------------------------------------------------


def count_rows(counts: Mapping[Tuple[float, str], List[int]]) -> List[List[Any]]:
    """LogCounts rows of one batch and source partition: ``{(window_start, level): [offset per
    line]}`` -> ``[[window_start, level, offsets, lines], ...]``, offsets ascending (``counted_rows``
    bisects them; a batch read across a seek back may hold a partition's offsets out of order)."""
    rows = []
    for (start, level), line_offsets in counts.items():
        per_record = Counter(line_offsets)
        offsets = sorted(per_record)
        rows.append([start, level, offsets, [per_record[offset] for offset in offsets]])
    return rows


def split_rows(rows: List[List[Any]], max_offsets: int) -> Iterator[List[List[Any]]]:
    """``count_rows`` rows in parts of at most about ``max_offsets`` offsets, each part a range of
    records after the part before (so folding the parts in order skips and counts as the whole)."""
    if sum(len(row[2]) for row in rows) <= max_offsets:
        yield rows
        return
    records = sorted({offset for row in rows for offset in row[2]})
    step = max(1, max_offsets // len(rows))  # a record is in at most len(rows) rows
    for first in range(0, len(records), step):
        low, high = records[first], records[min(first + step, len(records)) - 1]
        part = []
        for start, level, offsets, lines in rows:
            begin, end = bisect_left(offsets, low), bisect_right(offsets, high)
            if begin < end:
                part.append([start, level, offsets[begin:end], lines[begin:end]])
        yield part


def counted_rows(rows: Iterable[List[Any]], counted: int) -> Iterator[Tuple[float, str, int, int]]:
    """``(window_start, level, lines, newest offset)`` of each row, leaving out the lines of
    records at or below ``counted``. Reads both row forms (see LogCounts)."""
    for row in rows:
        if row[2].__class__ is list:
            start, level, offsets, lines = row
            if offsets:
                yield start, level, sum(lines[bisect_right(offsets, counted) :]), offsets[-1]
        else:  # [offset, window_start, level, lines]
            offset, start, level, lines = row
            yield start, level, lines if offset > counted else 0, offset


def fold_counts(state: Mapping[str, Any], counts: LogCounts, *, window: float, keep: int) -> Dict[str, Any]:
    """Add a LogCounts to a service's statistics; lines of records at or below the last counted
    offset of their source partition were counted before (redelivery) and are skipped. Keeps
    ``keep`` windows."""
    kept: Dict[str, Dict[str, int]] = {start: dict(levels) for start, levels in state.get("windows", {}).items()}
    offsets: Dict[str, int] = dict(state.get("offsets", {}))
    partition = str(counts.source_partition)
    counted = offsets.get(partition, -1)
    newest = state.get("newest_window")
    top = counted
    for start, level, lines, last_offset in counted_rows(counts.counts, counted):
        top = max(top, last_offset)
        if not lines:
            continue
        levels = kept.setdefault(window_key(start), {})
        levels[level] = levels.get(level, 0) + lines
        newest = start if newest is None else max(newest, start)
    if counts.source_partition >= 0 and top > counted:
        offsets[partition] = top
    if newest is not None:
        kept = {start: levels for start, levels in kept.items() if windows.retained(windows.key_start(start), newest, keep * window)}
    return {**state, "windows": kept, "offsets": offsets, "newest_window": newest}


def window_key(start: float) -> str:
    """The key of a window in a service's statistics (``"600.000"``)."""
    return windows.pane_key(start)


def windows_to_close(state: Mapping[str, Any], *, now: float, window: float, grace: float) -> List[float]:
    """Starts of the windows that have ended and whose sample was not sent yet, oldest first.

    A window ends when the wall clock is ``grace`` seconds past its end, or, for replayed or
    delayed data, when lines two windows later have arrived (event time). Lines of a window that
    arrive after it ended are still counted in its statistics, not in its sample."""
    return windows.panes_to_close(
        (windows.key_start(start) for start in state.get("windows", {})),
        now=now,
        step=window,
        grace=grace,
        newest=state.get("newest_window"),
        closed_through=state.get("closed_through", float("-inf")),
    )


def window_summary(start: float, window: float, levels: Mapping[str, int]) -> Dict[str, Any]:
    """One window's counts per level, total, errors and error ratio."""
    total = sum(levels.values())
    errors = sum(count for level, count in levels.items() if is_error(level))
    return {
        "start": start,
        "end": start + window,
        "counts": {level: levels.get(level, 0) for level in LEVELS},
        "total": total,
        "errors": errors,
        "error_ratio": errors / total if total else 0.0,
    }


def is_error(level: str) -> bool:
    return level in ERROR_LEVELS
