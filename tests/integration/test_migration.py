"""Zero-downtime migration on real workers: bridge, parallel-run comparison, phase walk."""
from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections import defaultdict
from typing import Dict, List, Optional, Set, Tuple

from aiokafka import AIOKafkaProducer

from models.migration import answering_system, check_phase_change, translate
from tests.support.kafka import consume_sync, consume_to_end_sync, produce_sync
from tests.support.workers import WorkerProcess, http_post, wait_for, wait_until_ready

TOKEN = "migration-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
V2_FIELDS = {"order_id", "customer_id", "amount", "state", "created_at", "source_version", "event_id"}
ROUTED_FIELDS = {"command_id", "order_id", "action", "payload", "system", "answers", "phase", "canary_percent"}


def v1_event(i: int, status: str = "NEW") -> dict:
    if i % 2:
        return {"id": f"o-{i}", "customer": f"c-{i % 7}", "total_cents": 1000 + i, "status": status,
                "created": "2024-11-01 10:00:00"}
    return {"schema_version": 2, "event_id": f"e-{i}", "id": f"o-{i}", "customer": f"c-{i % 7}",
            "total": f"{10 + i}.5", "currency": "EUR", "status": status, "created_at": "2024-11-01T10:00:00Z"}


def status_of(worker) -> dict:
    code, body = worker.get("/migration/status/")
    assert code == 200, body
    return body


def test_bridge_translates_each_v1_event_once_with_exact_values(isolated_broker, start_workers):
    (worker,) = start_workers(isolated_broker, 1)
    events = [v1_event(i) for i in range(40)]
    records = [(event["id"], event) for event in events]
    records += records[:10]  # replays of the first ten
    records += [("o-bad", {**v1_event(1), "id": "o-bad", "status": "LOST"}), ("o-1", v1_event(3))]  # bad status, wrong key
    produce_sync(isolated_broker.bootstrap, "orders.v1", records, max_batch_size=1)

    status = wait_for(lambda: (lambda s: s["bridge"]["translated"] + s["bridge"]["dead_lettered"] + s["bridge"]["duplicates"] >= 52 and s)(status_of(worker)),
                      timeout=60, message="bridge done")
    assert status["bridge"] == {**status["bridge"], "translated": 40, "dead_lettered": 2, "duplicates": 10}
    translated = consume_sync(isolated_broker.bootstrap, "orders.v2", 40)
    by_order = {record.key.decode(): json.loads(record.value) for record in translated}
    assert len(translated) == 40 and len(by_order) == 40
    for event in events:  # exactly the documented fields: no Faust "__faust" metadata
        assert by_order[event["id"]] == translate(dict(event)).asdict()
        assert set(by_order[event["id"]]) == V2_FIELDS
    assert by_order["o-3"]["amount"] == {"value": "10.03", "currency": "USD"}
    assert by_order["o-4"]["amount"] == {"value": "14.50", "currency": "EUR"}
    dead = consume_sync(isolated_broker.bootstrap, "orders.v1.dlq", 2)
    reasons = sorted(dict(record.headers)["dlq.reason"].decode() for record in dead)
    assert "unknown V1 status 'LOST'" in reasons[1] and "is not the order id 'o-3'" in reasons[0]
    completeness = wait_for(lambda: (lambda c: c["reconciled"] == 40 and c)(status_of(worker)["completeness"]), message="reconciled")
    assert completeness["missing_in_v2"] == 0 and completeness["unknown_in_v1"] == 0


