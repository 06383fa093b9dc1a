"""The operations commands (`faust -A app <command>`) against a real worker and broker."""
from __future__ import annotations

import json
import subprocess
from typing import List

from tests.support.kafka import consume_sync, produce_sync
from tests.support.workers import FAUST, REPO_ROOT, environment_with, wait_for

ADMIN_TOKEN = "cli-admin-token-0123"


def faust(broker, worker, *args: str) -> subprocess.CompletedProcess:
    env = environment_with(KAFKA_BROKER=broker.url, ADMIN_TOKEN=ADMIN_TOKEN, WEB_PORT=str(worker.port))
    return subprocess.run([str(FAUST), "-A", "app", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def json_output(result: subprocess.CompletedProcess):
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_dead_letters_are_replayed_to_their_topic_as_first_written_with_a_filter_and_a_dry_run(isolated_broker, start_workers):
    (worker,) = start_workers(isolated_broker, 1, ADMIN_TOKEN=ADMIN_TOKEN)
    produce_sync(isolated_broker.bootstrap, "metrics", [("cart", b"not json at all"), ("shop", b'{"metric": "cpu"}')])
    letters = consume_sync(isolated_broker.bootstrap, "metrics.dlq", 2)
    assert {letter.key for letter in letters} == {b"cart", b"shop"}

    dry = faust(isolated_broker, worker, "dlq-replay", "metrics", "--key", "cart", "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "1 of 1 matching dead letters would go back to metrics" in dry.stdout
    assert len(consume_sync(isolated_broker.bootstrap, "metrics", 3, timeout=3, exact=False)) == 2

    replay = faust(isolated_broker, worker, "dlq-replay", "metrics", "--key", "cart")
    assert replay.returncode == 0, replay.stderr[-2000:]
    assert "replayed 1 of 1" in replay.stdout
    records = consume_sync(isolated_broker.bootstrap, "metrics", 3)
    replayed = [record for record in records if any(name == "dlq.replayed-from" for name, _ in record.headers or ())]
    assert [(record.key, record.value) for record in replayed] == [(b"cart", b"not json at all")]
    assert not [name for name, _ in replayed[0].headers if name != "dlq.replayed-from"]
    # refused again by the unchanged worker: a third dead letter, which names where it was replayed from
    again = consume_sync(isolated_broker.bootstrap, "metrics.dlq", 3)
    assert sorted(letter.key for letter in again) == [b"cart", b"cart", b"shop"]


def test_silences_are_added_and_listed_and_the_phase_and_cdc_status_are_shown(isolated_broker, start_workers):
    (worker,) = start_workers(isolated_broker, 1, ADMIN_TOKEN=ADMIN_TOKEN)
    added = json_output(faust(isolated_broker, worker, "silences", "add", "--match", "service=cart",
                              "--match", "alertname=~High.*", "--hours", "2", "--comment", "deploy", "--url", worker.url))
    assert added["matchers"] == [{"name": "service", "value": "cart", "is_regex": False},
                                 {"name": "alertname", "value": "High.*", "is_regex": True}]

    def listed() -> List[str]:
        return [silence["id"] for silence in json_output(faust(isolated_broker, worker, "silences", "--url", worker.url))["silences"]]

    wait_for(lambda: added["id"] in listed(), timeout=30, message="silence listed")
    assert "phase" in json_output(faust(isolated_broker, worker, "migration-phase", "--url", worker.url))
    refused = faust(isolated_broker, worker, "migration-phase", "no-such-phase", "--url", worker.url)
    assert refused.returncode != 0 and "the worker answered 400" in refused.stderr
    assert isinstance(json_output(faust(isolated_broker, worker, "cdc-status", "--url", worker.url)), dict)
