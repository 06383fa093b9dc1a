"""``GET /metrics``: the worker in Prometheus' text exposition format.

Everything is read when Prometheus scrapes, from what Faust's monitor and the runtime already
count, so exposing metrics adds no work per record. Jobs add their own gauges with ``gauge``:

    @gauge("streamspine_alerts", "Pending and firing alerts of this worker's partitions", ["state"])
    def alerts_by_state() -> Dict[Tuple[str, ...], float]:
        return {("firing",): 2.0, ("pending",): 1.0}
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Iterator, List, Mapping, NamedTuple, Sequence, Tuple

from faust import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from app import app
from app.dead_letters import DLQ_SUFFIX
from app.runtime import apply_stats

log = logging.getLogger(__name__)

Samples = Dict[Tuple[str, ...], float]


class JobGauge(NamedTuple):
    name: str
    documentation: str
    labels: Sequence[str]
    read: Callable[[], Samples]


_job_gauges: List[JobGauge] = []


def gauge(name: str, documentation: str, labels: Sequence[str] = ()) -> Callable[[Callable[[], Samples]], Callable[[], Samples]]:
    """Register a function that returns ``{label values: value}``, read at every scrape."""

    def register(read: Callable[[], Samples]) -> Callable[[], Samples]:
        _job_gauges.append(JobGauge(name, documentation, tuple(labels), read))
        return read

    return register


def counter_family(name: str, documentation: str, label: str, counts: Mapping[str, float]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([value], count)
    return family


class WorkerCollector(Collector):
    """Faust's monitor, the runtime's counts and every job's gauges, as metric families."""

    def collect(self) -> Iterator:
        monitor = app.monitor
        received = dict(monitor.messages_received_by_topic)
        sent = dict(monitor.messages_sent_by_topic)
        yield counter_family("streamspine_records_consumed", "Records read, per topic.", "topic", received)
        yield counter_family(
            "streamspine_records_produced", "Records sent, per topic (changelogs and dead letters included).", "topic", sent
        )
        dead = {topic[: -len(DLQ_SUFFIX)]: count for topic, count in sent.items() if topic.endswith(DLQ_SUFFIX)}
        yield counter_family(
            "streamspine_records_dead_lettered", "Records refused and sent to <topic>.dlq, per source topic.", "topic", dead
        )
        yield from self.consumer_offsets(monitor)
        yield from self.batches()
        yield CounterMetricFamily("streamspine_rebalances", "Rebalances this worker took part in.", value=monitor.rebalances)
        for job_gauge in _job_gauges:
            yield self.job_family(job_gauge)

    def consumer_offsets(self, monitor) -> Iterator:
        committed, end = monitor.tp_committed_offsets, monitor.tp_end_offsets
        lag = GaugeMetricFamily(
            "streamspine_consumer_lag", "Records between the committed offset and the end, per partition.", labels=["topic", "partition"]
        )
        committed_family = GaugeMetricFamily(
            "streamspine_consumer_committed_offset", "Last committed offset.", labels=["topic", "partition"]
        )
        assigned = app.consumer.assignment() if app.consumer is not None else set()
        for tp in sorted(assigned, key=lambda tp: (tp.topic, tp.partition)):
            labels = [tp.topic, str(tp.partition)]
            if tp in committed:
                committed_family.add_metric(labels, committed[tp])
            if tp in end:
                lag.add_metric(labels, max(0, end[tp] - committed.get(tp, 0)))
        yield lag
        yield committed_family

    def batches(self) -> Iterator:
        applied = SummaryMetricFamily(
            "streamspine_batch_apply_seconds", "Time to apply a batch (retries included), per job step.", labels=["step"]
        )
        retries = CounterMetricFamily("streamspine_retries", "Retries of a failed batch or sink write, per job step.", labels=["step"])
        for step, stats in sorted(apply_stats.items()):
            applied.add_metric([step], count_value=stats.batches, sum_value=stats.seconds)
            retries.add_metric([step], stats.retries)
        yield applied
        yield retries

    def job_family(self, job_gauge: JobGauge) -> GaugeMetricFamily:
        family = GaugeMetricFamily(job_gauge.name, job_gauge.documentation, labels=list(job_gauge.labels))
        try:
            samples = job_gauge.read()
        except Exception:  # noqa: BLE001 - one job's gauge must not take the page down
            log.exception("metric %s could not be read", job_gauge.name)
            return family
        for labels, value in sorted(samples.items()):
            family.add_metric(list(labels), value)
        return family


# The classic text format (all our names are plain), which every Prometheus version reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
registry = CollectorRegistry(auto_describe=False)
registry.register(WorkerCollector())


@app.page("/metrics")
async def prometheus_metrics(view: web.View, request: web.Request) -> web.Response:
    """Prometheus text exposition of this worker (scrape every worker)."""
    return view.bytes(generate_latest(registry), headers={"Content-Type": CONTENT_TYPE})
