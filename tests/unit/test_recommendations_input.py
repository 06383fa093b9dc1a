"""Hostile input on the recommendation agents' topics (user-events, recs-item-updates, items).

Every record that fails decoding or validation (deep nesting, huge numbers, bad dates, non-UTF-8
bytes, lone surrogates, NaN, wrong types) is a dead letter with a reason, and the valid records of
the same batch have exactly their effects. Each topic is fuzzed twice with hypothesis: its decode
step alone (many examples, fast) and its agent under Faust's test_context (valid and hostile
records mixed in one stream; effects compared with the pure functions' over the valid ones)."""
from __future__ import annotations

import asyncio
import itertools
import time
from types import SimpleNamespace
from typing import Any, Dict, List, NamedTuple, Optional

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.recommendations import (
    decode_item,
    decode_item_updates,
    decode_user_event,
    item_updates_topic,
    record_item_updates,
    record_items,
    record_user_events,
    user_events_topic,
)
from app import settings as app_settings
from app.runtime import require_encodable
from models.recommendations import EVENT_WEIGHTS, UserEvent, add_purchase, apply_item_update, item_updates, update_session
from tables.recommendations import recs_item_meta, recs_item_stats, recs_purchased, recs_sessions

START = time.time()
OLDEST = START - 30 * 86400  # valid event times: the last month
NEWEST = START - 60
AGENT_EXAMPLES = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
DECODE_EXAMPLES = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))


class Case(NamedTuple):
    """One record on a topic; ``expected`` is what decoding must return, None for a dead letter."""

    key: Optional[bytes]
    value: bytes
    expected: Any


# --- hostile fragments -----------------------------------------------------------------------------

DEEP = b"[" * 5000 + b"]" * 5000
UNIVERSAL = [  # hostile as any field's value
    DEEP, b"1" * 5000, b"1" + b"0" * 400, b"-1" + b"0" * 400, b"NaN", b"Infinity", b"-Infinity",
    b'"\\ud800"', b'"x\\udfff"', b'"\xff\xfe"', b'"a\xc3"', b'{"a": ' + DEEP + b"}",
]
WHOLE_RECORDS = [
    b"", b"null", b"[1]", b'"text"', b"7", b"\xff\xfe{", b"{nope", b"[" * 100_000 + b"]" * 100_000,
    b"1" * 5000, b'{"a": NaN}',
]
TEXT = UNIVERSAL + [b"7", b"true", b"{}", b"[]", b'""', b'"   "', orjson.dumps("x" * 300)]
REQUIRED_TEXT = TEXT + [b"null"]
TIMES = UNIVERSAL + [
    b"null", b'"yesterday"', b"true", b"-62135596800", b"253402300800", b'"9999-12-31T23:59:59-14:00"',
    b'"0001-01-01T00:00:00+14:00"', str(int(START * 1000)).encode(), str(START / 1000).encode(), b"[]",
]


def render(fields: Dict[str, bytes]) -> bytes:
    """A JSON object from already-encoded field values (so they can be malformed)."""
    return b"{" + b",".join(orjson.dumps(name) + b":" + value for name, value in fields.items()) + b"}"


def encoded(fields: Dict[str, Any]) -> Dict[str, bytes]:
    return {name: orjson.dumps(value) for name, value in fields.items()}


def fake_event(key: Optional[bytes], value: bytes) -> Any:
    return SimpleNamespace(key=key, value=value, message=SimpleNamespace(topic="t", partition=0, offset=0))


@st.composite
def hostile_variant(draw, valid: Dict[str, Any], hostile_fields: Dict[str, List[bytes]], key: Optional[bytes]) -> Case:
    """``valid`` with one field made hostile, or a hostile record, or a hostile key."""
    kind = draw(st.sampled_from(["field", "record", "key"]))
    if kind == "record":
        return Case(key, draw(st.sampled_from(WHOLE_RECORDS)), None)
    if kind == "key":
        return Case(draw(st.sampled_from([b"\xff\xfe", b"\xc3", b"someone-else"])), orjson.dumps(valid), None)
    name = draw(st.sampled_from(sorted(hostile_fields)))
    fields = encoded(valid)
    fields[name] = draw(st.sampled_from(hostile_fields[name]))
    return Case(key, render(fields), None)


# --- user-events -----------------------------------------------------------------------------------

