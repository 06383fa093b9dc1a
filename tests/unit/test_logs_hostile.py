"""Every record on ``logs`` is hostile until parsed: valid and hostile records mixed in one batch go
through the agent's parse path (agents/logs.py ``parse_parts``); every valid line becomes its
document, every hostile record is refused with its reason (or kept as the plain line the docs say
it is), and nothing raises out of it."""
from __future__ import annotations

import re
import shlex
import traceback
from datetime import datetime, timezone
from typing import Any, Dict, List, NamedTuple, Optional

import orjson
import pytest
from faust.types import Message
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agents.logs import ParsedBatch, parse_parts
from models.logs import FIELD_ALIASES, KEY_PATTERN, InvalidRecord, RecordContext, parse_logfmt, parse_record

MAX_NESTING = 100  # docs/logging.md: a line nested deeper, or a field name of more parts, is refused
RECORD_TIME = 1730462400.0  # 2024-11-01T12:00:00Z
RECORD_TIME_TEXT = "2024-11-01T12:00:00.000Z"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Case(NamedTuple):
    """A record and what must become of it: its documents' messages in order (valid), or a dead
    letter whose reason matches ``reason``."""

    value: Optional[bytes]
    messages: Optional[List[str]] = None
    reason: Optional[str] = None
    key: Optional[bytes] = b"cart"
    timestamp: float = RECORD_TIME
    timestamps: Optional[List[str]] = None  # the documents' @timestamp, when the case knows them
    error_type: Optional[str] = None  # error.type of its (single) document


class Event:
    """What parse_parts reads of a faust Event."""

    def __init__(self, offset: int, case: Case) -> None:
        self.message = Message("logs", 0, offset, case.timestamp, 0, [], case.key, case.value, None)


def shipped(cases: List[Case]) -> ParsedBatch:
    """Run ``cases`` through the agent's parse path as one batch; check each one's outcome."""
    events = [Event(offset, case) for offset, case in enumerate(cases)]
    batch = ParsedBatch()
    parts = list(parse_parts(batch, events, 50))

    assert [event for part in parts for event in part.events] == events  # every record is released
    docs: Dict[int, List[Dict[str, Any]]] = {}
    for part in parts:
        for action, doc in part.actions:
            offset, line = map(int, action["index"]["_id"].split("-")[2:])
            assert line == len(docs.setdefault(offset, []))
            docs[offset].append(doc)
            orjson.dumps(doc)  # what the bulk write will do with it
    refused = {event.message.offset: reason for event, reason in batch.invalid}
    for offset, case in enumerate(cases):
        if case.reason is not None:
            assert offset in refused and offset not in docs, (case, docs.get(offset))
            assert re.search(case.reason, refused[offset]), (case.reason, refused[offset])
        else:
            assert offset not in refused, (case, refused[offset])
            assert [doc["message"] for doc in docs[offset]] == case.messages
            if case.timestamps is not None:
                assert [doc["@timestamp"] for doc in docs[offset]] == case.timestamps
            if case.error_type is not None:
                assert docs[offset][0]["error"]["type"] == case.error_type
    assert batch.lines == sum(len(case.messages) for case in cases if case.reason is None)
    return batch


# --- valid records ---------------------------------------------------------------------------------

LEVELS = st.sampled_from(["info", "WARNING", "err", "debug", "FATAL", 3, "unknown-level"])
ANY_TEXT = st.text(max_size=200)
# A plain line: not JSON, not logfmt (no "="), on one line.
PLAIN_TEXT = st.text(st.characters(blacklist_characters="=\r\n\x1c\x1d\x1e\x85\u2028\u2029", blacklist_categories=("Cs",)),
                     min_size=1, max_size=200).filter(lambda text: text.strip() and text.strip()[0] not in "{[")
VALID_TIMES = st.one_of(
    st.floats(min_value=1e9, max_value=4e9),
    st.integers(min_value=10**12, max_value=4 * 10**12),
    st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(9998, 12, 31), timezones=st.just(timezone.utc)).map(
        lambda moment: moment.isoformat()),
)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False, allow_infinity=False), ANY_TEXT)
EXTRA_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=10)


@st.composite
def json_lines(draw) -> Dict[str, Any]:
    line: Dict[str, Any] = {"message": draw(ANY_TEXT), "level": draw(LEVELS)}
    if draw(st.booleans()):
        line["ts"] = draw(VALID_TIMES)
    extra = draw(st.dictionaries(st.sampled_from(["order_id", "http", "user", "labels", "trace_id", "tags", "error.code"]), EXTRA_VALUES, max_size=3))
    return {**extra, **line}


