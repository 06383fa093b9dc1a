"""Alert rules (parsed from YAML), the alert lifecycle, silences and the Alertmanager webhook payload."""

from __future__ import annotations

import hashlib
import json
import math
import operator
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import faust
import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

OPERATORS: Dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
AGGREGATES = ("mean", "min", "max", "sum", "count", "p50", "p95", "p99")
SEVERITIES = ("critical", "warning", "info")
SUMMARY_PLACEHOLDERS = ("service", "instance", "metric", "rule", "value", "threshold")
# Labels every alert carries; a rule's own labels may not redefine them.
ALERT_LABELS = ("alertname", "service", "instance", "severity", "metric")
UNSET_TIME = "0001-01-01T00:00:00Z"

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class RuleFileError(ValueError):
    """An alert rules file that cannot be used; the one-line message names the file, line and reason."""


@dataclass(frozen=True)
class ThresholdRule:
    """Fire when an aggregate of a metric over a window compares true against a threshold for ``for_seconds``."""

    name: str
    metric: str
    aggregate: str
    window_seconds: float
    op: str
    threshold: float
    for_seconds: float = 0.0
    severity: str = "warning"
    labels: Mapping[str, str] = field(default_factory=dict)
    summary: str = ""


@dataclass(frozen=True)
class AnomalyRule:
    """Fire when a metric lies more than ``k`` standard deviations from its EWMA baseline."""

    name: str
    metric: str
    k: float = 3.0
    warmup: int = 30
    alpha: float = 0.1
    for_seconds: float = 0.0
    severity: str = "warning"
    labels: Mapping[str, str] = field(default_factory=dict)
    summary: str = ""


Rule = Union[ThresholdRule, AnomalyRule]


class Alert(faust.Record, serializer="json"):
    """One rule's alert for one service instance: stored while pending or firing, emitted on firing and resolved.

    ``active_since`` is when the condition began to hold, ``starts_at`` when the alert began firing
    (None while pending) and ``ends_at`` when it resolved (None while active), in event time. For
    anomaly rules ``threshold`` is ``k``, the number of standard deviations.

    Two wall-clock times drive what happens without new samples: ``evaluated_at``, when samples of
    the series last arrived (an alert whose series stays absent resolves), and ``notified_at``,
    when the webhook was last sent the firing alert (it is sent again every repeat interval).
    """

    fingerprint: str
    rule: str
    service: str
    instance: str
    metric: str
    severity: str
    status: str
    value: float
    threshold: float
    summary: str
    labels: Dict[str, str]
    active_since: float
    last_evaluated: float
    starts_at: Optional[float] = None
    ends_at: Optional[float] = None
    evaluated_at: Optional[float] = None
    notified_at: Optional[float] = None


class Silence(faust.Record, serializer="json"):
    """Mute alerts whose labels match every matcher (``{"name", "value", "is_regex"}``) between two times."""

    id: str
    matchers: List[Dict[str, Any]]
    starts_at: float
    ends_at: float
    created_by: str
    comment: str


# --- durations ---------------------------------------------------------------------------------


def parse_duration(value: Union[str, int, float]) -> float:
    """Seconds in a duration such as ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h30m"`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"a duration must be like 30s, 5m or 1h, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"a duration must be a non-negative number of seconds, got {value!r}")
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"a duration must be like 30s, 5m or 1h, got {value!r}")
    text = value.strip()
    parts = _DURATION_PART.findall(text)
    if "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"a duration must be like 500ms, 30s, 5m, 1h or 1h30m, got {value!r}")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


# --- rules file ------------------------------------------------------------------------------------


class _Problem(Exception):
    """A problem at one line of the rules file; load_rules turns it into a RuleFileError."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(reason)
        self.line = line
        self.reason = reason


def _line(node: Node) -> int:
    return node.start_mark.line + 1