EVENT_FIELDS = {
    "user_id": REQUIRED_TEXT, "item_id": REQUIRED_TEXT, "session_id": TEXT, "ts": TIMES,
    "event": UNIVERSAL + [b'"like"', b'"VIEW"', b"7", b"null", b'["view"]'],
}
times = st.floats(OLDEST, NEWEST, allow_nan=False)


@st.composite
def user_event_cases(draw, prefix: str = "") -> Case:
    fields = {
        "user_id": prefix + draw(st.sampled_from(["u1", "u2", "u3"])),
        "item_id": prefix + draw(st.sampled_from(["sku-a", "sku-b", "sku-c", "sku-d"])),
        "event": draw(st.sampled_from(sorted(EVENT_WEIGHTS))),
        "ts": draw(times),
        "session_id": draw(st.sampled_from([None, "s1", "s2"])),
    }
    key = None if draw(st.integers(0, 5)) == 0 else fields["user_id"].encode()
    if draw(st.booleans()):
        return draw(hostile_variant(fields, EVENT_FIELDS, key))
    return Case(key, orjson.dumps(fields), UserEvent(**fields))


@DECODE_EXAMPLES
@given(user_event_cases())
def test_a_user_event_decodes_to_its_fields_or_is_refused(case):
    outcome = decoded(decode_user_event, case)
    if case.expected is None:
        assert isinstance(outcome, Exception) and str(outcome), outcome
    else:
        assert outcome.asdict() == case.expected.asdict()
        require_encodable(outcome.asdict())


def decoded(decode, case: Case) -> Any:
    try:
        return decode(fake_event(case.key, case.value))
    except Exception as error:  # noqa: BLE001 - a refused record: what decoded_batches dead-letters
        return error


# --- items -----------------------------------------------------------------------------------------

ITEM_FIELDS = {
    "item_id": REQUIRED_TEXT,
    "price": UNIVERSAL + [b'"cheap"', b"true", b"[]", b"{}"],
    "available": UNIVERSAL + [b'"no"', b"1", b"0", b"null", b"[]"],
    "category": UNIVERSAL + [b"{}", b"[1]", b"true", orjson.dumps("x" * 300)],
}


@st.composite
def item_cases(draw, prefix: str = "") -> Case:
    fields = {
        "item_id": prefix + draw(st.sampled_from(["sku-a", "sku-b", "sku-c"])),
        "category": draw(st.one_of(st.none(), st.sampled_from(["shoes", "hats"]), st.integers(0, 99))),
        "price": draw(st.one_of(st.none(), st.integers(0, 2**64 - 1), st.floats(0, 1e6, allow_nan=False))),
        "available": draw(st.booleans()),
    }
    key = fields["item_id"].encode() if draw(st.integers(0, 5)) else None
    if draw(st.booleans()):
        return draw(hostile_variant(fields, ITEM_FIELDS, key))
    meta = {"category": None if fields["category"] is None else str(fields["category"]), "price": fields["price"], "available": fields["available"]}
    return Case(key, orjson.dumps(fields), (fields["item_id"], meta))


@DECODE_EXAMPLES
@given(item_cases())
def test_an_item_decodes_to_its_metadata_or_is_refused(case):
    outcome = decoded(decode_item, case)
    if case.expected is None:
        assert isinstance(outcome, Exception) and str(outcome), outcome
    else:
        item_id, meta = case.expected
        assert (outcome.item_id, {"category": outcome.category, "price": outcome.price, "available": outcome.available}) == (item_id, meta)
        require_encodable(outcome.asdict())


# --- recs-item-updates -----------------------------------------------------------------------------

UPDATE_FIELDS = {
    "item": UNIVERSAL + [b'"another-item"', b"null"],
    "source": UNIVERSAL + [b"[true, 1]", b"[0]", b"[-1, 3]", b"[0, 18446744073709551615]", b"[0, 1.5]", b'"0:1"', b"[2147483648, 1]", b"null"],
    "ts": TIMES,
    "weight": UNIVERSAL + [b"-1", b"100", b'"1"', b"true", b"null"],
    "pairs": UNIVERSAL + [
        b"[]", b"null", b'{"": 1}', b'{"x": "y"}', b'{"x": -1}', b'{"x": 1e300}', b'{"x": true}', b'{"x": ' + DEEP + b"}",
        b'{"\\ud800": 1}', orjson.dumps({f"n{i}": 1.0 for i in range(11)}), orjson.dumps({"x" * 300: 1.0}),
    ],
}
pair_weights = st.floats(0, 8, allow_nan=False)


