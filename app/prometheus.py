"""``GET /metrics``: the worker in Prometheus' text exposition format.

Everything is read when Prometheus scrapes, from what Faust's monitor and the runtime already
count, so exposing metrics adds no work per record; plus every gauge of app/gauges.py (the jobs'
own, and the sizes of the worker's bounded buffers and stores).
"""

from __future__ import annotations

from typing import Iterator, Mapping

from faust import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from app import app
from app.dead_letters import DLQ_SUFFIX
from app.gauges import Gauge, read_samples, registered
from app.retry import apply_stats


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
        for registered_gauge in registered():
            yield self.gauge_family(registered_gauge)

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

    def gauge_family(self, registered_gauge: Gauge) -> GaugeMetricFamily:
        family = GaugeMetricFamily(registered_gauge.name, registered_gauge.documentation, labels=list(registered_gauge.labels))
        for labels, value in sorted(read_samples(registered_gauge).items()):
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
