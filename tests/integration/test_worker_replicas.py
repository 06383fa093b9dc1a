"""Real worker processes against the local broker: health, readiness and scaling by replicas."""
from __future__ import annotations

from tests.support.kafka import produce_sync
from tests.support.workers import wait_for

SERVICES = [f"svc-{i}" for i in range(16)]
T0 = 1732412300.0


def test_a_worker_reports_health_and_readiness(kafka_broker, start_workers):
    (worker,) = start_workers(kafka_broker, 1)

    status, health = worker.get("/health/")
    assert status == 200 and health["status"] == "ok"
    assert health["worker"] == worker.url
    status, ready = worker.get("/ready/")
    assert (status, ready["status"]) == (200, "ready")


def test_two_workers_split_the_partitions_and_each_answers_for_every_key(isolated_broker, start_workers):
    first, second = start_workers(isolated_broker, 2)
    produce_sync(
        isolated_broker.bootstrap,
        "metrics",
        [(service, {"service": service, "instance": f"{service}-1", "metric": "cpu", "value": index / 100, "ts": T0 + index})
         for index, service in enumerate(SERVICES)],
    )

    def every_service_known():
        return all(first.get(f"/metrics/services/{service}/")[0] == 200 for service in SERVICES)

    wait_for(every_service_known, timeout=60, message="all services recorded")

    owners = {service: first.get(f"/router/metrics_latest/{service}/")[1] for service in SERVICES}
    assert set(owners.values()) == {first.url, second.url}, "both replicas must own some keys"

    for index, service in enumerate(SERVICES):
        expected = {"value": index / 100, "ts": T0 + index}
        for worker in (first, second):
            status, page = worker.get(f"/metrics/services/{service}/")
            assert status == 200, (worker.url, service, page)
            assert page["metrics"]["cpu"][f"{service}-1"] == expected
            status, value = worker.get(f"/table/metrics_latest/{service}/")
            assert status == 200
            assert value["metrics"]["cpu"][f"{service}-1"] == expected


def test_unknown_key_is_a_json_404_from_any_worker(kafka_broker, start_workers):
    (worker,) = start_workers(kafka_broker, 1)

    status, body = worker.get("/metrics/services/no-such-service/")

    assert status == 404
    assert body["error"] == "unknown service"


def test_routed_pages_work_before_any_record_was_written(isolated_broker, start_workers):
    first, second = start_workers(isolated_broker, 2)

    for worker in (first, second):
        for service in SERVICES[:4]:
            assert worker.get(f"/table/metrics_latest/{service}/") == (200, {})  # the table's default
            status, body = worker.get(f"/metrics/services/{service}/")
            assert (status, body["error"]) == (404, "unknown service")