class _RuleFields:
    """The fields of one rule mapping, read with type checks that name the offending line."""

    def __init__(self, loader: yaml.SafeLoader, node: MappingNode, label: str) -> None:
        self.loader, self.node, self.label = loader, node, label
        self.nodes: Dict[str, Tuple[Node, Node]] = {}
        self.repeated: List[Tuple[str, Node]] = []
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise _Problem(_line(key_node), f"{label}: field names must be strings, got {key!r}")
            if key in self.nodes:
                self.repeated.append((key, key_node))
            else:
                self.nodes[key] = (key_node, value_node)

    def reject_repeated(self) -> None:
        # YAML would silently keep the last of two equal keys; a rule that says op twice is a mistake.
        for key, key_node in self.repeated:
            raise _Problem(_line(key_node), f"{self.label}: field {key!r} is given twice")

    def problem(self, key: Optional[str], reason: str) -> _Problem:
        line = _line(self.nodes[key][1]) if key in self.nodes else _line(self.node)
        return _Problem(line, f"{self.label}: {reason}")

    def raw(self, key: str, default: Any = None, required: bool = False) -> Any:
        if key not in self.nodes:
            if required:
                raise self.problem(None, f"missing required field {key!r}")
            return default
        return self.loader.construct_object(self.nodes[key][1], deep=True)

    def text(self, key: str, default: Optional[str] = None, required: bool = False) -> str:
        value = self.raw(key, default, required)
        if not isinstance(value, str) or not value.strip():
            raise self.problem(key, f"{key} must be a non-empty string, got {value!r}")
        return value.strip()

    def choice(self, key: str, options: Sequence[str], default: Optional[str] = None, hint: str = "") -> str:
        value = self.raw(key, default, required=default is None)
        if value not in options:
            raise self.problem(key, f"{key} must be one of {', '.join(options)}, got {value!r}{hint}")
        return value

    def number(
        self, key: str, default: Optional[float] = None, check: Callable[[float], bool] = math.isfinite, expected: str = "a number"
    ) -> float:
        value = self.raw(key, default, required=default is None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not check(value):
            raise self.problem(key, f"{key} must be {expected}, got {value!r}")
        return float(value)

    def duration(self, key: str, default: Optional[str] = None, positive: bool = False) -> float:
        value = self.raw(key, default, required=default is None)
        try:
            seconds = parse_duration(value)
        except ValueError as error:
            raise self.problem(key, f"{key}: {error}") from None
        if positive and seconds <= 0:
            raise self.problem(key, f"{key} must be longer than 0s, got {value!r}")
        return seconds

    def labels(self) -> Dict[str, str]:
        value = self.raw("labels", {})
        if not isinstance(value, dict):
            raise self.problem("labels", f"labels must be a mapping of names to strings, got {value!r}")
        for name, label_value in value.items():
            if not isinstance(name, str) or not _LABEL_NAME.fullmatch(name):
                raise self.problem("labels", f"label name {name!r} must match [A-Za-z_][A-Za-z0-9_]*")
            if name in ALERT_LABELS:
                raise self.problem("labels", f"label {name!r} is set by every alert and cannot be redefined")
            if not isinstance(label_value, str):
                raise self.problem("labels", f"label {name!r} must be a string (quote it), got {label_value!r}")
        return dict(value)

    def summary(self, default: str) -> str:
        template = self.text("summary", default)
        try:
            template.format(**{name: 1.0 if name in ("value", "threshold") else "x" for name in SUMMARY_PLACEHOLDERS})
        except KeyError as error:
            raise self.problem(
                "summary",
                f"summary uses unknown placeholder {{{error.args[0]}}}; use {', '.join('{' + p + '}' for p in SUMMARY_PLACEHOLDERS)}",
            ) from None
        except (ValueError, IndexError) as error:
            raise self.problem("summary", f"summary is not a valid template: {error}") from None
        return template

    def reject_unknown(self, allowed: Sequence[str], kind: str) -> None:
        for key in self.nodes:
            if key not in allowed:
                raise _Problem(_line(self.nodes[key][0]), f"{self.label}: unknown field {key!r} for {kind} rules")


_COMMON_FIELDS = ("name", "type", "metric", "for", "severity", "labels", "summary")
_THRESHOLD_FIELDS = _COMMON_FIELDS + ("aggregate", "window", "op", "threshold")
_ANOMALY_FIELDS = _COMMON_FIELDS + ("k", "warmup", "alpha")


def _operator_hint(fields: _RuleFields) -> str:
    # YAML reads an unquoted > as an empty folded block, so the operator silently vanishes.
    node = fields.nodes.get("op", (None, None))[1]
    if isinstance(node, ScalarNode) and node.style in (">", "|"):
        return ' (quote the operator in YAML, e.g. op: ">")'
    return ""


def _threshold_rule(fields: _RuleFields, name: str) -> ThresholdRule:
    fields.reject_unknown(_THRESHOLD_FIELDS, "threshold")
    aggregate = fields.choice("aggregate", AGGREGATES)
    op = fields.choice("op", tuple(OPERATORS), hint=_operator_hint(fields))
    return ThresholdRule(
        name=name,
        metric=fields.text("metric", required=True),
        aggregate=aggregate,
        window_seconds=fields.duration("window", positive=True),
        op=op,
        threshold=fields.number("threshold", expected="a finite number"),
        for_seconds=fields.duration("for", "0s"),
        severity=fields.choice("severity", SEVERITIES, "warning"),
        labels=fields.labels(),
        summary=fields.summary("{rule}: " + aggregate + " {metric} is {value:.4g} (" + op + " {threshold:g}) on {service}/{instance}"),
    )


def _anomaly_rule(fields: _RuleFields, name: str) -> AnomalyRule:
    fields.reject_unknown(_ANOMALY_FIELDS, "anomaly")
    return AnomalyRule(
        name=name,
        metric=fields.text("metric", required=True),
        k=fields.number("k", 3.0, lambda k: math.isfinite(k) and k > 0, "a positive number"),
        warmup=int(fields.number("warmup", 30, lambda w: w >= 0 and float(w).is_integer(), "a whole number >= 0")),
        alpha=fields.number("alpha", 0.1, lambda a: 0 < a <= 1, "a number in (0, 1]"),
        for_seconds=fields.duration("for", "0s"),
        severity=fields.choice("severity", SEVERITIES, "warning"),
        labels=fields.labels(),
        summary=fields.summary(
            "{rule}: {metric} is {value:.4g} on {service}/{instance}, more than {threshold:g} standard deviations from its baseline"
        ),
    )


def _rule_from_node(loader: yaml.SafeLoader, node: Node, position: int) -> Rule:
    if not isinstance(node, MappingNode):
        raise _Problem(_line(node), f"rule #{position} must be a mapping of fields")
    fields = _RuleFields(loader, node, f"rule #{position}")
    name = fields.text("name", required=True)
    fields.label = f"rule {name!r}"
    fields.reject_repeated()
    kind = fields.choice("type", ("threshold", "anomaly"), "threshold")
    return _threshold_rule(fields, name) if kind == "threshold" else _anomaly_rule(fields, name)


def _rules_from_root(loader: yaml.SafeLoader, root: Optional[Node]) -> List[Rule]:
    if root is None:
        raise _Problem(1, "the file is empty; expected a top-level 'rules:' list")
    if not isinstance(root, MappingNode):
        raise _Problem(_line(root), "expected a mapping with a top-level 'rules:' list")
    rules_node: Optional[Node] = None
    for key_node, value_node in root.value:
        key = loader.construct_object(key_node, deep=True)
        if key != "rules":
            raise _Problem(_line(key_node), f"unknown top-level key {key!r}; expected only 'rules:'")
        if rules_node is not None:
            raise _Problem(_line(key_node), "'rules:' is given twice")
        rules_node = value_node
    if rules_node is None:
        raise _Problem(_line(root), "missing the top-level 'rules:' list")
    if isinstance(rules_node, ScalarNode) and rules_node.tag == "tag:yaml.org,2002:null":
        return []
    if not isinstance(rules_node, SequenceNode):
        raise _Problem(_line(rules_node), "'rules:' must be a list of rules")
    rules: List[Rule] = []
    first_line: Dict[str, int] = {}
    for position, rule_node in enumerate(rules_node.value, start=1):
        rule = _rule_from_node(loader, rule_node, position)
        if rule.name in first_line:
            raise _Problem(_line(rule_node), f"rule {rule.name!r}: duplicate rule name (first defined on line {first_line[rule.name]})")
        first_line[rule.name] = _line(rule_node)
        rules.append(rule)
    return rules


def _yaml_problem(error: yaml.YAMLError, lines: Sequence[str]) -> _Problem:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    line = mark.line + 1 if mark is not None else 1
    reason = " ".join(str(getattr(error, "problem", None) or error).split())
    text = lines[line - 1] if 0 < line <= len(lines) else ""
    hint = ' (quote the operator, e.g. op: ">=")' if re.match(r"\s*(-\s*)?op:\s*[>|!]", text) else ""
    return _Problem(line, f"invalid YAML: {reason}{hint}")


def load_rules(path: Union[str, Path]) -> List[Rule]:
    """Read and validate an alert rules file (a top-level ``rules:`` list); any problem raises RuleFileError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise RuleFileError(f"alert rules file {path}: cannot read it: {reason}") from None
    loader = yaml.SafeLoader(text)
    try:
        return _rules_from_root(loader, loader.get_single_node())
    except yaml.YAMLError as error:
        problem = _yaml_problem(error, text.splitlines())
    except _Problem as error:
        problem = error
    finally:
        loader.dispose()
    raise RuleFileError(f"alert rules file {path} line {problem.line}: {problem.reason}")


# --- evaluation and lifecycle -------------------------------------------------------------------------


def alert_fingerprint(rule_name: str, service: str, instance: str) -> str:
    """A stable 16-hex-digit identity for one rule's alert on one service instance."""
    return hashlib.sha1("\x1f".join((rule_name, service, instance)).encode("utf-8")).hexdigest()[:16]


def condition_holds(rule: ThresholdRule, aggregate_summary: Mapping[str, Optional[float]]) -> Tuple[bool, float]:
    """Whether a threshold rule's condition holds for a window summary, and the aggregate it compared."""
    value = aggregate_summary.get(rule.aggregate)
    if value is None:
        return False, math.nan
    return OPERATORS[rule.op](value, rule.threshold), float(value)


def rule_threshold(rule: Rule) -> float:
    """The number an alert reports as its threshold: the threshold, or ``k`` for anomaly rules."""
    return rule.threshold if isinstance(rule, ThresholdRule) else rule.k


def render_summary(rule: Rule, service: str, instance: str, value: float) -> str:
    """The rule's summary with its placeholders filled in."""
    return rule.summary.format(
        service=service, instance=instance, metric=rule.metric, rule=rule.name, value=value, threshold=rule_threshold(rule)
    )


def _active_alert(
    rule: Rule,
    service: str,
    instance: str,
    status: str,
    value: float,
    now: float,
    active_since: float,
    starts_at: Optional[float],
    at: Optional[float] = None,
    notified_at: Optional[float] = None,
) -> Alert:
    return Alert(
        fingerprint=alert_fingerprint(rule.name, service, instance),
        rule=rule.name,
        service=service,
        instance=instance,
        metric=rule.metric,
        severity=rule.severity,
        status=status,
        value=value,
        threshold=rule_threshold(rule),
        summary=render_summary(rule, service, instance, value),
        labels=dict(rule.labels),
        active_since=active_since,
        last_evaluated=now,
        starts_at=starts_at,
        ends_at=None,
        evaluated_at=at,
        notified_at=notified_at,
    )


def _resolved(alert: Alert, now: float) -> Alert:
    # A resolved notification carries the last values seen while the alert was firing, like Prometheus.
    return Alert(**{**alert.asdict(), "status": "resolved", "ends_at": now, "last_evaluated": now})


def evaluate(
    previous: Optional[Alert],
    rule: Rule,
    service: str,
    instance: str,
    condition_holds: bool,
    value: float,
    now: float,
    at: Optional[float] = None,
) -> Tuple[Optional[Alert], Optional[Alert]]:
    """Advance one alert's lifecycle: return (the state to store, or None to clear it; the notification, or None).

    pending waits out ``for``; only the moves to firing and to resolved are notified, each once.
    ``now`` is the event time evaluated, ``at`` the wall-clock time of the evaluation.
    """
    active = previous if previous is not None and previous.status in ("pending", "firing") else None
    if not condition_holds:
        if active is not None and active.status == "firing":
            return None, _resolved(active, now)
        return None, None
    if active is not None and active.status == "firing":
        state = _active_alert(rule, service, instance, "firing", value, now, active.active_since, active.starts_at, at, active.notified_at)
        return state, None
    active_since = active.active_since if active is not None else now
    if now - active_since >= rule.for_seconds:
        firing = _active_alert(rule, service, instance, "firing", value, now, active_since, now, at)
        return firing, firing
    return _active_alert(rule, service, instance, "pending", value, now, active_since, None, at), None


# --- absent series and repeated notifications ----------------------------------------------------------


def absent_after(rule: Optional[Rule], configured: Optional[float], step: float, default_window: float) -> float:
    """Seconds without samples after which an alert of ``rule`` resolves: ALERT_ABSENT_AFTER, else
    the rule's window (``default_window`` for anomaly rules and rules no longer in the file) plus one step."""
    if configured is not None:
        return configured
    window = rule.window_seconds if isinstance(rule, ThresholdRule) else default_window
    return window + step


def is_absent(alert: Alert, at: float, after: float) -> bool:
    """Whether no sample of the alert's series arrived for ``after`` seconds before wall-clock ``at``
    (an alert stored before evaluation times were kept is not: its absence counts from its first check)."""
    return alert.evaluated_at is not None and at - alert.evaluated_at >= after


def resolved_as_absent(alert: Alert, at: float) -> Optional[Alert]:
    """The notification of an alert ended by its series' absence: resolved at ``at`` (wall clock,
    as Prometheus ends an alert when it evaluates the absence) if it was firing; None if it was
    only pending (never notified, so nothing to resolve)."""
    if alert.status != "firing":
        return None
    return Alert(**{**alert.asdict(), "status": "resolved", "ends_at": max(at, alert.starts_at or at)})


def repeat_due(alert: Alert, at: float, interval: float) -> bool:
    """Whether a firing alert is due to be sent to the webhook (again): never sent, or last sent
    ``interval`` seconds or more before ``at`` (Alertmanager's repeat_interval)."""
    return alert.status == "firing" and (alert.notified_at is None or at - alert.notified_at >= interval)


class AlertTimes(NamedTuple):
    """What decides, without new samples, that an alert needs its worker's attention."""

    absent_after: Callable[[Alert], float]  # seconds, per alert (its rule's)
    repeat_interval: Optional[float]  # None: no webhook, nothing to repeat
    silenced: Callable[[Alert], bool]


def alerts_to_check(alerts: Iterable[Alert], at: float, times: AlertTimes) -> Dict[str, List[str]]:
    """Per service, the fingerprints of its alerts that are absent or due to be sent again (or
    stored without an evaluation time, which their check sets)."""
    due: Dict[str, List[str]] = {}
    for alert in alerts:
        absent = alert.evaluated_at is None or is_absent(alert, at, times.absent_after(alert))
        repeat = times.repeat_interval is not None and repeat_due(alert, at, times.repeat_interval)
        if absent or (repeat and not times.silenced(alert)):
            due.setdefault(alert.service, []).append(alert.fingerprint)
    return due


# An alert check is a record on ``metrics`` keyed by service, marked by this header, whose value is
# a JSON array of alert fingerprints: the worker that owns the service looks at those alerts again.
# It only prompts a check of stored state against the clock, so a forged one can resolve nothing
# that is not absent.
ALERT_CHECK_HEADER = "streamspine.alert-check"
MAX_CHECKED_ALERTS = 10_000
_FINGERPRINT = re.compile(r"[0-9a-f]{16}")


def parse_alert_check(value: Any) -> List[str]:
    """The fingerprints of an alert check's decoded JSON value; ValueError when it is not a list
    of at most MAX_CHECKED_ALERTS fingerprints."""
    if not isinstance(value, list) or not value or len(value) > MAX_CHECKED_ALERTS:
        raise ValueError(f"an alert check must be a list of 1 to {MAX_CHECKED_ALERTS} alert fingerprints")
    for fingerprint in value:
        if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
            raise ValueError("an alert check must list alert fingerprints (16 hexadecimal digits)")
    return list(value)


# --- silences -----------------------------------------------------------------------------------------


def alert_labels(alert: Alert) -> Dict[str, str]:
    """All labels of an alert: the rule's labels plus alertname, service, instance, severity and metric."""
    return {
        **alert.labels,
        "alertname": alert.rule,
        "service": alert.service,
        "instance": alert.instance,
        "severity": alert.severity,
        "metric": alert.metric,
    }


def _matcher_matches(matcher: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    # As in Alertmanager: a missing label is the empty string and a regex must match the whole value.
    actual = labels.get(str(matcher.get("name", "")), "")
    expected = str(matcher.get("value", ""))
    if not matcher.get("is_regex", False):
        return actual == expected
    try:
        return re.fullmatch(expected, actual) is not None
    except re.error:
        return False  # a broken silence must not hide alerts


def silence_matches(silence: Silence, alert: Alert, now: float) -> bool:
    """Whether the silence is in effect at ``now`` and all of its matchers match the alert."""
    if not silence.starts_at <= now < silence.ends_at or not silence.matchers:
        return False  # a silence without matchers would mute everything; treat it as matching nothing
    labels = alert_labels(alert)
    return all(_matcher_matches(matcher, labels) for matcher in silence.matchers)


def check_silence(silence: Silence) -> Silence:
    """``silence`` if matching can use it: finite start and end times and a list of matcher objects;
    ValueError otherwise (a silence another producer wrote to ``alert-silences`` with ``ends_at``
    null or NaN would make every match fail, and with it every notification)."""
    for name in ("starts_at", "ends_at"):
        value = getattr(silence, name)
        if isinstance(value, bool) or not isinstance(value, float) and not isinstance(value, int):
            raise ValueError(f"silence {name} must be an epoch time, got {value!r}")
        if isinstance(value, int) and abs(value) > 2**53 or not math.isfinite(value):
            raise ValueError(f"silence {name} must be a finite epoch time")
    if (
        not isinstance(silence.id, str)
        or not isinstance(silence.matchers, list)
        or not all(isinstance(matcher, dict) for matcher in silence.matchers)
    ):
        raise ValueError("a silence needs a string id and a list of matcher objects")
    return silence


def is_silenced(alert: Alert, silences: Sequence[Silence], now: float) -> bool:
    """Whether any active silence mutes the alert."""
    return any(silence_matches(silence, alert, now) for silence in silences)


# --- Alertmanager webhook ---------------------------------------------------------------------------


def rfc3339(timestamp: Optional[float]) -> str:
    """An epoch time as RFC 3339 UTC with milliseconds, or Alertmanager's zero time when unset."""
    if timestamp is None or timestamp <= 0:
        return UNSET_TIME
    try:
        moment = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    except (OverflowError, ValueError, OSError):  # beyond year 9999: no RFC 3339 time to give
        return UNSET_TIME
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _webhook_alert(alert: Alert, external_url: str) -> Dict[str, Any]:
    if alert.status not in ("firing", "resolved"):
        raise ValueError(f"only firing and resolved alerts are sent, got {alert.status!r} for {alert.rule!r}")
    return {
        "status": alert.status,
        "labels": alert_labels(alert),
        "annotations": {"summary": alert.summary},
        "startsAt": rfc3339(alert.starts_at if alert.starts_at is not None else alert.active_since),
        "endsAt": rfc3339(alert.ends_at),
        "generatorURL": f"{external_url.rstrip('/')}/alerts/{alert.fingerprint}" if external_url else "",
        "fingerprint": alert.fingerprint,
    }


def _common(mappings: Sequence[Mapping[str, str]]) -> Dict[str, str]:
    first = mappings[0]
    return {key: value for key, value in first.items() if all(m.get(key) == value for m in mappings[1:])}


def alertmanager_payload(alerts: Sequence[Alert], receiver: str = "streamspine", external_url: str = "") -> Dict[str, Any]:
    """The Alertmanager webhook body (version 4) for a group of firing and resolved alerts."""
    if not alerts:
        raise ValueError("an Alertmanager payload needs at least one alert")
    entries = [_webhook_alert(alert, external_url) for alert in alerts]
    common_labels = _common([entry["labels"] for entry in entries])
    group_labels = {"alertname": common_labels["alertname"]} if "alertname" in common_labels else {}
    group_key = "{}:{" + ",".join(f"{name}={json.dumps(value)}" for name, value in sorted(group_labels.items())) + "}"
    return {
        "version": "4",
        "groupKey": group_key,
        "truncatedAlerts": 0,
        "status": "firing" if any(alert.status == "firing" for alert in alerts) else "resolved",
        "receiver": receiver,
        "groupLabels": group_labels,
        "commonLabels": common_labels,
        "commonAnnotations": _common([entry["annotations"] for entry in entries]),
        "externalURL": external_url,
        "alerts": entries,
    }