def test_a_buggy_v2_is_caught_field_by_field(isolated_broker, start_workers):
    (worker,) = start_workers(isolated_broker, 1, MIGRATION_COMPARE_WINDOW="3")
    v1_results, v2_results = [], []
    for i in range(30):
        event = {**v1_event(2 * i + 1), "id": f"o-{i}"}
        v1_results.append((f"r-{i}", event))
        v2 = translate(dict(event)).asdict()
        if i % 5 == 0:
            v2["amount"] = {**v2["amount"], "value": str(float(v2["amount"]["value"]) + 0.02)}  # the V2 bug
        if i % 7 == 0:
            v2["state"] = "paid"
        if i < 28:
            v2_results.append((f"r-{i}", v2))
    v2_results.append(("r-99", translate(dict(v1_event(99))).asdict()))  # V2 answered, V1 never did
    produce_sync(isolated_broker.bootstrap, "migration.v1.results", v1_results, max_batch_size=1)
    produce_sync(isolated_broker.bootstrap, "migration.v2.results", v2_results, max_batch_size=1)

    def settled():
        status = status_of(worker)
        done = status["compared"] == 28 and status["missing_in_v2"] == 2 and status["missing_in_v1"] == 1
        return status if done else None

    status = wait_for(settled, timeout=60, message="comparison settled")
    amount_bugs = {i for i in range(28) if i % 5 == 0}
    state_bugs = {i for i in range(28) if i % 7 == 0}
    assert status["mismatched"] == len(amount_bugs | state_bugs)
    assert status["matched"] == 28 - len(amount_bugs | state_bugs)
    assert status["field_mismatches"] == {"amount.value": len(amount_bugs), "state": len(state_bugs)}
    assert status["parity"] == status["matched"] / 28
    sample = next(sample for sample in status["samples"] if sample["key"] == "r-0")
    assert sample["diff"]["state"] == {"v1": "created", "v2": "paid"}
    assert set(sample["diff"]) == {"amount.value", "state"}


class CommandStream:
    """Commands at a steady rate from a thread, until stopped; remembers their ids."""

    def __init__(self, bootstrap: str, rate: float = 100.0) -> None:
        self.bootstrap, self.rate = bootstrap, rate
        self.sent: List[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=2, max_batch_size=1)
        await producer.start()
        try:
            i = 0
            while not self._stop.is_set():
                command = {"command_id": f"cmd-{i}", "order_id": f"o-{i % 500}", "action": "pay", "payload": {"n": i}}
                await producer.send_and_wait("orders.commands", json.dumps(command).encode(), key=command["order_id"].encode())
                self.sent.append(command["command_id"])
                i += 1
                await asyncio.sleep(1 / self.rate)
        finally:
            await producer.stop()

    def __enter__(self) -> "CommandStream":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


def expected_answers(bootstrap: str, count: int) -> Tuple[Dict[str, str], Dict[str, str]]:
    """Which system must answer each command (the phase of the last marker before it in its
    partition), and where each command is (partition:offset)."""
    records = consume_sync(bootstrap, "orders.commands", count, timeout=60)
    phase: Dict[int, Tuple[str, int]] = defaultdict(lambda: ("shadow", 0))
    expected: Dict[str, str] = {}
    where: Dict[str, str] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        data = json.loads(record.value)
        if "phase_marker" in data:
            phase[record.partition] = (data["phase_marker"]["phase"], data["phase_marker"]["canary_percent"])
        else:
            expected[data["command_id"]] = answering_system(*phase[record.partition], data["order_id"])
            where[data["command_id"]] = f"{data['command_id']}@{record.partition}:{record.offset}"
    return expected, where


def processed(bootstrap: str, system: str, sent: List[str], timeout: float = 60.0) -> Tuple[Dict[str, bool], int]:
    """What a system received: command id -> answers flag (duplicates must agree), and the
    duplicates; reads the whole topic again until every sent command is there or time is up."""
    deadline = time.monotonic() + timeout
    while True:
        answers: Dict[str, bool] = {}
        duplicates = 0
        for record in consume_to_end_sync(bootstrap, f"orders.{system}.in"):
            routed = json.loads(record.value)
            assert set(routed) == ROUTED_FIELDS, routed  # exactly the documented fields
            if routed["command_id"] in answers:
                duplicates += 1
                assert answers[routed["command_id"]] == routed["answers"], f"{routed['command_id']} routed two ways"
            answers[routed["command_id"]] = routed["answers"]
        if set(sent) <= set(answers) or time.monotonic() > deadline:
            return answers, duplicates
        time.sleep(1.0)


