"""Change data capture: PostgreSQL's transaction log -> Debezium-format topics -> replica, Redis, Elasticsearch.

- ``capture``: logical decoding -> Debezium change events, one capture per slot (advisory lock);
  runs in the workers or alone (``python -m agents.cdc.capture``).
- ``sinks``: ReplicaSink, RedisSink, ElasticsearchSink, each LSN-guarded.
- ``apply``: the decode step and the apply agent (change topics -> sinks -> state tables).
- ``views``: /cdc/status/, /cdc/rows/{schema}.{table}/{pk}/ and the Prometheus gauges.

Importing these modules connects nowhere and builds nothing that does: ``register(app, settings)``
(called by app/__init__.py) builds the sinks and the capture and declares the agent and the task.
docs/cdc.md states the guarantees.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import faust

if TYPE_CHECKING:  # importing app.settings imports the App, which calls register(): define it first
    from app.settings import Settings


def register(app: faust.App, settings: Settings) -> None:
    """Build the sinks of the settings, declare the apply agent on the change topics of CDC_TABLES,
    and, with CDC_SOURCE_DSN and CDC_CAPTURE=worker, the capture task every worker runs."""
    from agents.cdc import apply, capture, sinks, views

    apply.SINKS = sinks.configured_sinks(settings)
    change_topics = capture.change_topics_of(settings)
    if change_topics is not None:
        apply.declare_apply_agent(app, change_topics)
    if settings.cdc_capture == "worker":
        views.capture = capture.capture_of(settings, change_topics)
        if views.capture is not None:
            capture.capture_in_worker(app, views.capture)


# The App first (as `faust -A app` loads it; it calls register()), then the modules it needs. Run
# as `python -m agents.cdc.capture`, runpy warns that this import loaded the module it is about to
# run: capture.py's __main__ runs the imported module's main(), so there is one Capture, not two.
warnings.filterwarnings("ignore", message=r"'agents\.cdc\.capture' found in sys\.modules", category=RuntimeWarning)
import app as _app_package  # noqa: E402,F401
from agents.cdc.apply import apply_change_stream, change_of_record, decode_change  # noqa: E402
from agents.cdc.capture import Capture, cdc_topic_name  # noqa: E402
from agents.cdc.sinks import (  # noqa: E402
    ElasticsearchSink,
    RedisSink,
    ReplicaSink,
    TransientSinkError,
    apply_to_sink,
    configured_sinks,
    redis_write,
    replica_refuses,
    replica_value,
)
from agents.cdc.views import key_from_path, merge_table_stats  # noqa: E402

__all__ = [
    "Capture",
    "ElasticsearchSink",
    "RedisSink",
    "ReplicaSink",
    "TransientSinkError",
    "apply_change_stream",
    "apply_to_sink",
    "cdc_topic_name",
    "change_of_record",
    "configured_sinks",
    "decode_change",
    "key_from_path",
    "merge_table_stats",
    "redis_write",
    "register",
    "replica_refuses",
    "replica_value",
]