def logfmt_quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def logfmt_lines(draw) -> tuple:
    message = draw(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=200))
    return f"level={draw(st.sampled_from(['info', 'warn', 'error']))} msg={logfmt_quoted(message)} trace_id=t-1", message


@st.composite
def valid_records(draw) -> Case:
    kind = draw(st.sampled_from(["json", "logfmt", "plain", "array", "traceback", "own time", "kept plain"]))
    if kind == "json":
        line = draw(json_lines())
        return Case(orjson.dumps(line), [line["message"]])
    if kind == "logfmt":
        text, message = draw(logfmt_lines())
        return Case(text.encode(), [message])
    if kind == "plain":
        text = draw(PLAIN_TEXT)
        return Case(text.encode(), [text.strip()])
    if kind == "array":
        items, messages = [], []
        for _ in range(draw(st.integers(1, 5))):
            form = draw(st.sampled_from(["json", "logfmt", "plain"]))
            if form == "json":
                line = draw(json_lines())
                items.append(line), messages.append(line["message"])
            elif form == "logfmt":
                text, message = draw(logfmt_lines())
                items.append(text), messages.append(message)
            else:
                text = draw(PLAIN_TEXT)
                items.append(text), messages.append(text)
        return Case(orjson.dumps(items), messages)
    if kind == "traceback":
        head = draw(st.sampled_from(["ERROR payment failed", "2024-11-01 10:00:00,120 WARNING retrying", "level=error msg=crashed"]))
        stack_trace, error_type = draw(st.sampled_from(TRACEBACKS))
        message = "crashed" if head.startswith("level=") else head
        return Case(f"{head}\n{stack_trace}".encode(), [message], error_type=error_type)
    if kind == "own time":  # the Kafka timestamp is absurd, but the line has its own time
        return Case(b'{"msg": "timed", "ts": 1730462400}', ["timed"], timestamp=draw(HOSTILE_RECORD_TIMES),
                    timestamps=["2024-11-01T12:00:00.000Z"])
    return draw(st.sampled_from(DOCUMENTED_PLAIN))


def raised(error: BaseException) -> str:
    try:
        raise error
    except BaseException as caught:  # noqa: BLE001
        return "".join(traceback.format_exception(caught))


TRACEBACKS = [(raised(ValueError("card expired")), "ValueError"), (raised(KeyError("sku")), "KeyError"),
              (raised(RuntimeError()), "RuntimeError")]

# Hostile-looking records the documentation says are plain lines (message: the whole line).
DEEP_BRACKETS = "[" * 20_000 + "]" * 20_000  # not a JSON array of lines: a plain line that starts with "["
OVERFLOWING_LEADING_TIME = "0001-01-01 00:00:00+01:00 ERROR leading time before year 1 in UTC"
DOCUMENTED_PLAIN = [
    Case(DEEP_BRACKETS.encode(), [DEEP_BRACKETS]),
    # A leading time that is not a time in UTC: the record's time, as for any unreadable leading time.
    Case(OVERFLOWING_LEADING_TIME.encode(), [OVERFLOWING_LEADING_TIME], timestamps=[RECORD_TIME_TEXT]),
    Case(b"9" * 5000 + b" ERROR a long number", ["9" * 5000 + " ERROR a long number"]),
    Case(b'level=info msg="' + b"q" * 1_000_000 + b'"', ["q" * 1_000_000]),  # a huge quoted logfmt value
    Case(b'level=info msg="' + b"u" * 1_000_000, ['level=info msg="' + "u" * 1_000_000]),  # unbalanced: plain
    Case(b"ERROR " + b"x" * 2_000_000, ["ERROR " + "x" * 2_000_000]),  # a huge plain line
]


# --- hostile records -------------------------------------------------------------------------------

HOSTILE_RECORD_TIMES = st.sampled_from([1e300, -1e300, float("nan"), float("inf"), 2.0**63])


def nested(depth: int) -> bytes:
    return b'{"msg": "deep", "http": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"


