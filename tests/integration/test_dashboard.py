"""The dashboard (/ui/) in a real headless Chromium against a real worker: charts, alerts, log
statistics and dead letters appear; silences and phase changes go out with the typed admin token."""
from __future__ import annotations

import json
import time
from urllib.request import urlopen

import pytest

from tests.support.browser import HeadlessPage
from tests.support.kafka import produce_sync
from tests.support.workers import wait_for

RULES = """
rules:
  - name: DashboardHighCPU
    metric: cpu
    aggregate: mean
    window: 5s
    op: ">"
    threshold: 0.9
    for: 10s
    severity: critical
    summary: "CPU of {service}/{instance} is {value:.2f}"
"""
ADMIN_TOKEN = "dashboard-admin-token"
# An alert whose series gets no new samples resolves as absent after a while: not during these tests.
WORKER_ENV = dict(ADMIN_TOKEN=ADMIN_TOKEN, METRIC_WINDOW="20", METRIC_WINDOW_STEP="5", ALERT_ABSENT_AFTER="3600")
ERROR_LINE = "payment gateway timed out <b>not markup</b>"


@pytest.fixture
def rules_file(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return path


def texts(page: HeadlessPage, selector: str) -> list[str]:
    return page.evaluate(f"[...document.querySelectorAll({json.dumps(selector)})].map(node => node.textContent)")


def cells(page: HeadlessPage, selector: str) -> list[list[str]]:
    """The cell texts of each table row matching ``selector``."""
    return page.evaluate(f"[...document.querySelectorAll({json.dumps(selector)})].map(row => [...row.cells].map(cell => cell.textContent))")


def action_status(page: HeadlessPage, containing: str) -> str:
    """The page's action message, once it contains ``containing``."""
    return page.wait_until(f"(text => text.includes({json.dumps(containing)}) && text)(document.getElementById('action-status').textContent)")


def served_text(url: str) -> str:
    with urlopen(url, timeout=5) as response:
        return response.read().decode()


def test_the_page_draws_each_services_windows_and_shows_alerts_log_errors_and_dead_letters(isolated_broker, start_workers, rules_file, tmp_path):
    first, worker = start_workers(isolated_broker, 2, ALERT_RULES=str(rules_file), **WORKER_ENV)
    t0 = time.time() - 300
    # checkout's CPU is high from the 30th second on (an alert fires); its latency is a second chart.
    metrics = [
        ("checkout", {"instance": "checkout-1", "metric": "cpu", "value": 0.3 if i < 30 else 0.99, "ts": t0 + i}) for i in range(80)
    ] + [("checkout", {"instance": "checkout-1", "metric": "latency_ms", "value": 20.0 + i % 7, "ts": t0 + i}) for i in range(80)]
    produce_sync(isolated_broker.bootstrap, "metrics", metrics)
    produce_sync(isolated_broker.bootstrap, "metrics", [("checkout", b"{not json")])  # a dead letter
    now = time.time()
    produce_sync(isolated_broker.bootstrap, "logs", [
        *[("checkout", {"ts": now, "level": "info", "message": f"ok {i}"}) for i in range(9)],
        ("checkout", {"ts": now, "level": "error", "message": ERROR_LINE}),
    ])
    wait_for(lambda: any(alert["rule"] == "DashboardHighCPU" for alert in worker.get("/alerts/?status=firing")[1]["alerts"]),
             timeout=60, message="the alert firing")
    wait_for(lambda: worker.get("/dead-letters/metrics/")[0] == 200, timeout=60, message="the dead letter counted")
    wait_for(lambda: worker.get("/logs/recent/checkout/?level=error")[0] == 200, timeout=60, message="the error line")
    for each in (first, worker):  # each worker gathers the overview from both
        assert each.get("/ui/api/overview") == (200, {
            "services": [{"name": "checkout", "metrics": True, "logs": True}],
            "dead_letter_topics": ["metrics"], "unreachable": [],
        })

    with HeadlessPage(tmp_path) as page:
        page.navigate(worker.url + "/ui/")
        for metric in ("cpu", "latency_ms"):  # uPlot draws each chart on a canvas
            page.wait_until(f"document.querySelector('[data-service=\"checkout\"] [data-metric=\"{metric}\"] canvas') !== null")
        page.wait_until("document.querySelector('#dead-letters tr.dead-letter') !== null")
        page.wait_until("document.querySelector('[data-service=\"checkout\"] .error-lines li') !== null")
        page.screenshot(tmp_path / "dashboard.png")

        charts = page.evaluate("[...document.querySelectorAll('[data-service=\"checkout\"] .chart')].map(c => c.dataset.metric)")
        assert {"cpu", "latency_ms"} <= set(charts)  # and log_error_rate once a log window has closed
        assert all(stats.startswith("p50 ") and " p99 " in stats for stats in texts(page, "[data-service=\"checkout\"] .chart .stats"))
        (alert_row,) = texts(page, "#alerts tr.alert")
        assert "DashboardHighCPU" in alert_row and "firing" in alert_row and "checkout / checkout-1" in alert_row
        assert texts(page, "[data-service=\"checkout\"] .alert-badge") == ["1 firing"]
        ((topic, count, dlq_topic, reason, _),) = cells(page, "#dead-letters tr.dead-letter")
        assert (topic, count, dlq_topic) == ("metrics", "1", "metrics.dlq") and "not JSON" in reason
        (error_line,) = texts(page, "[data-service=\"checkout\"] .error-lines li")
        assert error_line.endswith(ERROR_LINE)  # shown as text: the page makes no <b> of it
        assert page.evaluate("document.querySelector('.error-lines b')") is None
        (header,) = cells(page, "[data-service=\"checkout\"] .log-stats thead tr")
        windows = cells(page, "[data-service=\"checkout\"] .log-stats tbody tr")
        assert header[1:] == ["info", "error", "error ratio"] and [row[0] for row in windows] == ["current", "previous"]
        # The lines fall in the current window, or the previous one if a window closed meanwhile.
        assert [sum(int(row[column]) for row in windows) for column in (1, 2)] == [9, 1]
        assert "CDC is not configured" in texts(page, "#cdc-slot")[0]
        assert "shadow" in texts(page, "#migration dd")[0]

        # Only this worker was asked for anything, and nothing failed or was refused.
        assert {request["url"].split("/")[2] for request in page.requests()} == {worker.url.split("/")[2]}
        assert page.errors() == []


def test_silences_and_phase_changes_from_the_page_carry_the_admin_token_the_operator_typed(isolated_broker, start_workers, tmp_path):
    (worker,) = start_workers(isolated_broker, 1, **WORKER_ENV)
    for path in ("/ui/", "/ui/static/dashboard.js"):
        assert ADMIN_TOKEN not in served_text(worker.url + path)

    with HeadlessPage(tmp_path) as page:
        page.navigate(worker.url + "/ui/")
        page.wait_until("document.getElementById('refresh-status').textContent.startsWith('updated')")
        fill_silence = (
            "(form => { form.matchers.value = 'service=checkout, instance=~checkout-.*'; form.comment.value = 'deploy';"
            " form.querySelector('button').click(); return true; })(document.getElementById('silence-form'))"
        )

        page.evaluate(fill_silence)  # no token typed yet: nothing is sent
        assert action_status(page, "token") == "Add silence: enter the admin token first"
        assert [request for request in page.requests() if request["method"] == "POST"] == []

        page.type_into("#admin-token", "not-the-token")
        page.evaluate(fill_silence)
        assert action_status(page, "refused") == "Add silence refused (403): invalid admin token"

        page.type_into("#admin-token", ADMIN_TOKEN)
        assert page.evaluate("sessionStorage.getItem('streamspine.adminToken')") == ADMIN_TOKEN
        assert page.evaluate("localStorage.length") == 0
        page.evaluate(fill_silence)
        assert action_status(page, "done") == "Add silence: done"
        (silence,) = wait_for(lambda: worker.get("/alerts/silences")[1]["silences"], message="the silence stored")
        assert silence["comment"] == "deploy" and silence["created_by"] == "dashboard"
        assert silence["matchers"] == [{"name": "service", "value": "checkout", "is_regex": False},
                                       {"name": "instance", "value": "checkout-.*", "is_regex": True}]
        page.wait_until("document.querySelector('#silences tr.silence') !== null")
        assert texts(page, "#silences tr.silence")[0].startswith("service=checkout, instance=~checkout-.*")

        page.evaluate(
            "(form => { form.phase.value = 'canary'; form.canary_percent.value = '10';"
            " form.querySelector('button').click(); return true; })(document.getElementById('phase-form'))"
        )
        assert action_status(page, "canary") == "Change phase to canary: done"
        wait_for(lambda: worker.get("/migration/phase")[1]["phase"] == "canary", timeout=60, message="phase canary")
        page.wait_until("document.querySelector('#migration dd').textContent === 'canary 10 %'")
        assert page.wait_until("document.getElementById('silence-form').matchers.value === ''")  # cleared once added
        page.screenshot(tmp_path / "dashboard.png")

        posts = [request for request in page.requests() if request["method"] == "POST"]
        assert [request["headers"].get("Authorization") for request in posts] == [
            "Bearer not-the-token", f"Bearer {ADMIN_TOKEN}", f"Bearer {ADMIN_TOKEN}",
        ]
        # The one failed load the browser reports is the refused POST.
        assert [(error["source"], error["url"]) for error in page.errors()] == [("network", worker.url + "/alerts/silences")]
        assert "403" in page.errors()[0]["text"]
