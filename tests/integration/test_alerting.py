"""Alert rules on a real worker: windows in event time, pending/firing/resolved, anomalies, the
alerts topic, the Alertmanager webhook (down, then up; restarted), absent series, silences and the
cluster-wide alert list."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiokafka import AIOKafkaConsumer

from models.alerts import alert_fingerprint
from tests.support.kafka import produce_sync
from tests.support.webhook_receiver import WebhookReceiver
from tests.support.workers import http_post, wait_for

RULES = """
rules:
  - name: HighCPU
    metric: cpu
    aggregate: mean
    window: 5s
    op: ">"
    threshold: 0.9
    for: 15s
    severity: critical
    labels: {team: checkout}
    summary: "CPU of {service}/{instance} is {value:.2f}"
  - name: QueueAnomaly
    type: anomaly
    metric: queue_depth
    k: 4
    warmup: 20
    severity: warning
    summary: "queue of {service} at {value}"
"""
ADMIN_TOKEN = "test-admin-token"
T0 = time.time() - 600


def cpu_series(service: str, spike_seconds: int):
    """60 s at 0.3, then ``spike_seconds`` at 0.97, then 60 s at 0.3; one sample a second."""
    values = [0.3] * 60 + [0.97] * spike_seconds + [0.3] * 60
    return [(service, {"instance": f"{service}-1", "metric": "cpu", "value": v, "ts": T0 + i}) for i, v in enumerate(values)]


def queue_series(service: str):
    """A steady queue depth around 10, then a step to 40."""
    values = [10 + (i % 5 - 2) * 0.2 for i in range(40)] + [40.0] * 3
    return [(service, {"instance": f"{service}-1", "metric": "queue_depth", "value": v, "ts": T0 + i}) for i, v in enumerate(values)]


async def read_alerts(bootstrap: str, idle: float = 4.0):
    """Every record on ``alerts`` until the topic has been quiet for ``idle`` seconds."""
    consumer = AIOKafkaConsumer("alerts", bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    records, quiet_since = [], time.monotonic()
    try:
        while time.monotonic() - quiet_since < idle:
            batch = await consumer.getmany(timeout_ms=500)
            for partition_records in batch.values():
                records.extend(partition_records)
                quiet_since = time.monotonic()
    finally:
        await consumer.stop()
    return [json.loads(record.value) for record in records]


def last_cpu_window(worker) -> dict:
    """checkout-1's cpu window as a worker's /metrics/checkout/ shows it ({} if not there yet)."""
    status, windows = worker.get("/metrics/checkout/")
    if status != 200:
        return {}
    return windows.get("metrics", {}).get("cpu", {}).get("instances", {}).get("checkout-1", {})


def last_window_filled(worker) -> bool:
    window = last_cpu_window(worker)
    return window.get("window_end") == T0 + 159 and window.get("count", 0) >= 15


@pytest.fixture
def rules_file(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return path


def test_spikes_fire_and_resolve_once_short_spikes_stay_quiet_and_anomalies_fire(isolated_broker, start_workers, rules_file):
    with WebhookReceiver(fail_first=1) as receiver:
        first, second = start_workers(
            isolated_broker, 2,
            ALERT_RULES=str(rules_file), ALERT_WEBHOOK_URL=receiver.url, ADMIN_TOKEN=ADMIN_TOKEN,
            METRIC_WINDOW="20", METRIC_WINDOW_STEP="5", ALERT_ABSENT_AFTER="3600",  # absence: its own test
        )
        # checkout's spike holds ~35 s > for; search's ~10 s < for.
        records = cpu_series("checkout", spike_seconds=40) + cpu_series("search", spike_seconds=10) + queue_series("orders")
        produce_sync(isolated_broker.bootstrap, "metrics", sorted(records, key=lambda r: r[1]["ts"]))

        wait_for(lambda: first.get("/metrics/services/checkout/")[1].get("samples") == 160, timeout=60, message="samples in")
        # A batch's latest values are stored before its panes (agents/metrics.py observe_service), so
        # the last window may still be filling when the sample count is complete.
        wait_for(lambda: last_window_filled(first), timeout=30, message="last checkout window")
        for worker in (first, second):  # routed to the owner of "checkout"
            status, windows = worker.get("/metrics/checkout/")
            assert status == 200 and windows["window_s"] == 20
            assert windows["metrics"]["cpu"]["count"] == windows["metrics"]["cpu"]["instances"]["checkout-1"]["count"]
            cpu = windows["metrics"]["cpu"]["instances"]["checkout-1"]
            assert 15 <= cpu["count"] <= 20 and cpu["window_end"] == T0 + 159
            assert cpu["mean"] == pytest.approx(0.3) and cpu["p99"] == pytest.approx(0.3, rel=0.01)
        alerts = asyncio.run(read_alerts(isolated_broker.bootstrap))
        wait_for(lambda: len(receiver.payloads) >= 3, timeout=30, message="webhook payloads")

    cpu = [(a["service"], a["status"]) for a in alerts if a["rule"] == "HighCPU"]
    assert cpu == [("checkout", "firing"), ("checkout", "resolved")]
    firing, resolved = [a for a in alerts if a["rule"] == "HighCPU"]
    assert firing["fingerprint"] == resolved["fingerprint"]
    assert firing["starts_at"] - T0 >= 60 + 15, "fires only after the condition held for `for`"
    assert resolved["ends_at"] > firing["starts_at"]
    assert firing["labels"] == {"team": "checkout"} and firing["severity"] == "critical"

    queue = [a for a in alerts if a["rule"] == "QueueAnomaly"]
    assert queue and queue[0]["status"] == "firing" and queue[0]["value"] == 40.0

    statuses = {(p["alerts"][0]["labels"]["alertname"], p["status"]) for p in receiver.payloads}
    assert {("HighCPU", "firing"), ("HighCPU", "resolved"), ("QueueAnomaly", "firing")} <= statuses
    assert receiver.requests > len(receiver.payloads), "the first delivery failed and was retried"
    assert all(p["version"] == "4" and p["receiver"] == "streamspine" for p in receiver.payloads)


def test_alert_list_is_complete_from_any_worker_and_silences_need_the_admin_token(isolated_broker, start_workers, rules_file):
    first, second = start_workers(
        isolated_broker, 2, ALERT_RULES=str(rules_file), ADMIN_TOKEN=ADMIN_TOKEN, METRIC_WINDOW="20", METRIC_WINDOW_STEP="5",
        ALERT_ABSENT_AFTER="3600",  # the spikes stay on: their alerts must not end while the list is read
    )
    # Many services, each with a spike that is still on: every one has a firing alert.
    services = [f"svc-{i}" for i in range(12)]
    records = [
        (service, {"instance": "i-1", "metric": "cpu", "value": 0.3 if i < 30 else 0.99, "ts": T0 + i})
        for i in range(80) for service in services
    ]
    produce_sync(isolated_broker.bootstrap, "metrics", records)

    def complete_list(worker):
        status, body = worker.get("/alerts/?status=firing")
        return status == 200 and {a["service"] for a in body["alerts"]} == set(services) and body

    for worker in (first, second):
        body = wait_for(lambda: complete_list(worker), timeout=60, message=f"all alerts from {worker.url}")
        assert len(body["alerts"]) == len(services)
    assert second.get("/alerts/?service=svc-3")[1]["alerts"][0]["service"] == "svc-3"
    assert first.get("/alerts/?severity=info")[1] == {"alerts": []}

    silence = {"matchers": [{"name": "service", "value": "svc-1"}], "ends_at": time.time() + 3600, "comment": "deploy"}
    assert http_post(first.url + "/alerts/silences", silence)[0] == 401
    assert http_post(first.url + "/alerts/silences", silence, {"Authorization": "Bearer wrong-token"})[0] == 403
    assert http_post(first.url + "/alerts/silences", {"matchers": []}, {"Authorization": f"Bearer {ADMIN_TOKEN}"})[0] == 400
    for ends_at in (float("nan"), float("inf")):  # json.dumps writes JSON's NaN and Infinity literals
        status, refusal = http_post(first.url + "/alerts/silences", {**silence, "ends_at": ends_at}, {"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert status == 400 and "ends_at" in json.dumps(refusal), refusal
    status, created = http_post(first.url + "/alerts/silences", silence, {"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 201
    for worker in (first, second):
        wait_for(lambda: [s["id"] for s in worker.get("/alerts/silences")[1]["silences"]] == [created["id"]], message=f"silence on {worker.url}: {worker.get('/alerts/silences')}")


def high_cpu_now(service: str, seconds: int = 30):
    """CPU at 0.97 for the last ``seconds`` of event time: HighCPU (5 s window, for 15 s) fires."""
    start = time.time() - seconds
    return [(service, {"instance": f"{service}-1", "metric": "cpu", "value": 0.97, "ts": start + i}) for i in range(seconds)]


def alerts_of(bootstrap: str, fingerprint: str):
    return [(alert["status"], alert["fingerprint"]) for alert in asyncio.run(read_alerts(bootstrap, idle=1.0))
            if alert["fingerprint"] == fingerprint]


def webhook_alerts(receiver: WebhookReceiver):
    return [(entry["status"], entry["fingerprint"]) for payload in list(receiver.payloads) for entry in payload["alerts"]]


def test_an_absent_series_resolves_its_alert_and_a_webhook_down_for_long_gets_both_notifications(isolated_broker, start_workers, rules_file):
    receiver = WebhookReceiver()  # its port is chosen, nothing listens there until it starts below
    start_workers(isolated_broker, 1, ALERT_RULES=str(rules_file), ALERT_WEBHOOK_URL=receiver.url,
                  METRIC_WINDOW="20", METRIC_WINDOW_STEP="5", ALERT_ABSENT_AFTER="8")
    fingerprint = alert_fingerprint("HighCPU", "cart", "cart-1")
    produce_sync(isolated_broker.bootstrap, "metrics", high_cpu_now("cart"))  # then the series stops

    wait_for(lambda: ("firing", fingerprint) in alerts_of(isolated_broker.bootstrap, fingerprint), timeout=60, message="firing")
    fired = time.monotonic()
    statuses = wait_for(lambda: (lambda seen: ("resolved", fingerprint) in seen and seen)(alerts_of(isolated_broker.bootstrap, fingerprint)),
                        timeout=60, message="resolved after 8 s without samples")
    time.sleep(max(0.0, 20 - (time.monotonic() - fired)))  # the webhook down for 20 s: more than 6 attempts
    with receiver:
        wait_for(lambda: len(webhook_alerts(receiver)) >= 2, timeout=60, message=f"notifications once the webhook is up ({receiver.requests} requests)")

    assert statuses == [("firing", fingerprint), ("resolved", fingerprint)]
    assert webhook_alerts(receiver) == [("firing", fingerprint), ("resolved", fingerprint)]


def test_a_restarted_webhook_receiver_gets_the_firing_alerts_again_within_the_repeat_interval(isolated_broker, start_workers, rules_file):
    fingerprint = alert_fingerprint("HighCPU", "search", "search-1")
    with WebhookReceiver() as receiver:
        start_workers(isolated_broker, 1, ALERT_RULES=str(rules_file), ALERT_WEBHOOK_URL=receiver.url,
                      METRIC_WINDOW="20", METRIC_WINDOW_STEP="5", ALERT_ABSENT_AFTER="3600", ALERT_REPEAT_INTERVAL="3")
        produce_sync(isolated_broker.bootstrap, "metrics", high_cpu_now("search"))
        wait_for(lambda: ("firing", fingerprint) in webhook_alerts(receiver), timeout=60, message="firing sent")
    restarted = WebhookReceiver()
    restarted.port = receiver.port  # the same receiver, back with nothing of what it had
    with restarted:
        wait_for(lambda: webhook_alerts(restarted), timeout=30, message="the firing alert sent again")
        assert set(webhook_alerts(restarted)) == {("firing", fingerprint)}
