"""The one retry policy of the worker: exponential backoff, forever, each retry logged and counted.

Batch bodies (app/runtime.py ``until_applied``), sinks, the Elasticsearch writer, the webhook, the
topic followers, CDC capture and the services' log handler all wait out failures with
``retrying``; the counts are exposed on ``/metrics`` (``streamspine_retries``). This module imports
nothing of the app, so the log handler that services embed can use it too.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, DefaultDict, Optional

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_never, wait_exponential

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0  # seconds between two attempts at the most


@dataclass
class ApplyStats:
    """What ``until_applied`` and ``retrying`` did for one step (exposed on /metrics)."""

    batches: int = 0
    seconds: float = 0.0
    retries: int = 0


apply_stats: DefaultDict[str, ApplyStats] = defaultdict(ApplyStats)


def _log_retry(what: str, expected: bool, state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    attempt = state.attempt_number
    apply_stats[what].retries += 1
    if expected:  # an outage the caller waits out: one line per retry
        log.warning("%s failed (%s); retry %d", what, error, attempt)
        return
    log.error(
        "%s failed (%r); retry %d",
        what,
        error,
        attempt,
        exc_info=error if attempt % 100 == 1 else None,  # the traceback on the 1st and every 100th
    )


def retrying(
    what: str,
    *,
    max_backoff: float = MAX_BACKOFF,
    initial: float = 0.1,
    retry_on: Optional[Callable[[BaseException], bool]] = None,
    on_retry: Optional[Callable[[RetryCallState], None]] = None,
) -> AsyncRetrying:
    """The one retry policy: exponential backoff up to ``max_backoff``, forever, logging and
    counting each retry under ``what``. It retries any Exception (never cancellation or exit), or
    only those ``retry_on`` accepts (expected outages, logged without a traceback)."""

    def before_sleep(state: RetryCallState) -> None:
        _log_retry(what, retry_on is not None, state)
        if on_retry is not None:
            on_retry(state)

    return AsyncRetrying(
        wait=wait_exponential(multiplier=initial, max=max_backoff),
        stop=stop_never,
        reraise=True,
        retry=retry_if_exception(retry_on or (lambda error: isinstance(error, Exception))),
        before_sleep=before_sleep,
    )
