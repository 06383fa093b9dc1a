"""Monitoring & alerting (docs/metrics.md).

metrics -> record_samples -> metrics_latest, metric_panes, metric_series, alert_states -> alerts (+ webhook)
alert checks (timer, every worker) -> metrics (keyed by service) -> record_samples: absent series resolve,
    firing alerts are sent to the webhook again
alert-silences -> every worker's SilenceCache (read outside the consumer group)
Pages: /metrics/{service}/, /metrics/services/{service}/, /alerts/, /alerts/silences
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import operator
import sys
import time
import uuid
from functools import reduce
from typing import Any, AsyncIterator, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple, Union, cast

import faust
from faust import web
from faust.types import EventT, StreamT

from app import app, settings
from app.aggregation import BATCH_MAX, BATCH_WITHIN, enter_partition, fold_deltas
from app.dead_letters import dead_letter
from app.follower import TopicFollower
from app.gauges import gauge
from app.runtime import Decoded, decoded_batches, require_encodable, until_applied
from app.settings import Settings
from app.topics import key_text, metrics_topic
from app.web import from_other_workers, require_admin_token, worker_is_ready
from app.webhooks import WebhookSender, webhook_sender
from models.alerts import (
    ALERT_CHECK_HEADER,
    MAX_CHECKED_ALERTS,
    Alert,
    AlertTimes,
    AnomalyRule,
    Rule,
    RuleFileError,
    Silence,
    ThresholdRule,
    absent_after,
    alert_fingerprint,
    alertmanager_payload,
    alerts_to_check,
    check_silence,
    condition_holds,
    evaluate,
    is_absent,
    is_silenced,
    load_rules,
    parse_alert_check,
    repeat_due,
    resolved_as_absent,
)
from models.metric_stats import Baseline, WindowAggregate, add_values, empty_aggregate, is_anomalous, merge, summary, update_baseline
from models.metrics import (
    InvalidRecord,
    MetricSample,
    OffsetSample,
    after,
    decode_json,
    offset_samples_by_pane,
    offset_samples_by_series,
    pane_key,
    pane_start,
    parse_record,
    refused_reason,
    series_key,
    window_pane_starts,
)
from tables.metrics import alert_states, latest_samples, metric_panes, metric_series

alerts_topic = app.topic("alerts", key_type=str, value_type=Alert, partitions=settings.topic_partitions, internal=True)
silences_topic = app.topic("alert-silences", key_type=str, value_type=Silence, partitions=1, internal=True)


def load_alert_rules(settings: Settings) -> List[Rule]:
    """The rules of ALERT_RULES; an invalid file stops the worker with the line and the reason."""
    try:
        rules = load_rules(settings.alert_rules)
        for rule in rules:
            check_rule_window(rule, settings)
        return rules
    except RuleFileError as error:
        print(f"invalid configuration: ALERT_RULES: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def check_rule_window(rule: Rule, settings: Settings) -> None:
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
    """Every silence, on every worker: each one follows all of ``alert-silences`` outside the
    consumer group (Faust's GlobalTable did not show one worker's writes to the other here)."""

    def __init__(self) -> None:
        self.silences: Dict[str, Silence] = {}
        self.follower = TopicFollower({silences_topic.get_topic_name: (1, self.receive)})
        self.caught_up = self.follower.caught_up

    def receive(self, key: bytes, value: Optional[bytes]) -> None:
        """One record of ``alert-silences``; a malformed one raises (the follower logs and skips it)."""
        if value is None:
            raise ValueError("a silence record without a value")
        silence = check_silence(Silence.loads(value))
        self.silences[silence.id] = silence
        if len(self.silences) > settings.silences_max * 1.1:  # trimmed in steps: no sort per record
            self.forget(clock())

    def forget(self, now: float) -> None:
        """Drop the silences expired more than SILENCE_RETENTION ago, then, beyond SILENCES_MAX,
        those that end first (the topic keeps every silence; memory does not)."""
        self.forget_expired(now)
        if len(self.silences) > settings.silences_max:
            by_end = sorted(self.silences.values(), key=lambda silence: silence.ends_at)
            self.silences = {silence.id: silence for silence in by_end[-settings.silences_max :]}

    def active(self) -> List[Silence]:
        """Every silence not yet forgotten (expired ones are listed until SILENCE_RETENTION ends)."""
        self.forget_expired(clock())
        return list(self.silences.values())

    def forget_expired(self, now: float) -> None:
        cutoff = now - settings.silence_retention
        if any(silence.ends_at < cutoff for silence in self.silences.values()):
            self.silences = {id_: silence for id_, silence in self.silences.items() if silence.ends_at >= cutoff}

    def is_full(self, now: float) -> bool:
        """True when SILENCES_MAX silences that have not ended are held: a new one is refused."""
        return sum(1 for silence in self.silences.values() if silence.ends_at > now) >= settings.silences_max

    async def wait_caught_up(self, timeout: float = 5.0) -> None:
        """Wait (a bounded time) until the silences that existed at start have been read."""
        await self.follower.wait_caught_up(timeout)

    async def follow(self) -> None:
        """Read ``alert-silences`` from the beginning, then keep reading."""
        await silences_topic.maybe_declare()
        await self.follower.follow()


log = logging.getLogger(__name__)
# Set by register() and at worker start (use_alert_rules): importing this module reads no file.
RULES: List[Rule] = []
RULES_BY_NAME: Dict[str, Rule] = {}
webhook: Optional[WebhookSender] = None
silences = SilenceCache()
APPLIED = "applied_offset"  # in each table value: the highest source offset it holds (replay guard)
FORWARDED_SAMPLES = 1000  # samples per re-keyed record (~100 kB), whatever the batch holds
ALERT_CHECK_INTERVAL = min(settings.metric_window_step, 5.0)  # seconds between two looks at the alerts
clock = time.time  # the wall clock of absence and repeat decisions (tests move it)


# --- pure folds ----------------------------------------------------------------------------------


def merge_latest(
    state: Dict[str, Any], samples: Iterable[MetricSample], *, max_instances: int, expires: float, now: float = math.inf
) -> Dict[str, Any]:
    """Fold samples into a service's latest-value view; an older sample never overwrites a newer one.
    An instance silent for ``expires`` seconds (event time, not past ``now``: a sample from the
    future expires nobody) leaves the view; a metric keeps its ``max_instances`` latest reporters."""
    metrics: Dict[str, Dict[str, Any]] = {name: dict(by_instance) for name, by_instance in state.get("metrics", {}).items()}
    count = state.get("samples", 0)
    newest = -math.inf
    for sample in samples:
        count += 1
        newest = max(newest, sample.ts)
        by_instance = metrics.setdefault(sample.metric, {})
        current = by_instance.get(sample.instance)
        if current is None or current["ts"] <= sample.ts:
            by_instance[sample.instance] = {"value": sample.value, "ts": sample.ts}
    for name, by_instance in list(metrics.items()):
        kept = newest_instances(by_instance, since=min(newest, now) - expires, limit=max_instances)
        if kept:
            metrics[name] = kept
        else:
            del metrics[name]
    return {"metrics": metrics, "samples": count}


def newest_instances(by_instance: Dict[str, Any], *, since: float, limit: int) -> Dict[str, Any]:
    """The instances that reported at ``since`` or later, at most ``limit`` (the latest ones);
    ``by_instance`` itself (merge_latest's own copy) when it keeps them all."""
    if len(by_instance) <= limit and all(latest["ts"] >= since for latest in by_instance.values()):
        return by_instance
    kept = {instance: latest for instance, latest in by_instance.items() if latest["ts"] >= since}
    if len(kept) > limit:
        kept = dict(sorted(kept.items(), key=lambda item: item[1]["ts"])[-limit:])
    return kept


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


async def advance_alert(rule: Rule, service: str, instance: str, holds: bool, value: float, now: float, at: float) -> None:
    """Move one alert through pending/firing/resolved (``now``: event time, ``at``: wall clock).

    A firing/resolved notification is acknowledged by Kafka before the new state is stored: a crash
    in between replays the records and notifies again (at-least-once), never stores "firing"
    for an alert whose notification was lost.
    """
    fingerprint = alert_fingerprint(rule.name, service, instance)
    previous = alert_states.get(fingerprint)
    state, notification = evaluate(previous, rule, service, instance, holds, value, now, at)
    if notification is not None and await publish(notification) and state is not None:
        state = state.derive(notified_at=at)
    if state is not None:
        alert_states[fingerprint] = state
    elif previous is not None:
        del alert_states[fingerprint]


def add_to_pane(key: str, tagged: List[OffsetSample]) -> None:
    """Add to a pane the samples of records past the highest offset it holds."""
    pane = metric_panes.get(key)
    fresh = after(tagged, pane.applied_offset if pane is not None else -1)
    if fresh:
        updated = add_values(pane or empty_aggregate(), [sample.value for sample in fresh])
        metric_panes[key] = updated.derive(applied_offset=max(offset for offset, _ in tagged))


async def observe_series(service: str, instance: str, metric: str, tagged: List[OffsetSample], at: float) -> None:
    """Add a series' samples to its panes pane by pane, evaluating its rules at each pane (event time).

    Each pane and the series state keep the highest source offset they hold, so a replayed record
    (after a crash, or a retried batch) adds nothing to them twice; rules are evaluated on the samples
    new to the series."""
    series = series_key(service, instance, metric)
    state = metric_series[series]
    applied = state.get(APPLIED, -1)
    panes = set(state.get("panes", []))
    baselines = {name: Baseline(**data) for name, data in state.get("baselines", {}).items()}
    last_ts = state.get("last_ts", 0.0)
    for start, pane_tagged in offset_samples_by_pane(tagged, settings.metric_window_step):
        add_to_pane(pane_key(series, start), pane_tagged)
        panes.add(start)
        pane_samples = after(pane_tagged, applied)
        if not pane_samples:
            continue  # evaluated when these samples were first applied
        now = max(last_ts, pane_samples[-1].ts)
        last_ts = now
        for rule in rules_for(metric):
            if isinstance(rule, ThresholdRule):
                holds, value = condition_holds(rule, window_summary(series, now, rule.window_seconds))
            else:
                holds, value, baselines[rule.name] = anomalous_in(pane_samples, baselines.get(rule.name), rule)
            await advance_alert(rule, service, instance, holds, value, now, at)
    horizon = pane_start(last_ts, settings.metric_window_step) - settings.metric_window_expires
    for start in [start for start in panes if start <= horizon]:
        metric_panes.pop(pane_key(series, start), None)
        panes.discard(start)
    metric_series[series] = {
        "panes": sorted(panes),
        "last_ts": last_ts,
        "baselines": {name: baseline.asdict() for name, baseline in baselines.items()},
        APPLIED: max([applied] + [offset for offset, _ in tagged]),
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


async def observe_service(service: str, records: List[Tuple[int, List[MetricSample]]], at: float) -> None:
    """All of a service's records of one batch, as (offset, samples): latest values, panes,
    baselines, alerts. Each table value skips the records at or below the offset it holds."""
    tagged = [(offset, sample) for offset, samples in records for sample in samples]
    latest = latest_samples[service]
    fresh = after(tagged, latest.get(APPLIED, -1))
    if fresh:
        merged = merge_latest(latest, fresh, max_instances=settings.metric_latest_instances, expires=settings.metric_window_expires, now=at)
        latest_samples[service] = {**merged, APPLIED: max(offset for offset, _ in tagged)}
    for (instance, metric), series_tagged in offset_samples_by_series(tagged).items():
        await observe_series(service, instance, metric, series_tagged, at)


def absent_after_of(alert: Alert) -> float:
    """ALERT_ABSENT_AFTER, or the window of the alert's rule plus one step."""
    return absent_after(RULES_BY_NAME.get(alert.rule), settings.alert_absent_after, settings.metric_window_step, settings.metric_window)


async def check_alert(service: str, fingerprint: str, at: float) -> None:
    """An alert check for one alert: resolve it if its series is absent, or send it to the webhook
    again if it is firing and due. Runs again harmlessly (a retried batch, a replayed check)."""
    alert = alert_states.get(fingerprint)
    if alert is None or alert.service != service:
        return
    if alert.evaluated_at is None:  # stored by a version that kept no evaluation time: count from now
        alert_states[fingerprint] = alert.derive(evaluated_at=at)
    elif is_absent(alert, at, absent_after_of(alert)):
        resolved = resolved_as_absent(alert, at)
        if resolved is not None:
            await publish(resolved)
        del alert_states[fingerprint]
    elif webhook is not None and repeat_due(alert, at, settings.alert_repeat_interval):
        if await notify_webhook(alert):
            alert_states[fingerprint] = alert.derive(notified_at=at)


# --- agents --------------------------------------------------------------------------------------


class IncomingSamples(NamedTuple):
    """A decoded ``metrics`` record: its key (None: to be re-keyed), its valid samples and the
    array elements refused (index, reason)."""

    service: Optional[str]
    samples: List[MetricSample]
    refused: List[Tuple[int, str]]


class AlertCheck(NamedTuple):
    """An alert check (``ALERT_CHECK_HEADER``): look at these alerts of the service again."""

    service: str
    fingerprints: List[str]


MetricsRecord = Union[IncomingSamples, AlertCheck]


def has_header(headers: Any, name: str) -> bool:
    """Whether a record carries the header ``name`` (headers as a mapping or as (key, value) pairs)."""
    if not headers:
        return False
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    return any((key.decode("utf-8", "replace") if isinstance(key, bytes) else key) == name for key, _ in pairs)


def decode_metrics_record(event: EventT) -> MetricsRecord:
    """A ``metrics`` record's samples, or an alert check; raises for a record to dead-letter."""
    service = key_text(event.key)
    if has_header(event.message.headers, ALERT_CHECK_HEADER):
        if service is None:
            raise InvalidRecord("an alert check needs the service as its key")
        return AlertCheck(service, parse_alert_check(decode_json(event.value)))
    record = parse_record(event.value, service)
    return IncomingSamples(service, record.samples, record.refused)


async def dead_letter_refused_elements(batch: List[Decoded[MetricsRecord]]) -> None:
    """An array with refused elements goes to the DLQ whole, its reason naming the refused
    indexes; its valid elements are applied (docs/metrics.md)."""
    for entry in batch:
        record = entry.value
        if isinstance(record, IncomingSamples) and record.refused:
            reason = refused_reason(record.refused, len(record.samples) + len(record.refused))
            await until_applied(dead_letter, reason, entry.event, what="metrics dead letters")


async def forward_keyless(batch: List[Decoded[MetricsRecord]]) -> None:
    """Re-key samples that arrived without a key, so each service's state lives in one partition."""
    by_service: Dict[str, List[Dict[str, Any]]] = {}
    for entry in batch:
        record = entry.value
        if isinstance(record, IncomingSamples) and record.service is None:
            for sample in record.samples:
                by_service.setdefault(sample.service, []).append(sample.asdict())
    deliveries = []
    for service, samples in by_service.items():
        for first in range(0, len(samples), FORWARDED_SAMPLES):
            value = json.dumps(samples[first : first + FORWARDED_SAMPLES]).encode()
            deliveries.append(await metrics_topic.send(key=service.encode(), value=value))
    await asyncio.gather(*deliveries)


async def apply_batch(stream: StreamT, batch: List[Decoded[MetricsRecord]]) -> None:
    """Fold a batch's keyed samples per service and apply them (one table write per pane and
    series per batch, app/aggregation.py), then its alert checks. Idempotent: every table value
    skips records it holds already, and checks compare stored state with the clock."""
    at = clock()
    keyed = [
        (entry.event, [(entry.value.service, [(entry.event.message.offset, entry.value.samples)])])
        for entry in batch
        if isinstance(entry.value, IncomingSamples) and entry.value.service is not None
    ]
    for part in fold_deltas(keyed, combine=operator.iadd).values():  # extends the list built above
        enter_partition(stream, part.last_event)
        for service, records in part.deltas.items():
            await observe_service(cast(str, service), records, at)  # keyed by service above
    for entry in batch:
        if isinstance(entry.value, AlertCheck):
            enter_partition(stream, entry.event)
            for fingerprint in entry.value.fingerprints:
                await check_alert(entry.value.service, fingerprint, at)


async def publish(alert: Alert) -> bool:
    """Firing/resolved transitions go to ``alerts`` (awaited until acknowledged); the webhook
    hears of those not silenced. True when the webhook was sent the alert."""
    delivery = await alerts_topic.send(key=alert.fingerprint, value=alert)
    await delivery
    return await notify_webhook(alert)


async def notify_webhook(alert: Alert) -> bool:
    """Queue the alert for the webhook unless it is silenced; True when queued."""
    if webhook is None:
        return False
    await silences.wait_caught_up()  # after a restart, know the silences before notifying
    if is_silenced(alert, silences.active(), clock()):
        return False
    webhook.notify(alertmanager_payload([alert], external_url=settings.web_url))
    return True


@app.agent(metrics_topic)
async def record_samples(stream) -> None:
    """Decode each record (one sample, an array, or an alert check; app/runtime.py dead-letters
    what fails), dead-letter refused array elements, re-key keyless samples, then apply the batch
    until it is applied (a failure retries it, never skips it)."""
    # Typed here: mypy would infer the join of the two record types (a plain tuple).
    batches: AsyncIterator[List[Decoded[MetricsRecord]]] = decoded_batches(
        stream, decode_metrics_record, max_=BATCH_MAX, within=BATCH_WITHIN
    )
    async for batch in batches:
        await dead_letter_refused_elements(batch)
        await until_applied(forward_keyless, batch, what="metrics re-keying")
        await until_applied(apply_batch, stream, batch, what="metrics")


def alert_times(at: float) -> AlertTimes:
    """This worker's absence and repeat settings, and its silences, as of ``at``."""
    active = silences.active()
    known = silences.caught_up.is_set()  # until the silences are read, repeat nothing
    return AlertTimes(
        absent_after=absent_after_of,
        repeat_interval=settings.alert_repeat_interval if webhook is not None else None,
        silenced=lambda alert: not known or is_silenced(alert, active, at),
    )


@app.timer(ALERT_CHECK_INTERVAL)
async def check_alerts_of_this_worker() -> None:
    """Every worker, over its own partitions' alerts: ask the owner of each service with an absent
    alert, or a firing one due to be sent again, to check them (a record on ``metrics`` keyed by the
    service), so the change is made by record_samples in the service's partition, in order with
    its samples."""
    if not worker_is_ready():
        return
    at = clock()
    try:
        due = alerts_to_check(list(alert_states.values()), at, alert_times(at))
    except Exception:  # noqa: BLE001 - the tables may be changing hands; the next tick looks again
        log.warning("looking for alerts to check failed; trying again in %gs", ALERT_CHECK_INTERVAL, exc_info=True)
        return
    for service, fingerprints in due.items():
        for first in range(0, len(fingerprints), MAX_CHECKED_ALERTS):
            value = json.dumps(fingerprints[first : first + MAX_CHECKED_ALERTS]).encode()
            await metrics_topic.send(key=service.encode(), value=value, headers={ALERT_CHECK_HEADER: b"1"})


@app.task
async def follow_silences() -> None:
    """Keep this worker's copy of every silence."""
    await silences.follow()


async def deliver_webhooks() -> None:
    """Send queued Alertmanager payloads to ALERT_WEBHOOK_URL (a task only with a webhook)."""
    assert webhook is not None  # register() starts this task only with a webhook
    await webhook.run()


def use_alert_rules(rules: List[Rule]) -> None:
    """The rules the agents evaluate from now on."""
    global RULES, RULES_BY_NAME
    RULES = list(rules)
    RULES_BY_NAME = {rule.name: rule for rule in RULES}


def register(app: faust.App, settings: Settings) -> None:
    """Build the webhook sender (and its task) and load ALERT_RULES when the worker starts: an
    invalid rules file stops the worker with one line, importing this module reads nothing."""
    global webhook
    webhook = webhook_sender(settings.alert_webhook_url)
    if webhook is not None:
        app.task(deliver_webhooks)

    @app.on_worker_init.connect
    def load_rules_at_start(sender: faust.App, /, *args: object, **kwargs: object) -> None:
        use_alert_rules(load_alert_rules(settings))


# --- pages ---------------------------------------------------------------------------------------


@app.page("/metrics/services/{service}/")
@app.table_route(table=latest_samples, match_info="service")
async def service_metrics(view: web.View, request: web.Request, service: str) -> web.Response:
    """Latest value of every metric of one service, answered by the worker that owns it."""
    if service not in latest_samples:
        raise view.NotFound("unknown service", service=service)
    state = latest_samples[service]
    return view.json({"service": service, "metrics": state.get("metrics", {}), "samples": state.get("samples", 0)})


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
    for part in (await from_other_workers("/alerts/local/", filters)).values():
        for alert in part["alerts"]:
            alerts[alert["fingerprint"]] = alert
    ordered = sorted(alerts.values(), key=lambda alert: (alert["status"] != "firing", alert["active_since"]))
    return view.json({"alerts": ordered})


LATEST_EPOCH = 253402300799.0  # 9999-12-31T23:59:59Z: the last time RFC 3339 can write


def epoch_time(value: Any, name: str) -> float:
    """A POSTed epoch time: a finite number of seconds up to year 9999 (JSON's NaN and Infinity
    literals, booleans, strings and integers beyond float range are refused with ValueError)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be an epoch time in seconds")
    if isinstance(value, int) and not 0 <= value <= LATEST_EPOCH:  # before float(): 1e400 written out
        raise ValueError(f"{name} must be an epoch time between 0 and {LATEST_EPOCH:.0f}")
    if not math.isfinite(value) or not 0 <= value <= LATEST_EPOCH:
        raise ValueError(f"{name} must be an epoch time between 0 and {LATEST_EPOCH:.0f}, got {value!r}")
    return float(value)


def silence_from_request(body: Any, now: float) -> Silence:
    """Validate a POSTed silence: ``{"matchers": [{"name", "value", "is_regex"}], "ends_at", ...}``."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    matchers = body.get("matchers")
    if (
        not isinstance(matchers, list)
        or not matchers
        or not all(isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("value"), str) for m in matchers)
    ):
        raise ValueError("matchers must be a non-empty list of {name, value, is_regex}")
    ends_at = epoch_time(body.get("ends_at"), "ends_at")
    starts_at = epoch_time(body.get("starts_at", now), "starts_at")
    if ends_at <= now or ends_at <= starts_at:
        raise ValueError("ends_at must be an epoch time in the future, after starts_at")
    silence = Silence(
        id=str(uuid.uuid4()),
        matchers=[{"name": m["name"], "value": m["value"], "is_regex": bool(m.get("is_regex", False))} for m in matchers],
        starts_at=starts_at,
        ends_at=ends_at,
        created_by=str(body.get("created_by", "")),
        comment=str(body.get("comment", "")),
    )
    require_encodable(silence.asdict())  # e.g. a lone surrogate in a label value: refused, not a 500
    return check_silence(silence)


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
            raise self.ValidationError(str(error)) from None
        if silences.is_full(time.time()):
            raise self.ValidationError(f"{settings.silences_max} silences are active (SILENCES_MAX); expire one first")
        await silences_topic.send(key=silence.id, value=silence)
        return self.json(silence.asdict(), status=201)


# --- Prometheus ----------------------------------------------------------------------------------


@gauge(
    "streamspine_alert",
    "1 per pending or firing alert this worker holds (standby copies included: aggregate with max by fingerprint).",
    ["fingerprint", "alertname", "service", "service_instance", "severity", "state"],
)
def alerts_held() -> Dict[Tuple[str, ...], float]:
    return {
        (alert.fingerprint, alert.rule, alert.service, alert.instance, alert.severity, alert.status): 1.0 for alert in alert_states.values()
    }
