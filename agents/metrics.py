"""Monitoring & alerting.

metrics -> record_samples -> metrics_latest, metric_panes, metric_series, alert_states -> alerts (+ webhook)
alert-silences -> every worker's SilenceCache (read outside the consumer group)
Pages: /metrics/{service}/, /metrics/services/{service}/, /alerts/, /alerts/silences
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import operator
import sys
import time
import uuid
from functools import reduce
from typing import Any, Dict, Iterable, List, Optional

from aiokafka import AIOKafkaConsumer, TopicPartition
from faust import web

from app import app, settings
from app.settings import bootstrap_servers
from app.aggregation import BATCH_MAX, BATCH_WITHIN, enter_partition, fold_deltas
from app.dead_letters import dead_letter
from app.web import require_admin_token
from app.webhooks import webhook_sender
from models.alerts import (
    Alert, AnomalyRule, Rule, RuleFileError, Silence, ThresholdRule, alert_fingerprint, alertmanager_payload,
    condition_holds, evaluate, is_silenced, load_rules,
)
from models.metric_stats import Baseline, WindowAggregate, add_values, empty_aggregate, is_anomalous, merge, summary, update_baseline
from models.metrics import (
    InvalidRecord, MetricSample, key_text, pane_key, pane_start, parse_samples, samples_by_pane, samples_by_series,
    series_key, window_pane_starts,
)
from tables.metrics import alert_states, latest_samples, metric_panes, metric_series

metrics_topic = app.topic(
    # Keys arrive as bytes and are decoded in the agent, so a key that is not UTF-8 is dead-lettered.
    "metrics", key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
    partitions=settings.topic_partitions,
    internal=True,  # the worker creates it with TOPIC_PARTITIONS when it does not exist yet
)
alerts_topic = app.topic("alerts", key_type=str, value_type=Alert, partitions=settings.topic_partitions, internal=True)
silences_topic = app.topic("alert-silences", key_type=str, value_type=Silence, partitions=1, internal=True)


def load_alert_rules() -> List[Rule]:
    """The rules of ALERT_RULES; an invalid file stops the worker with the line and the reason."""
    try:
        rules = load_rules(settings.alert_rules)
        for rule in rules:
            check_rule_window(rule)
        return rules
    except RuleFileError as error:
        print(f"invalid configuration: ALERT_RULES: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def check_rule_window(rule: Rule) -> None:
    """A threshold rule's window must be whole panes of METRIC_WINDOW_STEP, kept for METRIC_WINDOW_EXPIRES."""
    if not isinstance(rule, ThresholdRule):
        return
    panes = rule.window_seconds / settings.metric_window_step
    if panes < 1 - 1e-9 or abs(panes - round(panes)) > 1e-9 or rule.window_seconds > settings.metric_window_expires:
        raise RuleFileError(
            f"rule {rule.name!r}: window {rule.window_seconds:g}s must be a whole number of METRIC_WINDOW_STEP "
            f"({settings.metric_window_step:g}s) and at most METRIC_WINDOW_EXPIRES ({settings.metric_window_expires:g}s)"
        )


