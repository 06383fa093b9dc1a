"""What the unit tests share: the state a worker sets up at start, which test_context() skips."""

from __future__ import annotations

import pytest

import agents.metrics
from app import settings


@pytest.fixture(autouse=True, scope="session")
def alert_rules_of_the_settings() -> None:
    """A worker loads ALERT_RULES at start (agents.metrics.register); the agents' tests run none."""
    agents.metrics.use_alert_rules(agents.metrics.load_alert_rules(settings))
