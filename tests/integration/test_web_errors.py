"""Every error of the worker's web server is JSON, and a request's own fault is a 4xx."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any, Dict, Optional, Tuple

import pytest

ADMIN_TOKEN = "web-errors-admin-token"


def request(url: str, body: Optional[bytes] = None, method: str = "GET") -> Tuple[int, str, Dict[str, Any], Dict[str, str]]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method=method, headers=headers), timeout=10) as response:
            return response.status, response.headers.get_content_type(), json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get_content_type(), json.loads(error.read()), dict(error.headers)


@pytest.fixture(scope="module")
def worker(kafka_broker, tmp_path_factory):
    from tests.support.workers import WorkerProcess, wait_until_ready

    process = WorkerProcess(kafka_broker.url, tmp_path_factory.mktemp("web-errors"), app_id="web-errors",
                            env={"ADMIN_TOKEN": ADMIN_TOKEN, "SILENCES_MAX": "2"}).start()
    try:
        wait_until_ready([process])
        yield process
    finally:
        process.stop()


@pytest.mark.parametrize("path", ["/table/no-such-table/", "/table/no-such-table/some-key/", "/router/no-such-table/some-key/"])
def test_faust_table_views_answer_404_for_a_table_that_does_not_exist(worker, path):
    status, content_type, body, _ = request(worker.url + path)
    assert (status, content_type, body) == (404, "application/json", {"error": "unknown table", "name": "no-such-table"})


def test_an_unknown_path_and_a_wrong_method_are_json(worker):
    status, content_type, body, _ = request(worker.url + "/no/such/page/")
    assert (status, content_type, body["error"]) == (404, "application/json", "Not Found")
    status, content_type, body, headers = request(worker.url + "/health/", b"{}", method="POST")
    assert (status, content_type, body["error"]) == (405, "application/json", "Method Not Allowed")
    assert "GET" in headers["Allow"]


def test_a_body_nested_too_deeply_is_a_json_400(worker):
    status, content_type, body, _ = request(worker.url + "/alerts/silences", b"[" * 100_000 + b"]" * 100_000, method="POST")
    assert (status, content_type, body) == (400, "application/json", {"error": "request body is nested too deeply"})


def test_an_oversized_body_is_a_json_413(worker):
    status, content_type, body, _ = request(worker.url + "/alerts/silences", b" " * 2_000_000, method="POST")
    assert (status, content_type, body["error"]) == (413, "application/json", "Request Entity Too Large")


def test_past_silences_max_active_silences_a_new_one_is_a_json_400(worker):
    silence = json.dumps({"matchers": [{"name": "service", "value": "cart"}], "ends_at": time.time() + 3600}).encode()
    statuses = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the worker counts a silence once it has read it back from Kafka
        status, content_type, body, _ = request(worker.url + "/alerts/silences", silence, method="POST")
        statuses.append(status)
        if status != 201:
            break
        time.sleep(0.5)
    assert (status, content_type) == (400, "application/json")
    assert "SILENCES_MAX" in body["error"]
    assert statuses.count(201) >= 2
    _, _, listed, _ = request(worker.url + "/alerts/silences")
    assert len(listed["silences"]) == 2  # a third accepted in a race is dropped from memory, not kept


def test_known_tables_are_still_served(worker):
    status, content_type, body, _ = request(worker.url + "/table/")
    assert status == 200 and "metrics_latest" in {table["name"] for table in body}