class SilenceCache:
    """Every silence, on every worker: each one reads all of ``alert-silences`` outside the
    consumer group (Faust's GlobalTable did not show one worker's writes to the other here)."""

    def __init__(self) -> None:
        self.silences: Dict[str, Silence] = {}
        self.caught_up = asyncio.Event()

    def active(self) -> List[Silence]:
        return list(self.silences.values())

    async def wait_caught_up(self, timeout: float = 5.0) -> None:
        """Wait (a bounded time) until the silences that existed at start have been read."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.caught_up.wait(), timeout)

    async def follow(self) -> None:
        """Read ``alert-silences`` from the beginning, then keep reading; reconnect on errors."""
        await silences_topic.maybe_declare()
        while True:
            try:
                await self._read()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the broker may be away; try again
                log.exception("reading %s failed; retrying", silences_topic.get_topic_name())
                await asyncio.sleep(1.0)

    async def _read(self) -> None:
        partition = TopicPartition(silences_topic.get_topic_name(), 0)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers(settings.kafka_broker),
            group_id=None, auto_offset_reset="earliest", fetch_max_wait_ms=settings.consumer_fetch_wait_ms,
        )
        await consumer.start()
        try:
            consumer.assign([partition])
            await consumer.seek_to_beginning(partition)
            end = (await consumer.end_offsets([partition]))[partition]
            if end == 0:
                self.caught_up.set()
            async for record in consumer:
                try:
                    silence = Silence.loads(record.value)
                    self.silences[silence.id] = silence
                except Exception as error:  # noqa: BLE001 - one bad record must not stop the others
                    log.warning("ignoring a malformed silence at offset %s: %r", record.offset, error)
                if record.offset + 1 >= end:
                    self.caught_up.set()
        finally:
            await consumer.stop()


log = logging.getLogger(__name__)
RULES = load_alert_rules()
webhook = webhook_sender(settings.alert_webhook_url)
silences = SilenceCache()


# --- pure folds ----------------------------------------------------------------------------------


def merge_latest(state: Dict[str, Any], samples: Iterable[MetricSample]) -> Dict[str, Any]:
    """Fold samples into a service's latest-value view; an older sample never overwrites a newer one."""
    metrics: Dict[str, Dict[str, Any]] = {name: dict(by_instance) for name, by_instance in state.get("metrics", {}).items()}
    count = state.get("samples", 0)
    for sample in samples:
        count += 1
        by_instance = metrics.setdefault(sample.metric, {})
        current = by_instance.get(sample.instance)
        if current is None or current["ts"] <= sample.ts:
            by_instance[sample.instance] = {"value": sample.value, "ts": sample.ts}
    return {"metrics": metrics, "samples": count}


def rules_for(metric: str) -> List[Rule]:
    return [rule for rule in RULES if rule.metric == metric]


# --- table updates (run inside an event of the service's partition) --------------------------------


def window_aggregate(series: str, now: float, window: float) -> WindowAggregate:
    """The merged panes of the window of ``window`` seconds ending at event time ``now``."""
    panes = [metric_panes.get(pane_key(series, start)) for start in window_pane_starts(now, window, settings.metric_window_step)]
    return reduce(merge, [pane for pane in panes if pane is not None], empty_aggregate())


def window_summary(series: str, now: float, window: float) -> Dict[str, Optional[float]]:
    """count/sum/min/max/mean/p50/p95/p99 of the window of ``window`` seconds ending at ``now``."""
    return summary(window_aggregate(series, now, window))


async def advance_alert(rule: Rule, service: str, instance: str, holds: bool, value: float, now: float) -> None:
    """Move one alert through pending/firing/resolved.

    A firing/resolved notification is acknowledged by Kafka before the new state is stored: a crash
    in between replays the records and notifies again (at-least-once), never stores "firing"
    for an alert whose notification was lost.
    """
    fingerprint = alert_fingerprint(rule.name, service, instance)
    previous = alert_states.get(fingerprint)
    state, notification = evaluate(previous, rule, service, instance, holds, value, now)
    if notification is not None:
        await publish(notification)
    if state is not None:
        alert_states[fingerprint] = state
    elif previous is not None:
        del alert_states[fingerprint]


async def observe_series(service: str, instance: str, metric: str, samples: List[MetricSample]) -> None:
    """Add a series' samples to its panes pane by pane, evaluating its rules at each pane (event time)."""
    series = series_key(service, instance, metric)
    state = metric_series[series]
    panes = set(state.get("panes", []))
    baselines = {name: Baseline(**data) for name, data in state.get("baselines", {}).items()}
    last_ts = state.get("last_ts", 0.0)
    for start, pane_samples in samples_by_pane(samples, settings.metric_window_step):
        key = pane_key(series, start)
        metric_panes[key] = add_values(metric_panes.get(key) or empty_aggregate(), [s.value for s in pane_samples])
        panes.add(start)
        now = max(last_ts, pane_samples[-1].ts)
        last_ts = now
        for rule in rules_for(metric):
            if isinstance(rule, ThresholdRule):
                holds, value = condition_holds(rule, window_summary(series, now, rule.window_seconds))
            else:
                holds, value, baselines[rule.name] = anomalous_in(pane_samples, baselines.get(rule.name), rule)
            await advance_alert(rule, service, instance, holds, value, now)
    horizon = pane_start(last_ts, settings.metric_window_step) - settings.metric_window_expires
    for start in [start for start in panes if start <= horizon]:
        metric_panes.pop(pane_key(series, start), None)
        panes.discard(start)
    metric_series[series] = {
        "panes": sorted(panes), "last_ts": last_ts,
        "baselines": {name: baseline.asdict() for name, baseline in baselines.items()},
    }