@st.composite
def item_update_cases(draw, prefix: str = "", offsets=None) -> Case:
    item = prefix + draw(st.sampled_from(["sku-a", "sku-b", "sku-c"]))
    updates = [
        {"item": item, "source": [draw(st.integers(0, 3)), next(offsets) if offsets else draw(st.integers(0, 2**63 - 1))],
         "ts": draw(times), "weight": draw(st.sampled_from([0.0, *EVENT_WEIGHTS.values()])),
         "pairs": draw(st.dictionaries(st.sampled_from([prefix + other for other in ("sku-x", "sku-y", "sku-z")]), pair_weights, max_size=3))}
        for _ in range(draw(st.integers(1, 3)))
    ]
    record = {"item": item, "updates": updates}
    if not draw(st.booleans()):
        return Case(item.encode(), orjson.dumps(record), (item, updates))
    kind = draw(st.sampled_from(["update", "extra", "missing", "record", "keyless", "bad key", "other item", "not a list"]))
    if kind == "update":
        name = draw(st.sampled_from(sorted(UPDATE_FIELDS)))
        fields = encoded(updates[0])
        fields[name] = draw(st.sampled_from(UPDATE_FIELDS[name]))
        value = b'{"item":' + orjson.dumps(item) + b',"updates":[' + b",".join([render(fields)] + [orjson.dumps(u) for u in updates[1:]]) + b"]}"
        return Case(item.encode(), value, None)
    hostile = {
        "extra": (item.encode(), orjson.dumps({"item": item, "updates": [{**updates[0], "extra": 1}]})),
        "missing": (item.encode(), orjson.dumps({"item": item, "updates": [{k: v for k, v in updates[0].items() if k != "ts"}]})),
        "record": (item.encode(), draw(st.sampled_from(WHOLE_RECORDS))),
        "keyless": (None, orjson.dumps(record)),
        "bad key": (b"\xff" + item.encode(), orjson.dumps(record)),
        "other item": (b"another-item", orjson.dumps(record)),
        "not a list": (item.encode(), orjson.dumps({"item": item, "updates": updates[0]})),
    }
    return Case(*hostile[kind], None)


@DECODE_EXAMPLES
@given(item_update_cases())
def test_item_updates_decode_to_their_updates_or_are_refused(case):
    outcome = decoded(decode_item_updates, case)
    if case.expected is None:
        assert isinstance(outcome, Exception) and str(outcome), outcome
    else:
        assert outcome == case.expected
        require_encodable(outcome)


# --- through the agents ----------------------------------------------------------------------------

examples = itertools.count()


def prefix() -> str:
    """Table state outlives a test_context: each example writes keys of its own."""
    return f"x{next(examples)}-"


async def until(predicate, timeout: float = 60.0) -> None:
    """Wait for the agent's batch to be written: a bound for a busy machine, not a timing assertion."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)


class Outputs:
    """What the agents hand to the dead-letter sender and to their output topics."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.letters: List[tuple] = []
        self.sent: Dict[str, List[tuple]] = {"updates": [], "forwarded": []}
        monkeypatch.setattr("app.runtime.dead_letter", self.dead_letter)
        monkeypatch.setattr(item_updates_topic, "send", self.sender("updates"))
        monkeypatch.setattr(user_events_topic, "send", self.sender("forwarded"))

    async def dead_letter(self, reason: str, event=None) -> None:
        self.letters.append((event.message.offset, reason))

    def sender(self, name: str):
        async def send(*, key=None, value=None, **_options):
            self.sent[name].append((key, value))
            delivered = asyncio.get_running_loop().create_future()
            delivered.set_result(None)
            return delivered
        return send


async def run_agent(agent, cases: List[Case], sentinel: Case, written) -> List[int]:
    async with agent.test_context() as running:
        for case in cases + [sentinel]:
            await running.put(case.value, key=case.key)
        await until(written)
    return [offset for offset, case in enumerate(cases) if case.expected is None]


