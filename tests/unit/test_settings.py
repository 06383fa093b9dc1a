"""Settings are read from the environment and a bad value stops the worker with one clear line."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from app.redaction import RedactingLogRecord, remember_secrets
from app.settings import Settings, describe_error
from pydantic import ValidationError
from tests.support.ports import free_port
from tests.support.workers import FAUST, REPO_ROOT, environment_with


def settings_from(monkeypatch, **variables: str) -> Settings:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return Settings()


def test_defaults_work_against_a_local_broker(monkeypatch):
    for name in ("KAFKA_BROKER", "TOPIC_PARTITIONS", "STORE", "WEB_PORT", "PROCESSING_GUARANTEE"):
        monkeypatch.delenv(name, raising=False)

    settings = Settings()

    assert settings.kafka_broker == "kafka://localhost:9092"
    assert settings.topic_partitions == 8
    assert settings.store == "rocksdb://"
    assert settings.web_port == 6066
    assert settings.processing_guarantee == "at_least_once"
    assert settings.broker_session_timeout <= 10 and settings.broker_rebalance_timeout <= 10


def test_canonical_url_defaults_to_web_host_and_port(monkeypatch):
    settings = settings_from(monkeypatch, WEB_HOST="10.1.2.3", WEB_PORT="7000")
    assert settings.web_url == "http://10.1.2.3:7000"


@pytest.mark.parametrize(
    "variable, value",
    [
        ("KAFKA_BROKER", "localhost:9092"),
        ("TOPIC_PARTITIONS", "zero"),
        ("TOPIC_PARTITIONS", "0"),
        ("WEB_PORT", "70000"),
        ("STORE", "redis://"),
        ("PROCESSING_GUARANTEE", "maybe_once"),
        ("BROKER_SESSION_TIMEOUT", "-1"),
        ("ADMIN_TOKEN", "short"),
        ("ELASTICSEARCH_URL", "localhost:9200"),
        ("REDIS_URL", "http://localhost:6379"),
        ("REPLICA_DSN", "mysql://x"),
        ("GC_THRESHOLDS", "50000,20"),
        ("GC_THRESHOLDS", "0,10,10"),
    ],
)
def test_an_invalid_value_is_refused_naming_the_variable(monkeypatch, variable, value):
    with pytest.raises(ValidationError) as raised:
        settings_from(monkeypatch, **{variable: value})

    line = describe_error(raised.value)
    assert line.startswith("invalid configuration: ")
    assert (f"{variable}=<hidden>" if variable == "ADMIN_TOKEN" else f"{variable}={value!r}") in line
    assert "\n" not in line


def import_app_with(**variables: str) -> subprocess.CompletedProcess:
    """Import the app in a fresh interpreter, as ``faust -A app worker`` does at start."""
    return subprocess.run(
        [sys.executable, "-c", "import app"], cwd=REPO_ROOT, env=environment_with(**variables),
        capture_output=True, text=True, timeout=60,
    )


def start_worker_with(tmp_path, **variables: str) -> subprocess.CompletedProcess:
    """Start ``faust -A app worker`` in a fresh process (it stops at once when its start fails)."""
    defaults = {"STORE": "memory://", "DATA_DIR": str(tmp_path / "data"), "WEB_PORT": str(free_port())}
    return subprocess.run(
        [str(FAUST), "-A", "app", "worker", "-l", "info"], cwd=REPO_ROOT, env=environment_with(**{**defaults, **variables}),
        capture_output=True, text=True, timeout=60,
    )


GC_STATE = "import app, gc; print(*gc.get_threshold(), gc.get_freeze_count() > 0)"


def gc_state_after_importing_app(**variables: str) -> str:
    """GC thresholds and whether objects were frozen, once a fresh interpreter imported the app."""
    result = subprocess.run(
        [sys.executable, "-c", GC_STATE], cwd=REPO_ROOT, env=environment_with(**variables),
        capture_output=True, text=True, timeout=60, check=True,
    )
    return result.stdout.strip()


def test_the_worker_applies_the_gc_settings_once_its_modules_are_imported():
    assert gc_state_after_importing_app() == "50000 20 100 True"
    assert gc_state_after_importing_app(GC_THRESHOLDS="1234,5,6", GC_FREEZE="false") == "1234 5 6 False"
    pythons_own = subprocess.run([sys.executable, "-c", "import gc; print(*gc.get_threshold())"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    assert gc_state_after_importing_app(GC_THRESHOLDS="default") == f"{pythons_own} True"


def test_a_worker_with_a_bad_variable_stops_at_start_with_one_line():
    result = import_app_with(TOPIC_PARTITIONS="many")

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "invalid configuration: TOPIC_PARTITIONS='many': Input should be a valid integer, unable to parse string as an integer"
    ]


def test_a_worker_with_an_invalid_rules_file_stops_with_the_line_and_reason(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: HighCPU\n    metric: cpu\n    aggregate: mean\n    window: 60s\n    op: '=>'\n    threshold: 0.9\n")

    result = start_worker_with(tmp_path, ALERT_RULES=str(rules))

    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("invalid configuration: ALERT_RULES: alert rules file")
    assert "line 6" in line and "op must be one of" in line


def test_a_rule_window_that_is_not_whole_panes_stops_the_worker(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {name: Fast, metric: cpu, aggregate: mean, window: 5s, op: '>', threshold: 0.9}\n")

    result = start_worker_with(tmp_path, ALERT_RULES=str(rules))

    assert result.returncode == 2
    assert "rule 'Fast': window 5s must be a whole number of METRIC_WINDOW_STEP (10s)" in result.stderr


@pytest.mark.parametrize(
    "variable, value, secret",
    [
        ("REPLICA_DSN", "mysql://replicator:hunter2-secret@db:5432/app", "hunter2-secret"),
        ("REDIS_URL", "http://:s3cr3t-pass@cache:6379/0", "s3cr3t-pass"),
        ("ADMIN_TOKEN", "short", "short"),
        ("ALERT_WEBHOOK_URL", "hooks.example/x?token=abcd1234efgh", "abcd1234efgh"),
    ],
)
def test_a_refused_value_is_named_without_its_secret(monkeypatch, variable, value, secret):
    with pytest.raises(ValidationError) as raised:
        settings_from(monkeypatch, **{variable: value})

    line = describe_error(raised.value)
    assert variable in line and secret not in line


def test_log_lines_never_show_passwords_tokens_or_the_admin_token(caplog):
    remember_secrets(["the-admin-token-value"])
    logging.setLogRecordFactory(RedactingLogRecord)
    try:
        log = logging.getLogger("test.redaction")
        with caplog.at_level(logging.INFO, logger="test.redaction"):
            log.info("connecting to %s", "postgresql://cdc:p%40ss-word@db:5432/app")
            log.info("header Authorization: Bearer abc.def-ghi sent")
            log.info("token %s refused", "the-admin-token-value")
            log.info("libpq dsn host=db password=topsecret user=x")
    finally:
        logging.setLogRecordFactory(logging.LogRecord)
    text = "\n".join(record.getMessage() for record in caplog.records)
    for secret in ("p%40ss-word", "abc.def-ghi", "the-admin-token-value", "topsecret"):
        assert secret not in text
    assert "postgresql://cdc:***@db:5432/app" in text


def test_the_worker_masks_the_passwords_of_its_own_settings():
    assert Settings(replica_dsn="postgresql://u:pa%2Fss@h/db", admin_token="0123456789").secret_values == ["0123456789", "pa/ss"]


def test_docs_configuration_lists_every_variable_as_the_settings_class_defines_it():
    from app.settings import configuration_markdown

    documented = (REPO_ROOT / "docs" / "configuration.md").read_text()
    assert documented == configuration_markdown(), "docs/configuration.md is stale: run `make docs`"
    from app.memory import MemorySettings

    assert all(f"`{name.upper()}`" in documented for name in [*Settings.model_fields, *MemorySettings.model_fields])