def anomalous_in(samples: List[MetricSample], baseline: Optional[Baseline], rule: AnomalyRule):
    """(any sample anomalous, the value that was, the baseline after all samples)."""
    anomalous_value = None
    for sample in samples:
        if is_anomalous(baseline, sample.value, rule.k, rule.warmup):
            anomalous_value = sample.value
        baseline = update_baseline(baseline, sample.value, rule.alpha)
    holds = anomalous_value is not None
    return holds, anomalous_value if holds else samples[-1].value, baseline


async def observe_service(service: str, samples: List[MetricSample]) -> None:
    """All of a service's samples of one batch: latest values, panes, baselines, alerts."""
    latest_samples[service] = merge_latest(latest_samples[service], samples)
    for (instance, metric), series_samples in samples_by_series(samples).items():
        await observe_series(service, instance, metric, series_samples)


# --- agents --------------------------------------------------------------------------------------


async def forward_keyed_by_service(samples: Iterable[MetricSample]) -> None:
    """Re-key samples that arrived without a key, so each service's state lives in one partition."""
    by_service: Dict[str, List[Dict[str, Any]]] = {}
    for sample in samples:
        by_service.setdefault(sample.service, []).append(sample.asdict())
    for service, batch in by_service.items():
        await metrics_topic.send(key=service, value=json.dumps(batch).encode())


async def publish(alert: Alert) -> None:
    """Firing/resolved transitions go to ``alerts`` (awaited until acknowledged); the webhook
    hears of those not silenced."""
    delivery = await alerts_topic.send(key=alert.fingerprint, value=alert)
    await delivery
    if webhook is None:
        return
    await silences.wait_caught_up()  # after a restart, know the silences before notifying
    if not is_silenced(alert, silences.active(), time.time()):
        webhook.notify(alertmanager_payload([alert], external_url=settings.web_url))


@app.agent(metrics_topic)
async def record_samples(stream) -> None:
    """Validate each record (one sample or an array), then fold a batch per service: one table
    write per pane and series per batch (app/aggregation.py), not one per sample."""
    async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN):
        keyed_samples = []
        for event in events:
            try:
                service = key_text(event.key)
                samples = parse_samples(event.value, service)
            except InvalidRecord as error:
                await dead_letter(str(error), event)
                continue
            if service is None:
                await forward_keyed_by_service(samples)
            else:
                keyed_samples.append((event, [(service, samples)]))
        for entry in fold_deltas(keyed_samples, combine=operator.add).values():
            enter_partition(stream, entry.last_event)
            for service, samples in entry.deltas.items():
                await observe_service(service, samples)


@app.task
async def follow_silences() -> None:
    """Keep this worker's copy of every silence."""
    await silences.follow()


if webhook is not None:
    @app.task
    async def deliver_webhooks() -> None:
        """Send queued Alertmanager payloads to ALERT_WEBHOOK_URL."""
        await webhook.run()


# --- pages ---------------------------------------------------------------------------------------


@app.page("/metrics/services/{service}/")
@app.table_route(table=latest_samples, match_info="service")
async def service_metrics(view: web.View, request: web.Request, service: str) -> web.Response:
    """Latest value of every metric of one service, answered by the worker that owns it."""
    if service not in latest_samples:
        raise view.NotFound("unknown service", service=service)
    return view.json({"service": service, **latest_samples[service]})