def change_phase(worker, phase: str, percent: Optional[int] = None) -> None:
    body = {"phase": phase, **({"canary_percent": percent} if percent else {})}
    status, answer = http_post(worker.url + "/migration/phase", body, headers=AUTH)
    assert status == 202, answer
    wait_for(lambda: (lambda s: s["phase"] == phase and s)(status_of(worker)), timeout=60, message=f"phase {phase}")


def walk_phases(workers, stream: CommandStream, pause: float, between=None) -> None:
    for step, (phase, percent) in enumerate([("canary", 10), ("cutover", None), ("rollback", None)]):
        time.sleep(pause)
        change_phase(workers[step % len(workers)], phase, percent)
        if between is not None:
            between(step)
    time.sleep(pause)


def check_routing(bootstrap: str, sent: List[str], markers: int, strict: bool) -> Set[str]:
    expected, where = expected_answers(bootstrap, len(sent) + markers)
    assert set(expected) == set(sent)
    seen_phases = set()
    for system in ("v1", "v2"):
        answers, duplicates = processed(bootstrap, system, sent)
        lost = sorted(set(sent) - set(answers), key=lambda command: int(command.split("-")[1]))
        assert not lost, f"{system} did not get {len(lost)} commands: {[where[command] for command in lost]}"
        assert {command for command, answer in answers.items() if answer} == {c for c, s in expected.items() if s == system}
        if strict:
            assert duplicates == 0
    seen_phases.update(expected.values())
    return seen_phases


def test_phase_walk_under_a_steady_stream_loses_and_duplicates_nothing(isolated_broker, start_workers):
    workers = start_workers(isolated_broker, 1, ADMIN_TOKEN=TOKEN)
    assert http_post(workers[0].url + "/migration/phase", {"phase": "cutover"}, headers=AUTH)[0] == 400  # not from shadow
    assert http_post(workers[0].url + "/migration/phase", {"phase": "canary", "canary_percent": 10})[0] == 401
    with CommandStream(isolated_broker.bootstrap) as stream:
        walk_phases(workers, stream, pause=2.0)
    sent = list(stream.sent)
    assert check_routing(isolated_broker.bootstrap, sent, markers=3 * 8, strict=True) == {"v1", "v2"}
    status = status_of(workers[0])
    assert status["phase"] == "rollback" and status["router"]["routed"] == len(sent)


def test_killing_a_worker_during_the_walk_changes_nothing(isolated_broker, start_workers, tmp_path, app_id):
    workers = start_workers(isolated_broker, 2, ADMIN_TOKEN=TOKEN)
    restarted: List[WorkerProcess] = []

    def kill_and_restart(step: int) -> None:
        if step == 0:
            workers[1].stop(signal.SIGKILL)
            replacement = WorkerProcess(isolated_broker.url, workers[1].work_dir, app_id=app_id,
                                        env={"ADMIN_TOKEN": TOKEN}).start()
            restarted.append(replacement)
            wait_until_ready([workers[0], replacement], timeout=120)

    try:
        with CommandStream(isolated_broker.bootstrap) as stream:
            walk_phases([workers[0]], stream, pause=2.0, between=kill_and_restart)
        sent = list(stream.sent)
        assert check_routing(isolated_broker.bootstrap, sent, markers=3 * 8, strict=False) == {"v1", "v2"}
        assert status_of(restarted[0])["phase"] == status_of(workers[0])["phase"] == "rollback"
    finally:
        for worker in restarted:
            worker.stop()


DEEP = b"[" * 10_000 + b"]" * 10_000


