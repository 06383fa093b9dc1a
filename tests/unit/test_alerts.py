"""Alert rules, the alert lifecycle, silences and the Alertmanager payload, without Kafka."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

from models.alerts import (
    Alert,
    AlertTimes,
    AnomalyRule,
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
    parse_duration,
    repeat_due,
    resolved_as_absent,
    rfc3339,
)

DEFAULT_RULES = Path(__file__).resolve().parents[2] / "app" / "alert_rules.yaml"

HIGH_CPU = ThresholdRule(
    name="HighCPU", metric="cpu", aggregate="mean", window_seconds=60, op=">", threshold=0.9, for_seconds=30,
    severity="critical", labels={"team": "platform"}, summary="CPU of {service}/{instance} is {value:.2f}",
)


def write_rules(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def run(rule: ThresholdRule, readings: List[Tuple[float, float]], state: Optional[Alert] = None):
    """Evaluate (time, value) readings in order; return the final state and every notification."""
    notifications = []
    for now, value in readings:
        holds, value = condition_holds(rule, {"mean": value})
        state, notification = evaluate(state, rule, "cart", "cart-1", holds, value, now)
        if notification is not None:
            notifications.append(notification)
    return state, notifications


# --- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("5m", 300), ("1h", 3600), ("500ms", 0.5), ("1h30m", 5400),
                                           ("0s", 0), (45, 45), (2.5, 2.5)])
def test_durations_are_read_in_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["30", "5 minutes", "-5s", "", "1x", True, -1])
def test_malformed_durations_are_refused(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


# --- rules file ----------------------------------------------------------------------------------


def test_the_default_rules_file_loads():
    rules = {rule.name: rule for rule in load_rules(DEFAULT_RULES)}

    assert set(rules) == {"HighCPU", "HighMemory", "HighLatencyP99", "HighErrorRate", "LogErrorRate", "CpuAnomaly"}
    assert rules["HighCPU"] == ThresholdRule(
        name="HighCPU", metric="cpu", aggregate="mean", window_seconds=60, op=">", threshold=0.9, for_seconds=30,
        severity="critical", labels={"team": "platform"}, summary=rules["HighCPU"].summary)
    assert (rules["HighLatencyP99"].aggregate, rules["HighLatencyP99"].threshold) == ("p99", 500)
    assert (rules["LogErrorRate"].metric, rules["LogErrorRate"].threshold) == ("log_error_rate", 0.05)
    assert rules["CpuAnomaly"] == AnomalyRule(name="CpuAnomaly", metric="cpu", k=4, warmup=30, alpha=0.1,
                                              severity="info", summary=rules["CpuAnomaly"].summary)


def test_optional_rule_fields_take_their_defaults(tmp_path):
    path = write_rules(tmp_path, """
        rules:
          - {name: Slow, metric: latency_ms, aggregate: p95, window: 5m, op: ">=", threshold: 200}
          - {name: Odd, type: anomaly, metric: cpu}
    """)

    slow, odd = load_rules(path)

    assert (slow.for_seconds, slow.severity, slow.labels, slow.window_seconds) == (0.0, "warning", {}, 300.0)
    assert "{value" in slow.summary
    assert (odd.k, odd.warmup, odd.alpha, odd.for_seconds) == (3.0, 30, 0.1, 0.0)


def test_an_empty_rules_list_is_valid(tmp_path):
    assert load_rules(write_rules(tmp_path, "rules: []\n")) == []


VALID_RULE = """
rules:
  - name: Fine
    metric: cpu
    aggregate: mean
    window: 60s
    op: ">"
    threshold: 0.9
"""


@pytest.mark.parametrize("text, line, reason", [
    (VALID_RULE + """
  - name: HighCPU
    metric: cpu
    aggregate: mean
    window: 60s
    op: "=>"
    threshold: 0.9
