"""Monitoring: metrics -> metrics_latest (per service) -> /metrics/services/{service}/."""
from __future__ import annotations

import json
import operator
from typing import Any, Dict, Iterable, List

from faust import web

from app import app, settings
from app.aggregation import BATCH_MAX, BATCH_WITHIN, fold_deltas, write_deltas
from app.dead_letters import dead_letter
from models.metrics import InvalidRecord, MetricSample, parse_samples
from tables.metrics import latest_samples

metrics_topic = app.topic(
    "metrics",
    key_type=str,
    value_type=bytes,
    value_serializer="raw",
    partitions=settings.topic_partitions,
    internal=True,  # the worker creates it with TOPIC_PARTITIONS when it does not exist yet
)


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


async def forward_keyed_by_service(samples: Iterable[MetricSample]) -> None:
    """Re-key samples that arrived without a key, so each service's state lives in one partition."""
    by_service: Dict[str, List[Dict[str, Any]]] = {}
    for sample in samples:
        by_service.setdefault(sample.service, []).append(sample.asdict())
    for service, batch in by_service.items():
        await metrics_topic.send(key=service, value=json.dumps(batch).encode())


@app.agent(metrics_topic)
async def record_samples(stream) -> None:
    """Validate each record (one sample or an array) and keep the latest values per service.

    One table write per service per batch (app/aggregation.py), not one per record.
    """
    async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN):
        keyed_samples = []
        for event in events:
            try:
                samples = parse_samples(event.value, event.key)
            except InvalidRecord as error:
                await dead_letter(str(error), event)
                continue
            if event.key is None:
                await forward_keyed_by_service(samples)
            else:
                keyed_samples.append((event, [(event.key, samples)]))
        pending = fold_deltas(keyed_samples, combine=operator.add)
        write_deltas(stream, latest_samples, pending, apply=merge_latest)


@app.page("/metrics/services/{service}/")
@app.table_route(table=latest_samples, match_info="service")
async def service_metrics(view: web.View, request: web.Request, service: str) -> web.Response:
    """Latest value of every metric of one service, answered by the worker that owns it."""
    if service not in latest_samples:
        raise view.NotFound("unknown service", service=service)
    return view.json({"service": service, **latest_samples[service]})