@st.composite
def hostile_records(draw) -> Case:
    kind = draw(st.sampled_from([
        "deep", "deep array", "nested beyond the limit", "dotted name", "huge integer", "beyond float", "overflowing time",
        "epoch out of range", "not UTF-8", "key not UTF-8", "NaN", "surrogate", "record time", "too many lines",
        "wrong type", "long time text", "empty",
    ]))
    if kind == "deep":
        depth = draw(st.integers(1025, 30_000))
        return Case(b'{"a": ' * depth + b"1" + b"}" * depth, reason="does not parse")
    if kind == "deep array":
        depth = draw(st.integers(1025, 30_000))
        return Case(b'[{"a": ' + b"[" * depth + b"]" * depth + b"}]", reason="does not parse")
    if kind == "nested beyond the limit":  # orjson reads up to 1,024 levels; a line may hold MAX_NESTING
        return Case(nested(draw(st.integers(MAX_NESTING + 1, 1020))), reason="nested deeper than")
    if kind == "dotted name":
        parts = draw(st.integers(MAX_NESTING + 1, 2000))
        return Case(orjson.dumps({"msg": "x", "http." + ".".join(["a"] * parts): 1}), reason="field name .* parts")
    if kind == "huge integer":  # over Python's 4,300-digit limit, in JSON and in logfmt
        digits = "9" * draw(st.integers(4301, 20_000))
        return draw(st.sampled_from([
            Case(f'{{"msg": "x", "order_id": {digits}}}'.encode(), reason="does not parse"),
            Case(f"level=info msg=x ts={digits}".encode(), reason="timestamp is not a date"),
        ]))
    if kind == "beyond float":
        return Case(b'{"msg": "x", "ts": 1' + b"0" * draw(st.integers(309, 4000)) + b"}", reason="does not parse")
    if kind == "overflowing time":  # valid texts whose conversion to UTC leaves years 1..9999
        text = draw(st.sampled_from(["0001-01-01T00:00:00+01:00", "0001-01-01T00:59:59+01:00", "9999-12-31T23:59:59-01:00",
                                     "9999-12-31T23:00:00-05:30"]))
        return draw(st.sampled_from([
            Case(orjson.dumps({"msg": "x", "ts": text}), reason="timestamp is out of range"),
            Case(f"level=info msg=x ts={text}".encode(), reason="timestamp is out of range"),
        ]))
    if kind == "epoch out of range":
        number = draw(st.sampled_from([1e300, 2**64 - 1, 1e17, 253402300800000]))
        return Case(orjson.dumps({"msg": "x", "ts": number}), reason="timestamp is out of range")
    if kind == "not UTF-8":
        return Case(b"\xff" + draw(st.binary(max_size=50)), reason="not UTF-8")
    if kind == "key not UTF-8":
        return Case(b"a line", key=b"\xfe" + draw(st.binary(max_size=10)), reason="record key is not UTF-8")
    if kind == "NaN":
        return Case(draw(st.sampled_from([b'{"msg": "x", "ts": NaN}', b'{"msg": "x", "v": Infinity}', b'[{"msg": -Infinity}]'])),
                    reason="does not parse")
    if kind == "surrogate":
        return Case(b'{"msg": "x\\ud800"}', reason="does not parse")
    if kind == "record time":  # a line without a time of its own, in a record whose time is absurd
        return Case(b"a line without a time", timestamp=draw(HOSTILE_RECORD_TIMES), reason="record timestamp")
    if kind == "too many lines":
        return Case(orjson.dumps(["x"] * 10_001), reason="more than 10000")
    if kind == "wrong type":
        return draw(st.sampled_from([
            Case(b"[1, 2]", reason="must be a JSON object or a string"),
            Case(b'{"msg": "x", "service": 5}', reason="service must be a non-empty string"),
            Case(b'{"msg": "x", "ts": true}', reason="must be a time"),
            Case(b'{"msg": "x", "ts": [1730462400]}', reason="must be a number or a string"),
            Case(b'{"msg": "x", "ts": {"$date": 1}}', reason="must be a number or a string"),
            Case(b"[]", reason="empty JSON array"),
            Case(b"line of nobody", key=None, reason="no service"),
        ]))
    if kind == "long time text":
        return Case(orjson.dumps({"msg": "x", "ts": "a" * draw(st.integers(65, 1_000_000))}), reason="timestamp is not a date")
    return Case(draw(st.sampled_from([b"", b" \n\t ", None])), reason="empty record|no value")


@FUZZ
@given(st.lists(st.one_of(valid_records(), hostile_records()), min_size=1, max_size=8))
def test_a_batch_of_valid_and_hostile_records_ships_every_valid_line_and_refuses_every_hostile_record(cases):
    shipped(cases)


@pytest.mark.parametrize("case", DOCUMENTED_PLAIN, ids=lambda case: case.messages[0][:30])
def test_hostile_looking_records_documented_as_plain_lines_are_plain_lines(case):
    shipped([case])


