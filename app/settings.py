"""Worker settings: read once from environment variables, validated at start (12-factor)."""

from __future__ import annotations

import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple
from urllib.parse import unquote, urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.redaction import redact

KAFKA_SCHEMES = ("kafka://", "aiokafka://")
SECRET_FIELDS = ("admin_token",)  # never shown; URLs and DSNs are shown with their passwords masked
STORE_SCHEMES = ("rocksdb://", "memory://")


class Settings(BaseSettings):
    """Every knob of the worker; the environment variable is the field name in upper case."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, env_ignore_empty=True)

    # --- platform -----------------------------------------------------------------------------
    app_id: str = Field(
        "streamspine",
        min_length=1,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Faust app id: the consumer group and the prefix of changelog topics.",
    )
    kafka_broker: str = Field(
        "kafka://localhost:9092", description="Bootstrap servers, `kafka://host:port[,host:port]` (`;` separates URLs)."
    )
    topic_partitions: int = Field(8, ge=1, le=1024, description="Partitions of the topics and tables the worker creates.")
    store: str = Field("rocksdb://", description="Table store: `rocksdb://` or `memory://`.")
    data_dir: Path = Field(Path("./data"), description="Where RocksDB tables live; one per worker on the same host.")
    web_host: str = Field("127.0.0.1", description="Address the web server binds to.")
    web_port: int = Field(6066, ge=1, le=65535, description="Port of the web server.")
    canonical_url: Optional[str] = Field(None, description="URL other workers use to reach this one; default `http://WEB_HOST:WEB_PORT`.")
    broker_session_timeout: float = Field(6.0, gt=0, le=300, description="Seconds; short so a dead worker's partitions move quickly.")
    broker_rebalance_timeout: float = Field(6.0, gt=0, le=300, description="Seconds a rebalance may take.")
    broker_heartbeat_interval: float = Field(1.0, gt=0, le=60, description="Seconds between consumer heartbeats.")
    fast_consumer: bool = Field(True, description="Consume and produce through app/transport.py; `false` uses Faust's stock consumer.")
    consumer_fetch_wait_ms: int = Field(
        500,
        ge=1,
        le=30000,
        description="Longest wait of a consumer fetch for new data (Kafka's default). It only paces the polling of "
        "idle partitions; against the local broker, which holds every fetch for the full wait, `make run` "
        "and the tests use 20.",
    )
    producer_max_batch_size: int = Field(16384, ge=1, le=64 * 1024 * 1024, description="Bytes per producer batch.")
    gc_thresholds: str = Field(
        "50000,20,100",
        description="Python's cyclic GC thresholds `gen0,gen1,gen2`, or `default` (700,10,10): fewer, cheaper "
        "collections for a worker that allocates a few objects per record.",
    )
    gc_freeze: bool = Field(True, description="After the imports, move every live object into the GC's permanent generation.")
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once", description="`exactly_once` needs Kafka transactions (the local broker has none)."
    )
    admin_token: Optional[str] = Field(
        None,
        min_length=8,
        description="Bearer token of the state-changing endpoints (at least 8 characters); unset disables them. Never logged.",
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field("info", description="Worker log level.")
    # --- monitoring & alerting ------------------------------------------------------------------
    alert_rules: Path = Field(Path(__file__).with_name("alert_rules.yaml"), description="The alert rules file.")
    alert_webhook_url: Optional[str] = Field(None, description="Alertmanager-format webhook receiver.")
    metric_window: float = Field(60.0, gt=0, le=86400, description="Seconds of the window the metric pages summarize.")
    metric_window_step: float = Field(10.0, gt=0, le=3600, description="Seconds per pane; windows are whole panes.")
    metric_window_expires: float = Field(3600.0, gt=0, le=7 * 86400, description="Seconds a pane is kept.")
    alert_absent_after: Optional[float] = Field(
        None,
        gt=0,
        le=7 * 86400,
        description="Seconds without a sample after which a pending/firing alert of that series resolves "
        "(Prometheus: an absent series ends its alert); unset: the rule's window plus one METRIC_WINDOW_STEP.",
    )
    alert_repeat_interval: float = Field(
        14400.0,
        gt=0,
        le=7 * 86400,
        description="Seconds between re-sends of a still firing alert to the webhook (Alertmanager's repeat_interval).",
    )
    silence_retention: float = Field(
        432000.0,
        gt=0,
        le=365 * 86400,
        description="Seconds an expired silence is still listed before every worker forgets it (Alertmanager's data.retention).",
    )
    silences_max: int = Field(
        10000,
        ge=1,
        le=1_000_000,
        description="Silences kept at most; past it the one that ends first is forgotten and new ones are refused.",
    )
    metric_latest_instances: int = Field(
        1000, ge=1, le=1_000_000, description="Instances per service and metric in the latest-value view (the most recently reporting)."
    )
    # --- centralized logging --------------------------------------------------------------------
    elasticsearch_url: Optional[str] = Field(
        None, description="Elasticsearch for log lines and CDC rows; without it the log statistics still run."
    )
    elasticsearch_max_backoff: float = Field(30.0, gt=0, le=3600, description="Seconds; the longest wait between retries of a write.")
    log_index_pattern: str = Field(
        "logs-{service}-{date:%Y.%m.%d}",
        description="Index of a line: `{service}` (lower-cased, unsafe characters replaced) and `{date:<strftime>}` (UTC).",
    )
    log_batch_max: int = Field(5000, ge=1, le=30000, description="Records per bulk batch.")
    log_batch_within: float = Field(
        0.2,
        gt=0,
        le=60,
        description="Seconds a record waits for its batch when the worker reads through Faust's own stream (FAST_CONSUMER=false); otherwise a batch is what was fetched when the agent is ready for it.",
    )
    log_bulk_lines: int = Field(2000, ge=1, le=100_000, description="Lines per bulk write (whole records).")
    log_bulk_in_flight: int = Field(4, ge=1, le=16, description="Bulk writes in progress at once.")
    log_stats_window: int = Field(60, ge=1, le=86400, description="Whole seconds per statistics window.")
    log_recent_limit: int = Field(200, ge=1, le=10000, description="Newest lines kept per service (and at most 256 KiB of them).")
    # --- zero-downtime migration ----------------------------------------------------------------
    migration_compare_window: float = Field(
        30.0, gt=0, le=86400, description="Seconds a result waits for the other system's before it counts as missing."
    )
    migration_reconcile_grace: float = Field(
        60.0, gt=0, le=7 * 86400, description="Seconds a V1 event id may wait for its V2 copy before it is reported missing."
    )
    migration_ignore_fields: str = Field(
        "source_version,event_id,processed_at", description="Result fields (V2 names) left out of the comparison."
    )
    migration_tolerance: float = Field(0.005, ge=0, description="Numeric difference still counted as equal.")
    migration_samples: int = Field(20, ge=1, le=1000, description="Mismatch samples and missing ids kept for the status.")
    # --- realtime recommendations ---------------------------------------------------------------
    recs_session_timeout: float = Field(1800.0, gt=0, le=7 * 86400, description="Seconds of inactivity (event time) that end a session.")
    recs_neighbours: int = Field(50, ge=1, le=1000, description="Co-occurring items kept per item.")
    recs_refit_interval: float = Field(
        60.0, gt=0, le=86400, description="Seconds between the leader's model refits (only when the item tables changed)."
    )
    recs_embedding_dims: int = Field(32, ge=2, le=256, description="TruncatedSVD components of the item model.")
    recs_catalogue_max_items: int = Field(
        100_000,
        ge=5_000,
        le=10_000_000,
        description=(
            "Items (stats and metadata) each worker's recommendations catalogue holds; past 10 % more, the lightest are dropped,"
            " items with metadata only first. At least 5,000, so the item model's 3,000 items stay in it."
        ),
    )
    # --- change data capture --------------------------------------------------------------------
    cdc_source_dsn: Optional[str] = Field(
        None, description="`postgresql://` URL of the source (wal_level=logical, a REPLICATION role); enables capture."
    )
    cdc_capture: Literal["worker", "off"] = Field(
        "worker",
        description="Where CDC capture runs: `worker` (every worker competes for the capture lock; the holder captures) "
        "or `off` (workers only apply; run `python -m agents.cdc.capture`, the Procfile's `capture:` process).",
    )
    cdc_tables: str = Field("", description="Comma-separated `schema.table` to capture and apply; each needs a primary key.")
    cdc_slot: str = Field("streamspine_cdc", pattern=r"^[a-z0-9_]{1,63}$", description="Replication slot name.")
    cdc_publication: str = Field("streamspine_cdc", pattern=r"^[a-z_][a-z0-9_]{0,62}$", description="Publication name.")
    cdc_topic_prefix: str = Field(
        "cdc", pattern=r"^[A-Za-z0-9_-]+$", description="Prefix of the change topics (a Debezium connector's `topic.prefix`)."
    )
    cdc_max_changes: int = Field(5000, ge=1, le=1_000_000, description="Most messages of the slot's stream published as one batch.")
    cdc_producer_batch_size: int = Field(65536, ge=1, le=64 * 1024 * 1024, description="Bytes per produce batch of the capture.")
    replica_dsn: Optional[str] = Field(None, description="`postgresql://` URL of the replica database.")
    redis_url: Optional[str] = Field(None, description="`redis://` URL; CDC row hashes.")

    @field_validator("kafka_broker")
    @classmethod
    def _broker_urls_have_kafka_scheme(cls, value: str) -> str:
        urls = [url.strip() for url in value.split(";") if url.strip()]
        if not urls:
            raise ValueError("must name at least one broker")
        for url in urls:
            hosts = url.split("://", 1)[-1]
            if not url.startswith(KAFKA_SCHEMES) or not hosts:
                raise ValueError(f"{url!r} must look like kafka://host:port[,host:port]")
        return value

    @field_validator("gc_thresholds")
    @classmethod
    def _gc_thresholds_are_three_counts(cls, value: str) -> str:
        if value.strip().lower() == "default":
            return "default"
        parts = [part.strip() for part in value.split(",")]
        if len(parts) != 3 or not all(part.isdigit() and int(part) > 0 for part in parts):
            raise ValueError("must be three positive integers like 50000,20,100, or 'default'")
        return ",".join(parts)

    @property
    def gc_threshold_counts(self) -> Optional[Tuple[int, int, int]]:
        """The GC_THRESHOLDS counts, or None for Python's defaults."""
        if self.gc_thresholds == "default":
            return None
        gen0, gen1, gen2 = (int(part) for part in self.gc_thresholds.split(","))
        return gen0, gen1, gen2

    @field_validator("store")
    @classmethod
    def _store_is_supported(cls, value: str) -> str:
        if not value.startswith(STORE_SCHEMES):
            raise ValueError(f"must start with one of {', '.join(STORE_SCHEMES)}")
        return value

    @field_validator("elasticsearch_url", "canonical_url", "alert_webhook_url")
    @classmethod
    def _is_http_url(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("log_index_pattern")
    @classmethod
    def _index_pattern_formats(cls, value: str) -> str:
        try:
            name = value.format(service="svc", date=datetime(2024, 1, 31, tzinfo=timezone.utc))
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"may use only {{service}} and {{date:<strftime>}}: {error}") from None
        if name != name.lower() or any(char in name for char in ' \\/*?"<>|,#:'):
            raise ValueError(f'gives {name!r}, not a valid Elasticsearch index name (lower case, no spaces or \\/*?"<>|,#:)')
        return value

    @field_validator("redis_url")
    @classmethod
    def _is_redis_url(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("replica_dsn", "cdc_source_dsn")
    @classmethod
    def _is_postgres_dsn(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// connection URL")
        return value

    @field_validator("cdc_tables")
    @classmethod
    def _names_schema_tables(cls, value: str) -> str:
        for name in (part.strip() for part in value.split(",") if part.strip()):
            if not re.fullmatch(r"[a-z_][a-z0-9_$]*\.[a-z_][a-z0-9_$]*", name):
                raise ValueError(f"{name!r} must be schema.table (lower-case, unquoted PostgreSQL names)")
        return value

    @property
    def cdc_table_names(self) -> List[str]:
        """CDC_TABLES as a list of ``schema.table``."""
        return [part.strip() for part in self.cdc_tables.split(",") if part.strip()]

    @model_validator(mode="after")
    def _window_is_whole_steps(self) -> "Settings":
        if self.metric_window % self.metric_window_step or self.metric_window_expires < self.metric_window:
            raise ValueError("METRIC_WINDOW must be a whole number of METRIC_WINDOW_STEP and at most METRIC_WINDOW_EXPIRES")
        return self

    @property
    def secret_values(self) -> List[str]:
        """Values that must never appear in a log line: the admin token and every URL's password."""
        values = [self.admin_token or ""]
        for url in (
            self.kafka_broker,
            self.elasticsearch_url,
            self.redis_url,
            self.replica_dsn,
            self.cdc_source_dsn,
            self.alert_webhook_url,
        ):
            values.append(url_password(url) if url else "")
        return [value for value in values if len(value) >= 4]

    @property
    def web_url(self) -> str:
        """The URL other workers use to reach this one (table routing)."""
        return self.canonical_url or f"http://{self.web_host}:{self.web_port}"


def url_password(url: str) -> str:
    """The password of ``scheme://user:password@host``, or "" (also for a URL that does not parse)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return ""
    return unquote(password) if password else ""


def bootstrap_servers(kafka_broker: str) -> List[str]:
    """``kafka://h1:p,h2:p`` -> ``["h1:p", "h2:p"]`` for a plain Kafka client."""
    return [host.strip() for url in kafka_broker.split(";") if url.strip() for host in url.split("://", 1)[1].split(",")]


def consumer_broker_urls(kafka_broker: str) -> str:
    """``kafka://h:p;kafka://h2:p`` -> the same brokers under app/transport.py's URL scheme."""
    return ";".join("streamspine://" + url.strip().split("://", 1)[1] for url in kafka_broker.split(";") if url.strip())


def store_url(store: str) -> str:
    """``rocksdb://`` -> ``streamspine-rocksdb://`` (app/stores.py: no full GC per table per rebalance)."""
    return "streamspine-rocksdb://" + store.split("://", 1)[1] if store.startswith("rocksdb://") else store


def faust_settings(settings: Settings) -> Dict[str, Any]:
    """The ``faust.App`` settings of a worker (bench/ builds its apps from the same)."""
    from app.memory import memory_settings  # the memory bounds (docs/memory.md)

    return dict(
        broker=settings.kafka_broker,
        # Consume and produce through app/transport.py (no per-record stall, true changelog end
        # offsets, a producer buffer that does not stop the stream every 100 changelog records).
        broker_consumer=consumer_broker_urls(settings.kafka_broker) if settings.fast_consumer else settings.kafka_broker,
        broker_producer=consumer_broker_urls(settings.kafka_broker) if settings.fast_consumer else settings.kafka_broker,
        # Deeper fetches and buffers once the per-record cost is low (bench/README.md).
        broker_max_poll_records=4000,
        consumer_max_fetch_size=4 * 1024 * 1024,
        stream_buffer_maxsize=memory_settings.stream_buffer_maxsize,
        producer_linger=0.01,
        producer_max_batch_size=settings.producer_max_batch_size,
        store=store_url(settings.store),
        datadir=str(settings.data_dir),
        topic_partitions=settings.topic_partitions,
        processing_guarantee=settings.processing_guarantee,
        broker_session_timeout=settings.broker_session_timeout,
        broker_rebalance_timeout=settings.broker_rebalance_timeout,
        broker_heartbeat_interval=settings.broker_heartbeat_interval,
        web_host=settings.web_host,
        web_bind=settings.web_host,  # Faust listens on 0.0.0.0 unless told otherwise
        web_port=settings.web_port,
        canonical_url=settings.web_url,
        key_serializer="raw",
        value_serializer="json",
        # Raw bytes and schemaless JSON decoded without Faust's serializer registry (app/transport.py).
        Schema="app.transport:FastSchema",
        # Table writes whose changelog records go to Kafka in batches (app/stores.py).
        Table="app.stores:Table",
        # The worker creates its topics; the local broker and a development Kafka have one replica.
        topic_replication_factor=1,
    )


def describe_error(error: ValidationError) -> str:
    """One line naming each bad variable, its value and why it was refused."""
    problems = []
    for item in error.errors():
        reason = item["msg"].removeprefix("Value error, ")
        if not item["loc"]:
            problems.append(reason)
            continue
        value, field = item.get("input"), str(item["loc"][0])
        if field in SECRET_FIELDS:
            shown = "=<hidden>"
        else:
            shown = "=" + redact(repr(value)) if isinstance(value, (str, int, float)) else ""
        problems.append(f"{field.upper()}{shown}: {redact(reason)}")
    return "invalid configuration: " + "; ".join(problems)


def shown_default(value: Any) -> str:
    """A default as it would be written in the environment (``true``, ``6``, ``0.2``)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def configuration_markdown() -> str:
    """docs/configuration.md: every variable, its default and meaning, from the Settings class."""
    lines = [
        "# Configuration",
        "",
        "Environment variables, read once at start and validated; a bad value stops the worker with one line",
        "naming the variable (secrets masked). An empty variable counts as unset. Generated from",
        "`app/settings.py` by `make docs`; a test fails when they differ.",
        "",
        "| variable | default | meaning |",
        "|---|---|---|",
    ]
    from app.memory import MemorySettings  # the memory bounds (docs/memory.md), read by the store and transport

    for name, field in [*Settings.model_fields.items(), *MemorySettings.model_fields.items()]:
        default = field.default
        if isinstance(default, Path) and default.is_absolute():
            default = default.relative_to(Path(__file__).resolve().parents[1])
        shown = "unset" if default is None else "empty" if default == "" else f"`{shown_default(default)}`"
        lines.append(f"| `{name.upper()}` | {shown} | {field.description or ''} |")
    lines += ["", "`make run` also reads `LOCAL_BROKER_PORT` (default `9092`): the port of the local broker it starts."]
    return "\n".join(lines) + "\n"


def load_settings() -> Settings:
    """Read the environment; on a bad value print one clear line and stop the process."""
    try:
        return Settings()
    except ValidationError as error:
        print(describe_error(error), file=sys.stderr)
        raise SystemExit(2) from None