@AGENT_EXAMPLES
@given(st.data())
async def test_user_events_hostile_records_are_dead_letters_and_valid_ones_apply(data):
    tag = prefix()
    cases = data.draw(st.lists(user_event_cases(tag), min_size=1, max_size=12))
    sentinel = Case(f"{tag}last".encode(), orjson.dumps({"user_id": f"{tag}last", "item_id": "sku-a", "event": "view", "ts": NEWEST}), None)
    with pytest.MonkeyPatch.context() as monkeypatch:
        outputs = Outputs(monkeypatch)
        hostile = await run_agent(record_user_events, cases, sentinel, lambda: recs_sessions[f"{tag}last"])

    assert [offset for offset, _ in outputs.letters] == hostile and all(reason for _, reason in outputs.letters)
    sessions, purchased, updates, forwarded = expected_user_effects(cases)
    for user in ("u1", "u2", "u3"):
        assert recs_sessions[tag + user] == sessions.get(tag + user, {}), user  # a table of dicts: {} when unwritten
        assert recs_purchased[tag + user] == purchased.get(tag + user, {}), user
    assert {item: updates for item, updates in sent_updates(outputs).items() if item != "sku-a"} == updates  # sku-a: the sentinel's
    assert outputs.sent["forwarded"] == forwarded


def sent_updates(outputs: Outputs) -> Dict[str, list]:
    """The item updates sent to recs-item-updates, per item, in order (whatever the batches were)."""
    sent: Dict[str, list] = {}
    for key, value in outputs.sent["updates"]:
        sent.setdefault(key.decode(), []).extend(orjson.loads(value)["updates"])
    return sent


def expected_user_effects(cases: List[Case]):
    """Sessions, purchases, item updates and forwarded records of the valid events, by the pure functions."""
    sessions: Dict[str, Any] = {}
    purchased: Dict[str, Any] = {}
    updates: Dict[str, list] = {}
    forwarded = []
    for offset, case in enumerate(cases):
        event = case.expected
        if event is None:
            continue
        if case.key is None:
            forwarded.append((event.user_id.encode(), case.value))
            continue
        update = update_session(sessions.get(event.user_id, {}), event, offset, app_settings.recs_session_timeout)
        for item, item_update in item_updates(event, update.previous_items, (0, offset)).items():
            updates.setdefault(item, []).append(item_update)
        sessions[event.user_id] = update.session
        if event.event == "purchase":
            purchased[event.user_id] = add_purchase(purchased.get(event.user_id, {}), event.item_id)
    return sessions, purchased, updates, forwarded


@AGENT_EXAMPLES
@given(st.data())
async def test_items_hostile_records_are_dead_letters_and_valid_ones_apply(data):
    tag = prefix()
    cases = data.draw(st.lists(item_cases(tag), min_size=1, max_size=12))
    sentinel = Case(f"{tag}last".encode(), orjson.dumps({"item_id": f"{tag}last"}), None)
    with pytest.MonkeyPatch.context() as monkeypatch:
        outputs = Outputs(monkeypatch)
        hostile = await run_agent(record_items, cases, sentinel, lambda: recs_item_meta[f"{tag}last"])

    assert [offset for offset, _ in outputs.letters] == hostile and all(reason for _, reason in outputs.letters)
    expected = dict(case.expected for case in cases if case.expected is not None)
    for item in ("sku-a", "sku-b", "sku-c"):
        assert recs_item_meta[tag + item] == expected.get(tag + item, {}), item


@AGENT_EXAMPLES
@given(st.data())
async def test_item_updates_hostile_records_are_dead_letters_and_valid_ones_apply(data):
    tag = prefix()
    offsets = itertools.count()
    cases = data.draw(st.lists(item_update_cases(tag, offsets), min_size=1, max_size=12))
    last = f"{tag}last"
    sentinel_update = {"item": last, "source": [0, 0], "ts": NEWEST, "weight": 1.0, "pairs": {}}
    sentinel = Case(last.encode(), orjson.dumps({"item": last, "updates": [sentinel_update]}), None)
    with pytest.MonkeyPatch.context() as monkeypatch:
        outputs = Outputs(monkeypatch)
        hostile = await run_agent(record_item_updates, cases, sentinel, lambda: recs_item_stats[last])

    assert [offset for offset, _ in outputs.letters] == hostile and all(reason for _, reason in outputs.letters)
    expected: Dict[str, Any] = {}
    for case in cases:
        if case.expected is not None:
            item, updates = case.expected
            for update in updates:
                expected[item] = apply_item_update(expected.get(item), update, max_neighbours=app_settings.recs_neighbours) or expected[item]
    for item in ("sku-a", "sku-b", "sku-c"):
        assert recs_item_stats[tag + item] == expected.get(tag + item, {}), item


# --- every hostile field value once, through the agents ----------------------------------------------