""", 13, "rule 'HighCPU': op must be one of >, >=, <, <=, ==, !="),
    (VALID_RULE + """
  - name: Fine
    type: anomaly
    metric: cpu
""", 9, "rule 'Fine': duplicate rule name (first defined on line 2)"),
    (VALID_RULE.replace("window: 60s", "window: 60 seconds"), 5, "rule 'Fine': window: a duration must be like"),
    (VALID_RULE.replace("window: 60s", "window: 0s"), 5, "rule 'Fine': window must be longer than 0s"),
    (VALID_RULE.replace("    window: 60s\n", ""), 2, "rule 'Fine': missing required field 'window'"),
    (VALID_RULE.replace("threshold: 0.9", "threshold: high"), 7, "rule 'Fine': threshold must be a finite number, got 'high'"),
    (VALID_RULE.replace("aggregate: mean", "aggregate: median"), 4, "rule 'Fine': aggregate must be one of mean, min"),
    (VALID_RULE.replace("threshold: 0.9", "threshold: 0.9\n    treshold: 0.8"), 8, "rule 'Fine': unknown field 'treshold'"),
    (VALID_RULE.replace("threshold: 0.9", "threshold: 0.9\n    op: '<'"), 8, "rule 'Fine': field 'op' is given twice"),
    (VALID_RULE.replace("threshold: 0.9", "threshold: 0.9\n    severity: urgent"), 8, "severity must be one of critical, warning, info"),
    (VALID_RULE.replace("threshold: 0.9", "threshold: 0.9\n    summary: 'on {host}'"), 8, "unknown placeholder {host}"),
    (VALID_RULE.replace("threshold: 0.9", "threshold: 0.9\n    labels: {service: x}"), 8, "label 'service' is set by every alert"),
    (VALID_RULE.replace("threshold: 0.9", "threshold: 0.9\n    labels: {team: 7}"), 8, "label 'team' must be a string"),
    (VALID_RULE.replace("- name: Fine\n    metric", "- metric"), 2, "rule #1: missing required field 'name'"),
    (VALID_RULE.replace('op: ">"', "op: >"), 6, 'quote the operator in YAML, e.g. op: ">"'),
    (VALID_RULE.replace('op: ">"', "op: >="), 6, "invalid YAML"),
    (VALID_RULE.replace('op: ">"', "op: [oops"), 7, "invalid YAML"),
    ("- name: x\n", 1, "expected a mapping with a top-level 'rules:' list"),
    ("groups: []\n", 1, "unknown top-level key 'groups'"),
    ("rules: []\nrules: []\n", 2, "'rules:' is given twice"),
    ("", 1, "the file is empty"),
    ("rules:\n  - type: anomaly\n    name: Odd\n    metric: cpu\n    k: -1\n", 5, "rule 'Odd': k must be a positive number"),
    ("rules:\n  - {name: Odd, type: anomaly, metric: cpu, op: '>'}\n", 2, "unknown field 'op' for anomaly rules"),
    ("rules:\n  - {name: Odd, type: anomaly, metric: cpu, warmup: 2.5}\n", 2, "warmup must be a whole number"),
])
def test_an_invalid_rules_file_error_names_the_line_and_the_reason(tmp_path, text, line, reason):
    path = write_rules(tmp_path, text)

    with pytest.raises(RuleFileError) as raised:
        load_rules(path)

    message = str(raised.value)
    assert message.startswith(f"alert rules file {path} line {line}: "), message
    assert reason in message
    assert "\n" not in message


def test_a_missing_rules_file_is_a_rule_file_error(tmp_path):
    with pytest.raises(RuleFileError, match=r"alert rules file .*nope\.yaml: cannot read it: No such file"):
        load_rules(tmp_path / "nope.yaml")


# --- conditions and lifecycle ----------------------------------------------------------------------


def test_a_threshold_condition_compares_the_rules_aggregate():
    rule = ThresholdRule(name="Slow", metric="latency_ms", aggregate="p99", window_seconds=60, op=">", threshold=500)

    assert condition_holds(rule, {"mean": 900.0, "p99": 650.0}) == (True, 650.0)
    assert condition_holds(rule, {"mean": 900.0, "p99": 450.0}) == (False, 450.0)
    assert condition_holds(rule, {"count": 0, "p99": None})[0] is False


def test_a_spike_held_longer_than_for_fires_once_then_resolves_once():
    readings = [(0, 0.5), (10, 0.95), (20, 0.96), (30, 0.97), (40, 0.98), (50, 0.99), (60, 0.97), (70, 0.4), (80, 0.4)]

    state, notifications = run(HIGH_CPU, readings)

    assert [n.status for n in notifications] == ["firing", "resolved"]
    firing, resolved = notifications
    assert (firing.starts_at, firing.active_since, firing.value, firing.ends_at) == (40, 10, 0.98, None)
    assert firing.summary == "CPU of cart/cart-1 is 0.98"
    assert (resolved.starts_at, resolved.ends_at, resolved.fingerprint) == (40, 70, firing.fingerprint)
    assert state is None


def test_a_spike_shorter_than_for_is_never_notified():
    state, notifications = run(HIGH_CPU, [(0, 0.95), (10, 0.97), (20, 0.99), (29, 0.4), (40, 0.95), (50, 0.4)])

    assert notifications == []
    assert state is None


def test_a_pending_alert_waits_for_the_condition_to_hold_for_the_whole_duration():
    state, notifications = run(HIGH_CPU, [(0, 0.95), (29.9, 0.95)])

    assert notifications == []
    assert (state.status, state.active_since, state.starts_at) == ("pending", 0, None)


def test_a_firing_alert_evaluated_again_and_again_is_not_notified_again():
    state, notifications = run(HIGH_CPU, [(t, 0.95) for t in range(0, 600, 5)])

    assert [n.status for n in notifications] == ["firing"]
    assert (state.status, state.starts_at, state.last_evaluated) == ("firing", 30, 595)


def test_a_rule_without_for_fires_on_the_first_evaluation():
    rule = ThresholdRule(name="Down", metric="up", aggregate="min", window_seconds=30, op="<", threshold=1)

    state, notification = evaluate(None, rule, "cart", "cart-1", True, 0.0, 100.0)

    assert notification is state
    assert (state.status, state.starts_at, state.active_since) == ("firing", 100.0, 100.0)


def test_an_anomaly_alert_reports_k_as_its_threshold():
    rule = AnomalyRule(name="CpuAnomaly", metric="cpu", k=4, summary="{metric} {value} beyond {threshold:g} sigma")

    state, notification = evaluate(None, rule, "cart", "cart-1", True, 0.97, 100.0)

    assert (notification.status, notification.threshold, notification.summary) == ("firing", 4.0, "cpu 0.97 beyond 4 sigma")


def test_a_clear_condition_without_an_alert_changes_nothing():
    assert evaluate(None, HIGH_CPU, "cart", "cart-1", False, 0.2, 100.0) == (None, None)


def test_an_alert_round_trips_through_json():
    state, _ = run(HIGH_CPU, [(0, 0.95), (30, 0.97)])

    assert Alert.loads(state.dumps()) == state
    assert Alert.from_data(json.loads(json.dumps(state.asdict()))) == state


def test_a_decoded_firing_alert_still_does_not_notify_again():
    state, _ = run(HIGH_CPU, [(0, 0.95), (30, 0.97)])

    _, notifications = run(HIGH_CPU, [(40, 0.96), (50, 0.3)], state=Alert.loads(state.dumps()))

    assert [n.status for n in notifications] == ["resolved"]


def test_fingerprints_are_stable_and_distinct_per_rule_service_and_instance():
    fingerprint = alert_fingerprint("HighCPU", "cart", "cart-1")

    assert fingerprint == alert_fingerprint("HighCPU", "cart", "cart-1")
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert len({fingerprint, alert_fingerprint("HighCPU", "cart", "cart-2"), alert_fingerprint("HighMemory", "cart", "cart-1"),
                alert_fingerprint("HighCPU", "cart-", "1")}) == 4


# --- silences -----------------------------------------------------------------------------------------


def firing_alert(instance: str = "cart-1", severity: str = "critical") -> Alert:
    rule = ThresholdRule(name="HighCPU", metric="cpu", aggregate="mean", window_seconds=60, op=">", threshold=0.9,
                         severity=severity, labels={"team": "platform"})
    state, _ = evaluate(None, rule, "cart", instance, True, 0.95, 1_000.0)
    return state


def silence(*matchers: dict, starts_at: float = 900.0, ends_at: float = 2_000.0) -> Silence:
    return Silence(id="s1", matchers=list(matchers), starts_at=starts_at, ends_at=ends_at,
                   created_by="ops@example.com", comment="maintenance")


def test_a_silence_mutes_alerts_whose_labels_all_match():
    muted = silence({"name": "alertname", "value": "HighCPU", "is_regex": False},
                    {"name": "team", "value": "platform", "is_regex": False})

    assert is_silenced(firing_alert(), [muted], now=1_000.0)


def test_a_silence_with_one_mismatching_matcher_does_not_mute():
    partial = silence({"name": "alertname", "value": "HighCPU", "is_regex": False},
                      {"name": "severity", "value": "warning", "is_regex": False})

    assert not is_silenced(firing_alert(), [partial], now=1_000.0)


def test_regex_matchers_must_match_the_whole_label_value():
    instances = silence({"name": "instance", "value": "cart-[12]", "is_regex": True})
    prefix_only = silence({"name": "instance", "value": "cart", "is_regex": True})

    assert is_silenced(firing_alert("cart-2"), [instances], now=1_000.0)
    assert not is_silenced(firing_alert("cart-3"), [instances], now=1_000.0)
    assert not is_silenced(firing_alert("cart-1"), [prefix_only], now=1_000.0)


def test_a_silence_only_mutes_between_its_start_and_end():
    window = silence({"name": "service", "value": "cart", "is_regex": False}, starts_at=900.0, ends_at=1_100.0)

    assert not is_silenced(firing_alert(), [window], now=899.0)
    assert is_silenced(firing_alert(), [window], now=900.0)
    assert not is_silenced(firing_alert(), [window], now=1_100.0)


def test_a_silence_that_cannot_match_safely_mutes_nothing():
    broken_regex = silence({"name": "service", "value": "cart(", "is_regex": True})

    assert not is_silenced(firing_alert(), [broken_regex, silence()], now=1_000.0)


def test_a_silence_round_trips_through_json_and_still_matches():
    muted = silence({"name": "metric", "value": "cpu|memory", "is_regex": True})

    assert is_silenced(firing_alert(), [Silence.loads(muted.dumps())], now=1_000.0)


# --- Alertmanager webhook ---------------------------------------------------------------------------


def test_the_webhook_payload_follows_alertmanager_version_4():
    _, (firing, resolved) = run(HIGH_CPU, [(1_732_412_345.5, 0.95), (1_732_412_375.5, 0.97), (1_732_412_400, 0.2)])

    payload = alertmanager_payload([firing], external_url="http://streamspine:6066")

    assert payload == {
        "version": "4",
        "groupKey": '{}:{alertname="HighCPU"}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "streamspine",
        "groupLabels": {"alertname": "HighCPU"},
        "commonLabels": {"alertname": "HighCPU", "service": "cart", "instance": "cart-1", "severity": "critical",
                         "metric": "cpu", "team": "platform"},
        "commonAnnotations": {"summary": "CPU of cart/cart-1 is 0.97"},
        "externalURL": "http://streamspine:6066",
        "alerts": [{
            "status": "firing",
            "labels": {"alertname": "HighCPU", "service": "cart", "instance": "cart-1", "severity": "critical",
                       "metric": "cpu", "team": "platform"},
            "annotations": {"summary": "CPU of cart/cart-1 is 0.97"},
            "startsAt": "2024-11-24T01:39:35.500Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": f"http://streamspine:6066/alerts/{firing.fingerprint}",
            "fingerprint": firing.fingerprint,
        }],
    }
    assert alertmanager_payload([resolved])["alerts"][0]["endsAt"] == "2024-11-24T01:40:00.000Z"
    json.dumps(payload)


def test_a_webhook_group_is_resolved_only_when_no_alert_is_firing():
    _, (firing, resolved) = run(HIGH_CPU, [(0, 0.95), (30, 0.97), (40, 0.2)])
    other = firing_alert("cart-2", severity="warning")

    assert alertmanager_payload([resolved])["status"] == "resolved"
    mixed = alertmanager_payload([resolved, other])
    assert mixed["status"] == "firing"
    assert mixed["commonLabels"] == {"alertname": "HighCPU", "service": "cart", "metric": "cpu", "team": "platform"}
    assert [alert["status"] for alert in mixed["alerts"]] == ["resolved", "firing"]


def test_pending_alerts_are_never_sent():
    pending, _ = run(HIGH_CPU, [(0, 0.95)])

    with pytest.raises(ValueError, match="pending"):
        alertmanager_payload([pending])


# --- absent series and repeated notifications ----------------------------------------------------------


def test_an_alert_keeps_when_it_was_evaluated_and_when_it_was_last_notified():
    pending, _ = evaluate(None, HIGH_CPU, "cart", "cart-1", True, 0.95, 100.0, at=5_000.0)
    firing, notification = evaluate(pending, HIGH_CPU, "cart", "cart-1", True, 0.95, 130.0, at=5_030.0)
    notified = firing.derive(notified_at=5_030.0)
    still, _ = evaluate(notified, HIGH_CPU, "cart", "cart-1", True, 0.96, 140.0, at=5_040.0)

    assert (pending.evaluated_at, firing.evaluated_at, notification.status) == (5_000.0, 5_030.0, "firing")
    assert (still.evaluated_at, still.notified_at) == (5_040.0, 5_030.0)


def test_an_alert_resolves_after_its_rules_window_plus_one_step_without_samples_by_default():
    assert absent_after(HIGH_CPU, None, step=10.0, default_window=60.0) == 70.0
    assert absent_after(AnomalyRule(name="A", metric="cpu"), None, step=10.0, default_window=300.0) == 310.0
    assert absent_after(None, None, step=10.0, default_window=60.0) == 70.0  # a rule no longer in the file
    assert absent_after(HIGH_CPU, 15.0, step=10.0, default_window=60.0) == 15.0  # ALERT_ABSENT_AFTER


def test_absence_is_measured_from_the_last_evaluation_on_the_wall_clock():
    firing, _ = evaluate(None, HIGH_CPU.__class__(**{**HIGH_CPU.__dict__, "for_seconds": 0}), "cart", "cart-1",
                         True, 0.95, 100.0, at=5_000.0)

    assert not is_absent(firing, 5_069.0, 70.0)
    assert is_absent(firing, 5_070.0, 70.0)
    assert not is_absent(Alert.from_data({**firing.asdict(), "evaluated_at": None}), 9_000.0, 70.0)  # stored before


def test_an_absent_firing_alert_is_notified_resolved_and_an_absent_pending_one_is_dropped_silently():
    pending, _ = evaluate(None, HIGH_CPU, "cart", "cart-1", True, 0.95, 100.0, at=5_000.0)
    firing, _ = evaluate(pending, HIGH_CPU, "cart", "cart-1", True, 0.95, 130.0, at=5_030.0)

    resolved = resolved_as_absent(firing, 5_200.0)

    assert resolved_as_absent(pending, 5_200.0) is None
    assert (resolved.status, resolved.ends_at, resolved.starts_at) == ("resolved", 5_200.0, 130.0)
    assert alertmanager_payload([resolved])["alerts"][0]["endsAt"] == rfc3339(5_200.0)


def test_a_firing_alert_is_due_again_every_repeat_interval_and_a_pending_one_never():
    pending, _ = evaluate(None, HIGH_CPU, "cart", "cart-1", True, 0.95, 100.0, at=5_000.0)
    firing, _ = evaluate(pending, HIGH_CPU, "cart", "cart-1", True, 0.95, 130.0, at=5_030.0)

    assert repeat_due(firing, 5_030.0, 3600.0)  # never sent (silenced, or its notification lost)
    assert not repeat_due(firing.derive(notified_at=5_030.0), 8_629.0, 3600.0)
    assert repeat_due(firing.derive(notified_at=5_030.0), 8_630.0, 3600.0)
    assert not repeat_due(pending, 99_999.0, 3600.0)


def test_the_alerts_to_check_are_the_absent_ones_and_the_unsilenced_ones_due_again_per_service():
    def alert(service: str, instance: str, evaluated_at: float, notified_at: Optional[float]) -> Alert:
        state, _ = evaluate(None, HIGH_CPU.__class__(**{**HIGH_CPU.__dict__, "for_seconds": 0}), service, instance,
                            True, 0.95, 100.0, at=evaluated_at)
        return state.derive(notified_at=notified_at)

    absent = alert("cart", "cart-1", 1_000.0, 1_000.0)
    due_again = alert("cart", "cart-2", 4_990.0, 1_000.0)
    silenced = alert("search", "search-1", 4_990.0, 1_000.0)
    quiet = alert("search", "search-2", 4_990.0, 4_900.0)
    unknown = Alert.from_data({**alert("orders", "orders-1", 4_990.0, 4_900.0).asdict(), "evaluated_at": None})
    alerts = [absent, due_again, silenced, quiet, unknown]
    times = AlertTimes(absent_after=lambda a: 70.0, repeat_interval=3600.0, silenced=lambda a: a is silenced)

    due = alerts_to_check(alerts, 5_000.0, times)
    without_webhook = alerts_to_check(alerts, 5_000.0, times._replace(repeat_interval=None))

    assert due == {"cart": [absent.fingerprint, due_again.fingerprint], "orders": [unknown.fingerprint]}
    assert without_webhook == {"cart": [absent.fingerprint], "orders": [unknown.fingerprint]}


@pytest.mark.parametrize("value", [[], "0123456789abcdef", ["0123456789ABCDEF"], ["0123"], [7], ["0123456789abcdef"] * 10_001, None])
def test_an_alert_check_that_does_not_list_fingerprints_is_refused(value):
    with pytest.raises(ValueError):
        parse_alert_check(value)


def test_an_alert_check_lists_fingerprints():
    assert parse_alert_check([alert_fingerprint("HighCPU", "cart", "cart-1")]) == [alert_fingerprint("HighCPU", "cart", "cart-1")]


@pytest.mark.parametrize("changes", [{"ends_at": None}, {"ends_at": float("nan")}, {"starts_at": float("inf")},
                                     {"ends_at": "tomorrow"}, {"ends_at": True}, {"ends_at": 10**400}, {"matchers": "all"},
                                     {"matchers": ["service=cart"]}])
def test_a_silence_matching_could_not_use_is_refused(changes):
    with pytest.raises(ValueError):
        check_silence(Silence.from_data({**silence({"name": "service", "value": "cart"}).asdict(), **changes}))


def test_a_time_beyond_year_9999_has_no_rfc3339_form():
    assert rfc3339(1e300) == "0001-01-01T00:00:00Z"
