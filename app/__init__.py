"""The streamspine Faust application: ``faust -A app worker -l info``."""
from __future__ import annotations

import faust

from app.settings import Settings, load_settings
from app.transport import consumer_broker_urls

settings: Settings = load_settings()

app = faust.App(
    settings.app_id,
    broker=settings.kafka_broker,
    # Consume through app/transport.py (no per-record stall); produce with Faust's stock driver.
    broker_consumer=consumer_broker_urls(settings.kafka_broker) if settings.fast_consumer else settings.kafka_broker,
    broker_producer=settings.kafka_broker,
    # Deeper fetches and buffers once the per-record cost is low (measured in bench/README.md).
    broker_max_poll_records=4000,
    consumer_max_fetch_size=4 * 1024 * 1024,
    stream_buffer_maxsize=32768,
    producer_linger=0.01,
    store=settings.store,
    datadir=str(settings.data_dir),
    topic_partitions=settings.topic_partitions,
    processing_guarantee=settings.processing_guarantee,
    broker_session_timeout=settings.broker_session_timeout,
    broker_rebalance_timeout=settings.broker_rebalance_timeout,
    broker_heartbeat_interval=settings.broker_heartbeat_interval,
    web_host=settings.web_host,
    web_port=settings.web_port,
    canonical_url=settings.web_url,
    key_serializer="raw",
    value_serializer="json",
    # Topics are created by the worker with the configured partition count;
    # the local broker and a development Kafka both accept one replica.
    topic_replication_factor=1,
)

# Register the platform pages and every job's agents, tables and pages.
from app import web  # noqa: E402,F401
from agents import dead_letters, metrics  # noqa: E402,F401

__all__ = ["app", "settings"]
