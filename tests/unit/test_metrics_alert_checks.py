"""Alert checks through the metrics agent (test_context): an alert whose series stopped reporting
resolves after its absence, a firing alert is sent to the webhook again every repeat interval, and
a malformed check is a dead letter. The wall clock of the decisions is moved by the tests."""
from __future__ import annotations

import asyncio
import json
from typing import Any, List

import pytest

import agents.metrics
from agents.metrics import alerts_topic, record_samples
from app.webhooks import WebhookSender
from models.alerts import ALERT_CHECK_HEADER, alert_fingerprint
from tables.metrics import alert_states
from tests.unit.metrics_helpers import T0, FlakyAlerts, Letters, counted, encoded, sample, service_name, until

CHECK = {ALERT_CHECK_HEADER: b"1"}
NOW = 1_900_000_000.0  # the wall clock the tests start from


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    wall = Clock(NOW)
    monkeypatch.setattr("agents.metrics.clock", wall)
    return wall


@pytest.fixture
def alerts(monkeypatch) -> FlakyAlerts:
    sent = FlakyAlerts()
    monkeypatch.setattr(alerts_topic, "send", sent.send)
    return sent


@pytest.fixture
def letters(monkeypatch) -> Letters:
    recorded = Letters()
    monkeypatch.setattr("app.runtime.dead_letter", recorded)
    monkeypatch.setattr("agents.metrics.dead_letter", recorded)
    return recorded


@pytest.fixture
def webhook(monkeypatch) -> WebhookSender:
    """A sender whose queue the tests read (nothing runs it: delivery is app/webhooks.py's test)."""
    sender = WebhookSender("http://127.0.0.1:9/hook")
    monkeypatch.setattr("agents.metrics.webhook", sender)
    agents.metrics.silences.caught_up.set()
    return sender


def queued(sender: WebhookSender) -> List[Any]:
    payloads = []
    while not sender.queue.empty():
        payloads.append(json.loads(sender.queue.get_nowait()))
    return [(p["status"], p["alerts"][0]["labels"]["alertname"]) for p in payloads]


async def fire_high_cpu(agent, service: str, seconds: int = 45) -> str:
    """CPU at 0.99 for ``seconds`` of event time: the default HighCPU rule (mean over 60 s > 0.9 for
    30 s) fires. Returns the alert's fingerprint."""
    for i in range(seconds):
        await agent.put(encoded(sample(value=0.99, ts=T0 + i)), key=service.encode())
    fingerprint = alert_fingerprint("HighCPU", service, "i-1")
    await until(lambda: counted(service) == seconds and firing(fingerprint))
    return fingerprint


def firing(fingerprint: str) -> bool:
    """True once the alert is stored as firing (after its notification went out)."""
    state = alert_states.get(fingerprint)
    return state is not None and state.status == "firing"


async def check(agent, service: str, *fingerprints: str) -> None:
    await agent.put(json.dumps(list(fingerprints)).encode(), key=service.encode(), headers=CHECK)


async def test_a_firing_alert_whose_series_stopped_reporting_resolves_after_the_rules_window_plus_a_step(clock, alerts, letters):
    service = service_name()
    async with record_samples.test_context() as agent:
        fingerprint = await fire_high_cpu(agent, service)
        clock.now = NOW + 69  # HighCPU: window 60 s + one 10 s step
        await check(agent, service, fingerprint)
        await asyncio.sleep(0.4)
        still_firing = alert_states.get(fingerprint)
        clock.now = NOW + 70
        await check(agent, service, fingerprint)
        await until(lambda: alert_states.get(fingerprint) is None)

    assert still_firing is not None and still_firing.status == "firing"
    assert alert_states.get(fingerprint) is None
    assert [(alert.status, alert.fingerprint) for alert in alerts.sent] == [("firing", fingerprint), ("resolved", fingerprint)]
    assert alerts.sent[1].ends_at == NOW + 70
    assert letters == []


