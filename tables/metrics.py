"""Monitoring state. Every table is co-partitioned with the ``metrics`` topic (key: service name)
and written only under an event of that partition, so one worker owns all of a service's state."""

from __future__ import annotations

from app import app, settings
from models.alerts import Alert
from models.metric_stats import WindowAggregate

# Raw UTF-8 keys, like the topic keys: a str key type would be JSON-encoded and hash to another
# partition than the source record, so @app.table_route would ask the wrong worker.
latest_samples = app.Table(
    "metrics_latest",
    key_type=bytes,
    default=dict,
    partitions=settings.topic_partitions,
    help="Per service: the latest value of each metric per instance, and the sample count.",
)

metric_panes = app.Table(
    "metric_panes",
    key_type=bytes,
    value_type=WindowAggregate,
    partitions=settings.topic_partitions,
    help="Per series (service, instance, metric) and pane start: count, sum, min, max and a DDSketch. "
    "A hopping window of METRIC_WINDOW seconds every METRIC_WINDOW_STEP is the merge of its panes.",
)

metric_series = app.Table(
    "metric_series",
    key_type=bytes,
    default=dict,
    partitions=settings.topic_partitions,
    help="Per series: its pane starts (expired after METRIC_WINDOW_EXPIRES), latest event time "
    "and the EWMA baselines of its anomaly rules.",
)

alert_states = app.Table(
    "alert_states",
    key_type=bytes,
    value_type=Alert,
    partitions=settings.topic_partitions,
    help="Per alert fingerprint (rule + service + instance): the pending or firing alert.",
)