def raw_json(template: dict, field: str, raw: str) -> bytes:
    """``template`` as JSON with ``field`` set to raw JSON text (numbers Python cannot print)."""
    return json.dumps({**template, field: "@@RAW@@"}).replace('"@@RAW@@"', raw).encode()


def dead_letters(bootstrap: str, topic: str, count: int) -> List[str]:
    records = consume_sync(bootstrap, f"{topic}.dlq", count)
    assert len(records) == count
    return [dict(record.headers)["dlq.reason"].decode() for record in records]


def test_hostile_records_are_dead_lettered_and_the_good_ones_around_them_applied(isolated_broker, start_workers):
    (worker,) = start_workers(isolated_broker, 1, MIGRATION_COMPARE_WINDOW="600")
    bootstrap = isolated_broker.bootstrap
    schema_2 = v1_event(2)
    hostile_v1 = [("o-h", DEEP), ("o-h", raw_json(v1_event(1), "total_cents", "9" * 5000)),
                  ("o-h", json.dumps({**v1_event(1), "id": "o-h", "total_cents": 10**40}).encode()),
                  ("o-h", json.dumps({**schema_2, "id": "o-h", "created_at": "0001-01-01T00:30:00+01:00"}).encode()),
                  ("o-h", raw_json({**schema_2, "id": "o-h"}, "total", "1" + "0" * 400)),
                  ("o-h", json.dumps({**schema_2, "id": "o-h", "event_id": "\ud800"}).encode())]
    good_v1 = [(f"o-{i}", v1_event(i)) for i in range(10)]
    interleaved = [record for pair in zip(good_v1[:len(hostile_v1)], hostile_v1, strict=True) for record in pair] + good_v1[len(hostile_v1):]
    produce_sync(bootstrap, "orders.v1", interleaved, max_batch_size=1)
    hostile_v2 = [("o-0", DEEP), ("o-0", b"not json"), ("o-other", json.dumps(translate(v1_event(0)).asdict()).encode())]
    produce_sync(bootstrap, "orders.v2", hostile_v2)
    command = {"command_id": "c-h", "order_id": "o-h", "action": "pay", "payload": {}}
    hostile_commands = [("o-h", DEEP), ("o-h", json.dumps({**command, "payload": {"n": 2**64}}).encode()),
                        ("o-h", raw_json(command, "payload", '{"n": NaN}')),
                        (None, b'{"phase_marker": %s}' % raw_json({"phase": "cutover", "canary_percent": 0, "change_id": "x"},
                                                                  "changed_at", "1" + "0" * 400))]
    good_commands = [(f"o-{i}", {"command_id": f"c-{i}", "order_id": f"o-{i}", "action": "pay", "payload": {"n": 2**63 - 1}}) for i in range(10)]
    produce_sync(bootstrap, "orders.commands", good_commands[:5] + hostile_commands + good_commands[5:], max_batch_size=1)
    hostile_results = [("r-h", DEEP), ("r-h", json.dumps({"n": 2**64}).encode()),
                       ("r-h", json.dumps({**v1_event(1), "total_cents": 10**40, "n": 2**70}).encode()), (None, b"{}")]
    v1_results = [(f"r-{i}", v1_event(2 * i + 1)) for i in range(5)]
    v2_results = [(f"r-{i}", translate(v1_event(2 * i + 1)).asdict()) for i in range(5)]
    produce_sync(bootstrap, "migration.v1.results", v1_results[:2] + hostile_results + v1_results[2:], max_batch_size=1)
    produce_sync(bootstrap, "migration.v2.results", v2_results, max_batch_size=1)

    def settled():
        status = status_of(worker)
        done = (status["bridge"]["translated"] == 10 and status["bridge"]["dead_lettered"] == 6
                and status["router"]["routed"] == 10 and status["router"]["dead_lettered"] == 4 and status["compared"] == 5
                and status["completeness"]["reconciled"] == 10)
        return status if done else None

    status = wait_for(settled, timeout=90, message="every good record applied")
    assert status["matched"] == 5 and status["bridge"]["duplicates"] == 0
    bridged = [record for record in consume_sync(bootstrap, "orders.v2", 13) if record.value not in {value for _, value in hostile_v2}]
    by_order = {record.key.decode(): json.loads(record.value) for record in bridged}
    assert by_order == {key: translate(event).asdict() for key, event in good_v1}
    for system in ("v1", "v2"):
        routed = {json.loads(record.value)["command_id"]: json.loads(record.value) for record in consume_sync(bootstrap, f"orders.{system}.in", 10)}
        assert set(routed) == {f"c-{i}" for i in range(10)} and all(set(value) == ROUTED_FIELDS for value in routed.values())
    assert all(dead_letters(bootstrap, "orders.v1", 6))
    assert all(dead_letters(bootstrap, "orders.v2", 3))
    assert all(dead_letters(bootstrap, "orders.commands", 4))
    assert all(dead_letters(bootstrap, "migration.v1.results", 4))