def test_each_kind_of_hostile_record_is_refused_amid_valid_ones():
    """The fuzz above draws these; here each one at least once, between two valid lines."""
    hostile = [
        Case(b'{"a": ' * 20_000 + b"1" + b"}" * 20_000, reason="does not parse"),
        Case(nested(300), reason="nested deeper than"),  # orjson could not write it back (over 255 levels)
        Case(nested(990), reason="nested deeper than"),  # RecursionError in the stdlib json
        Case(orjson.dumps({"msg": "x", "http." + ".a" * 300: 1}), reason="field name .* parts"),
        Case(b'{"msg": "x", "order_id": ' + b"9" * 5000 + b"}", reason="does not parse"),
        Case(orjson.dumps({"msg": "x", "ts": "0001-01-01T00:00:00+01:00"}), reason="timestamp is out of range"),
        Case(b"level=info msg=x ts=9999-12-31T23:59:59-01:00", reason="timestamp is out of range"),
        Case(b"a line", timestamp=1e300, reason="record timestamp"),
        Case(b"\xff\xfe", reason="not UTF-8"),
        Case(orjson.dumps({"msg": "x", "ts": "a" * 500_000}), reason="timestamp is not a date"),
    ]
    good = Case(b'{"msg": "good", "level": "info"}', ["good"])
    cases = [good]
    for case in hostile:
        cases += [case, good]
    batch = shipped(cases)
    assert len(batch.invalid) == len(hostile)


# --- the pure parser on any input ---------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False, allow_infinity=False), ANY_TEXT),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(
        ["msg", "message", "level", "ts", "service", "host", "trace_id", "log", "log.level", "error", "http", "labels",
         "service.name", "@timestamp", "stack_trace", "a.b", "event"]) | st.text(max_size=6), inner, max_size=5),
    max_leaves=20,
)
TIME_LIKE = st.one_of(
    st.from_regex(r"\A\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:?\d{2})?\Z"),
    st.from_regex(r"\A\d{9,13}(\.\d+)?\Z"), st.text(max_size=40),
)


@FUZZ
@given(st.one_of(
    st.binary(max_size=300),
    JSON_VALUES.map(orjson.dumps),
    st.lists(JSON_VALUES, max_size=4).map(orjson.dumps),
    st.builds(lambda ts, rest: f"{ts} {rest}", TIME_LIKE, ANY_TEXT),
    st.builds(lambda ts, msg: f"ts={ts} level=info msg={logfmt_quoted(msg)}", TIME_LIKE, ANY_TEXT),
    st.builds(lambda ts: orjson.dumps({"msg": "x", "ts": ts}), TIME_LIKE),
    st.text(max_size=300),
).map(lambda value: value if isinstance(value, bytes) else value.encode()))
@example(b'{"msg": "x", "ts": "0001-01-01T00:00:00+01:00"}')
@example(b"level=info msg=x ts=0001-01-01T00:00:00+01:00")
def test_the_parser_returns_writable_documents_or_refuses_with_a_reason(value):
    context = RecordContext("cart", None, datetime.fromtimestamp(RECORD_TIME, tz=timezone.utc))
    try:
        docs = parse_record(value, context)
    except InvalidRecord as refused:
        assert str(refused)
        return
    assert docs and all(isinstance(doc["message"], str) for doc in docs)
    orjson.dumps(docs)


# --- logfmt: the same fields as a POSIX shell split, in linear time ------------------------------------

LOGFMT_CHARS = st.text(st.sampled_from(list("ab=_. \t\"'\\\n\r#é\x00\x0b")), max_size=40)


@FUZZ
@given(st.builds(lambda head, rest: head + rest, st.sampled_from(["", "level=info ", "msg=x "]), LOGFMT_CHARS))
def test_logfmt_fields_are_those_of_a_posix_shell_split(text):
    try:
        tokens: Optional[List[str]] = shlex.split(text, posix=True)
    except ValueError:
        tokens = None
    expected = None
    if tokens is not None and "=" in text and all("=" in token and KEY_PATTERN.match(token.partition("=")[0]) for token in tokens):
        expected = dict(token.partition("=")[::2] for token in tokens)
        if not {FIELD_ALIASES.get(key) for key in expected} & {"message", "log.level"}:
            expected = None
    assert parse_logfmt(text) == expected


def test_logfmt_reads_quotes_and_escapes_as_a_shell_does():
    text = 'level=info msg="a \\"quoted\\" \\\\ word" path=C:\\\\x note=\'single "q" \\n\' empty=""'
    assert parse_logfmt(text) == {
        "level": "info", "msg": 'a "quoted" \\ word', "path": "C:\\x", "note": 'single "q" \\n', "empty": "",
    }
    assert parse_logfmt('level=info msg="unbalanced') is None
    assert parse_logfmt("level=info msg=trailing\\") is None