async def test_a_pending_alert_whose_series_stopped_reporting_is_dropped_without_a_notification(clock, alerts):
    service = service_name()
    async with record_samples.test_context() as agent:
        for i in range(10):  # 10 s over the threshold: pending (for: 30 s)
            await agent.put(encoded(sample(value=0.99, ts=T0 + i)), key=service.encode())
        fingerprint = alert_fingerprint("HighCPU", service, "i-1")
        await until(lambda: counted(service) == 10 and alert_states.get(fingerprint) is not None)
        pending = alert_states.get(fingerprint)
        clock.now = NOW + 70
        await check(agent, service, fingerprint)
        await until(lambda: alert_states.get(fingerprint) is None)

    assert pending.status == "pending"
    assert alert_states.get(fingerprint) is None and alerts.sent == []


async def test_samples_that_arrive_again_keep_the_alert_firing(clock, alerts):
    service = service_name()
    async with record_samples.test_context() as agent:
        fingerprint = await fire_high_cpu(agent, service)
        clock.now = NOW + 60
        await agent.put(encoded(sample(value=0.99, ts=T0 + 45)), key=service.encode())
        await until(lambda: counted(service) == 46)
        clock.now = NOW + 100  # 40 s after the last sample: not absent yet
        await check(agent, service, fingerprint)
        await asyncio.sleep(0.4)

    assert alert_states.get(fingerprint).status == "firing"
    assert [alert.status for alert in alerts.sent] == ["firing"]


async def test_a_firing_alert_is_sent_to_the_webhook_again_every_repeat_interval(clock, alerts, webhook, monkeypatch):
    monkeypatch.setattr("agents.metrics.settings", agents.metrics.settings.model_copy(update={"alert_repeat_interval": 600.0}))
    service = service_name()
    async with record_samples.test_context() as agent:
        fingerprint = await fire_high_cpu(agent, service)
        first = queued(webhook)
        for step in range(1, 4):  # samples keep arriving: never absent
            clock.now = NOW + 300 * step
            await agent.put(encoded(sample(value=0.99, ts=T0 + 44 + step)), key=service.encode())
            await until(lambda step=step: counted(service) == 45 + step)
            await check(agent, service, fingerprint)
            await asyncio.sleep(0.3)
        repeats = queued(webhook)

    assert first == [("firing", "HighCPU")]
    assert repeats == [("firing", "HighCPU")]  # at +600 s; not at +300 s nor +900 s
    assert alert_states.get(fingerprint).notified_at == NOW + 600


async def test_a_silenced_firing_alert_is_not_repeated_and_is_sent_once_its_silence_ends(clock, alerts, webhook, monkeypatch):
    from models.alerts import Silence

    service = service_name()
    silence = Silence(id="s", matchers=[{"name": "service", "value": service}], starts_at=0.0, ends_at=NOW + 100,
                      created_by="", comment="")
    monkeypatch.setitem(agents.metrics.silences.silences, "s", silence)
    async with record_samples.test_context() as agent:
        fingerprint = await fire_high_cpu(agent, service)
        await check(agent, service, fingerprint)
        await asyncio.sleep(0.3)
        while_silenced = queued(webhook)
        clock.now = NOW + 100
        await agent.put(encoded(sample(value=0.99, ts=T0 + 45)), key=service.encode())
        await check(agent, service, fingerprint)
        await until(lambda: not webhook.queue.empty())

    assert while_silenced == []
    assert queued(webhook) == [("firing", "HighCPU")]


@pytest.mark.parametrize("key, value", [
    (None, b'["0123456789abcdef"]'),
    (b"cart", b'"0123456789abcdef"'),
    (b"cart", b"[" * 20_000 + b"]" * 20_000),
    (b"cart", b'["not a fingerprint"]'),
])
async def test_a_malformed_alert_check_is_a_dead_letter(letters, key, value):
    async with record_samples.test_context() as agent:
        await agent.put(value, key=key, headers=CHECK)
        await until(lambda: letters)

    assert [offset for offset, _ in letters] == [0] and letters[0][1]


async def test_an_alert_check_naming_another_services_alert_changes_nothing(clock, alerts):
    service, other = service_name(), service_name()
    async with record_samples.test_context() as agent:
        fingerprint = await fire_high_cpu(agent, service)
        clock.now = NOW + 1000
        await check(agent, other, fingerprint)
        await asyncio.sleep(0.4)

    assert alert_states.get(fingerprint).status == "firing"