def marker_walks(bootstrap: str) -> Dict[int, List[Tuple[str, int]]]:
    """Each orders.commands partition's phase markers, in offset order."""
    walks: Dict[int, List[Tuple[str, int]]] = defaultdict(list)
    for record in sorted(consume_to_end_sync(bootstrap, "orders.commands"), key=lambda r: (r.partition, r.offset)):
        marker = json.loads(record.value).get("phase_marker")
        if marker:
            walks[record.partition].append((marker["phase"], marker["canary_percent"]))
    return walks


def test_phase_changes_posted_back_to_back_cannot_make_a_forbidden_move(isolated_broker, start_workers):
    # The local broker answers a fetch only after the full wait: with 2 s the router reads a marker
    # up to 2 s after POST wrote it, so the second POST comes while the first is still in flight.
    (worker,) = start_workers(isolated_broker, 1, ADMIN_TOKEN=TOKEN, CONSUMER_FETCH_WAIT_MS="2000")
    post = lambda body: http_post(worker.url + "/migration/phase", body, headers=AUTH)  # noqa: E731
    change_phase(worker, "canary", 10)

    first, second = post({"phase": "cutover"}), post({"phase": "canary", "canary_percent": 5})
    assert first[0] == 202, first
    assert second[0] in (409, 400) and isinstance(second[1], dict) and second[1].get("error"), second  # cutover -> canary
    wait_for(lambda: (lambda s: s["phase"] == "cutover" and not s["pending_changes"] and s)(status_of(worker)),
             timeout=60, message="cutover everywhere")

    change_phase(worker, "rollback")
    change_phase(worker, "shadow")
    change_phase(worker, "canary", 10)
    answers: Dict[str, Tuple[int, dict]] = {}
    posts = [threading.Thread(target=lambda name=name, body=body: answers.__setitem__(name, post(body)))
             for name, body in (("cutover", {"phase": "cutover"}), ("canary", {"phase": "canary", "canary_percent": 20}))]
    for thread in posts:
        thread.start()
    for thread in posts:
        thread.join(30)
    assert any(code == 202 for code, _ in answers.values()), answers
    assert all(code in (202, 409, 400) for code, _ in answers.values()), answers
    status = wait_for(lambda: (lambda s: s["phase"] != "changing" and not s["pending_changes"] and s)(status_of(worker)),
                      timeout=60, message="the accepted changes everywhere")

    walks = marker_walks(isolated_broker.bootstrap)
    assert len(walks) == 8 and len({tuple(walk) for walk in walks.values()}) == 1, walks  # one walk, every partition
    walk = walks[0]
    current = "shadow"
    for phase, percent in walk:  # every step allowed from the phase before it
        check_phase_change(current, phase, percent or None)
        current = phase
    assert (status["phase"], status["canary_percent"]) == walk[-1]