def every_hostile_variant(valid: Dict[str, Any], hostile_fields: Dict[str, List[bytes]], key: Optional[bytes]) -> List[Case]:
    """``valid`` with each field made hostile in each way, and each hostile whole record."""
    cases = [Case(key, record, None) for record in WHOLE_RECORDS]
    for name, fragments in hostile_fields.items():
        for fragment in fragments:
            cases.append(Case(key, render({**encoded(valid), name: fragment}), None))
    return cases


async def test_every_hostile_user_event_is_a_dead_letter_amid_applied_ones(monkeypatch):
    tag = prefix()
    first = {"user_id": f"{tag}u1", "item_id": f"{tag}sku-a", "event": "view", "ts": NEWEST - 10, "session_id": None}
    second = {**first, "item_id": f"{tag}sku-b", "event": "purchase", "ts": NEWEST}
    key = first["user_id"].encode()
    cases = [Case(key, orjson.dumps(first), UserEvent(**first))]
    cases += every_hostile_variant(first, EVENT_FIELDS, key) + every_hostile_variant(first, EVENT_FIELDS, None)
    cases += [Case(b"\xff\xfe", orjson.dumps(first), None), Case(b"someone-else", orjson.dumps(first), None)]
    last = Case(key, orjson.dumps(second), UserEvent(**second))
    outputs = Outputs(monkeypatch)

    hostile = await run_agent(record_user_events, cases, last, lambda: recs_purchased[first["user_id"]])

    assert [offset for offset, _ in outputs.letters] == hostile and all(reason for _, reason in outputs.letters)
    assert [entry[0] for entry in recs_sessions[first["user_id"]]["items"]] == [f"{tag}sku-a", f"{tag}sku-b"]
    assert recs_purchased[first["user_id"]] == {"items": [f"{tag}sku-b"]}
    assert sent_updates(outputs) == expected_user_effects(cases + [last])[2]  # batches may split them: compared per item
    assert outputs.sent["forwarded"] == []


async def test_every_hostile_item_is_a_dead_letter_amid_applied_ones(monkeypatch):
    tag = prefix()
    valid = {"item_id": f"{tag}sku-a", "category": "shoes", "price": 9.5, "available": True}
    key = valid["item_id"].encode()
    cases = [Case(key, orjson.dumps({**valid, "price": 8}), (valid["item_id"], {"category": "shoes", "price": 8, "available": True}))]
    cases += every_hostile_variant(valid, ITEM_FIELDS, key) + every_hostile_variant(valid, ITEM_FIELDS, None)
    last = Case(f"{tag}last".encode(), orjson.dumps({"item_id": f"{tag}last"}), None)
    outputs = Outputs(monkeypatch)

    hostile = await run_agent(record_items, cases, last, lambda: recs_item_meta[f"{tag}last"])

    assert [offset for offset, _ in outputs.letters] == hostile and all(reason for _, reason in outputs.letters)
    assert recs_item_meta[valid["item_id"]] == {"category": "shoes", "price": 8, "available": True}


async def test_every_hostile_item_update_is_a_dead_letter_amid_applied_ones(monkeypatch):
    tag = prefix()
    item = f"{tag}sku-a"
    valid = {"item": item, "source": [0, 1], "ts": NEWEST, "weight": 1.0, "pairs": {f"{tag}sku-b": 0.5}}
    cases = [Case(item.encode(), orjson.dumps({"item": item, "updates": [valid]}), (item, [valid]))]
    for name, fragments in UPDATE_FIELDS.items():
        for fragment in fragments:
            update = render({**encoded({**valid, "source": [0, 2]}), name: fragment})
            cases.append(Case(item.encode(), b'{"item":' + orjson.dumps(item) + b',"updates":[' + update + b"]}", None))
    cases += [Case(item.encode(), record, None) for record in WHOLE_RECORDS]
    cases += [Case(None, cases[0].value, None), Case(b"\xff", cases[0].value, None), Case(b"another-item", cases[0].value, None)]
    last_update = {**valid, "source": [0, 3], "ts": NEWEST + 1}
    last = Case(item.encode(), orjson.dumps({"item": item, "updates": [last_update]}), None)
    outputs = Outputs(monkeypatch)

    hostile = await run_agent(record_item_updates, cases, last, lambda: recs_item_stats[item].get("applied") == {"0": 3})

    assert [offset for offset, _ in outputs.letters] == hostile and all(reason for _, reason in outputs.letters)
    assert recs_item_stats[item] == apply_item_update(apply_item_update(None, valid), last_update)