@app.page("/metrics/{service}/")
@app.table_route(table=latest_samples, match_info="service")
async def service_windows(view: web.View, request: web.Request, service: str) -> web.Response:
    """The current window's aggregates of each metric of a service, per instance."""
    if service not in latest_samples:
        raise view.NotFound("unknown service", service=service)
    metrics: Dict[str, Dict[str, Any]] = {}
    for metric, by_instance in latest_samples[service]["metrics"].items():
        instances, service_window = {}, empty_aggregate()
        for instance in by_instance:
            series = series_key(service, instance, metric)
            now = metric_series[series].get("last_ts", 0.0)
            aggregate = window_aggregate(series, now, settings.metric_window)
            service_window = merge(service_window, aggregate)
            instances[instance] = {"window_end": now, **summary(aggregate)}
        # The service's window merges its instances' sketches: exact counts, 1 % quantiles.
        metrics[metric] = {**summary(service_window), "instances": instances}
    return view.json({"service": service, "window_s": settings.metric_window, "step_s": settings.metric_window_step, "metrics": metrics})


def alert_filters(request: web.Request) -> Dict[str, str]:
    return {name: request.query[name] for name in ("service", "severity", "status") if request.query.get(name)}


def local_alerts(filters: Dict[str, str]) -> List[Dict[str, Any]]:
    """Pending and firing alerts of the partitions this worker owns."""
    alerts = [alert.asdict() for alert in alert_states.values()]
    return [alert for alert in alerts if all(alert[name] == value for name, value in filters.items())]


@app.page("/alerts/local/")
async def alerts_of_this_worker(view: web.View, request: web.Request) -> web.Response:
    """This worker's share of /alerts/."""
    return view.json({"alerts": local_alerts(alert_filters(request))})


@app.page("/alerts/")
async def all_alerts(view: web.View, request: web.Request) -> web.Response:
    """Every pending or firing alert, gathered from every worker that owns table partitions."""
    filters = alert_filters(request)
    alerts = {alert["fingerprint"]: alert for alert in local_alerts(filters)}
    me = str(app.conf.canonical_url).rstrip("/")
    for worker in app.router.tables_metadata():
        if str(worker).rstrip("/") == me:
            continue
        async with app.http_client.get(f"{str(worker).rstrip('/')}/alerts/local/", params=filters) as response:
            if response.status != 200:
                raise view.ServerError(f"worker {worker} answered {response.status}")
            for alert in (await response.json())["alerts"]:
                alerts[alert["fingerprint"]] = alert
    ordered = sorted(alerts.values(), key=lambda alert: (alert["status"] != "firing", alert["active_since"]))
    return view.json({"alerts": ordered})


def silence_from_request(body: Any, now: float) -> Silence:
    """Validate a POSTed silence: ``{"matchers": [{"name", "value", "is_regex"}], "ends_at", ...}``."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    matchers = body.get("matchers")
    if not isinstance(matchers, list) or not matchers or not all(
        isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("value"), str) for m in matchers
    ):
        raise ValueError("matchers must be a non-empty list of {name, value, is_regex}")
    ends_at = body.get("ends_at")
    if isinstance(ends_at, bool) or not isinstance(ends_at, (int, float)) or ends_at <= now:
        raise ValueError("ends_at must be an epoch time in the future")
    return Silence(
        id=str(uuid.uuid4()),
        matchers=[{"name": m["name"], "value": m["value"], "is_regex": bool(m.get("is_regex", False))} for m in matchers],
        starts_at=float(body.get("starts_at", now)),
        ends_at=float(ends_at),
        created_by=str(body.get("created_by", "")),
        comment=str(body.get("comment", "")),
    )


@app.page("/alerts/silences")
class Silences(web.View):
    """GET: every silence. POST (ADMIN_TOKEN): add one; silenced alerts are tracked, not notified."""

    async def get(self, request: web.Request) -> web.Response:
        return self.json({"silences": [silence.asdict() for silence in silences.active()]})

    async def post(self, request: web.Request) -> web.Response:
        require_admin_token(self, request)
        try:
            silence = silence_from_request(await request.json(), time.time())
        except ValueError as error:
            raise self.ValidationError(str(error))
        await silences_topic.send(key=silence.id, value=silence)
        return self.json(silence.asdict(), status=201)
