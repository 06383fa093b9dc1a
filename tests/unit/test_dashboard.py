"""The dashboard's overview: which services and dead-letter topics the cluster's tables hold."""
from __future__ import annotations

from app.dashboard import key_name, merge_overviews


def test_table_keys_are_shown_as_text_even_when_not_utf8():
    assert key_name(b"checkout") == "checkout"
    assert key_name("search") == "search"
    assert key_name(b"bad-\xff") == "bad-\ufffd"


def test_the_overview_merges_every_workers_share_and_says_which_pages_a_service_has():
    parts = [
        {"metric_services": ["checkout", "search"], "log_services": ["checkout"], "dead_letter_topics": ["metrics"]},
        # another worker: a standby copy of checkout, a service with logs only, another topic
        {"metric_services": ["checkout"], "log_services": ["billing"], "dead_letter_topics": ["logs", "metrics"]},
    ]
    assert merge_overviews(parts, unreachable=["http://w3:6066"]) == {
        "services": [
            {"name": "billing", "metrics": False, "logs": True},
            {"name": "checkout", "metrics": True, "logs": True},
            {"name": "search", "metrics": True, "logs": False},
        ],
        "dead_letter_topics": ["logs", "metrics"],
        "unreachable": ["http://w3:6066"],
    }


def test_an_empty_cluster_has_an_empty_overview():
    assert merge_overviews([{}], unreachable=[]) == {"services": [], "dead_letter_topics": [], "unreachable": []}
