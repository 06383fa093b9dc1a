"""GET /metrics: Prometheus' text format, checked by Debian's promtool and read back."""
from __future__ import annotations

import shutil
import subprocess
import urllib.request
from typing import Dict, Tuple

from prometheus_client.parser import text_string_to_metric_families

from tests.support.kafka import produce_sync
from tests.support.workers import wait_for

T0 = 1732412300.0


def scrape(url: str) -> Tuple[str, str]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        return response.headers["Content-Type"], response.read().decode()


def samples(text: str) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def test_metrics_page_is_valid_exposition_with_consumed_dead_lettered_and_lag(isolated_broker, start_workers):
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: `make test` installs Debian's prometheus package"
    (worker,) = start_workers(isolated_broker, 1)
    good = [("cart", {"metric": "cpu", "instance": "cart-1", "value": 0.1 * i, "ts": T0 + i}) for i in range(5)]
    produce_sync(isolated_broker.bootstrap, "metrics", [*good, ("cart", b"{not json")])

    def dead_lettered():
        _, text = scrape(worker.url)
        return samples(text).get(("streamspine_records_dead_lettered_total", (("topic", "metrics"),)), 0) >= 1 and text

    text = wait_for(dead_lettered, timeout=60, message="a dead letter counted on /metrics")
    content_type, _ = scrape(worker.url)
    assert content_type.startswith("text/plain; version=0.0.4")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr

    values = samples(text)
    assert values[("streamspine_records_consumed_total", (("topic", "metrics"),))] >= 6
    assert values[("streamspine_records_dead_lettered_total", (("topic", "metrics"),))] == 1
    assert values[("streamspine_cdc_capturing", ())] == 0  # no CDC_SOURCE_DSN on this worker
    for job_family in ("streamspine_alert", "streamspine_cdc_lag_seconds", "streamspine_migration_count"):
        assert f"# TYPE {job_family} gauge" in text
    # the memory bounds of docs/memory.md, from the same registry as the jobs' gauges
    assert values[("streamspine_rocksdb_databases", ())] >= 1
    assert 0 < values[("streamspine_rocksdb_block_cache_bytes", ())] <= 128 * 1024 * 1024
    assert values[("streamspine_producer_buffer_records", ())] >= 0
    lags = {labels: value for (name, labels), value in values.items() if name == "streamspine_consumer_lag"}
    assert any(dict(labels)["topic"] == "metrics" for labels in lags) and all(value >= 0 for value in lags.values())
