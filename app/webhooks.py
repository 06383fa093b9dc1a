"""Webhook delivery that never blocks a stream and never gives a payload up while the receiver may
come back: a bounded queue, one sender task, the one retry policy of app/runtime.py.

The stream hands a payload over with ``notify()`` and moves on; payloads are POSTed in order.
Connection errors, timeouts, 429 and 5xx are retried with exponential backoff (up to
``max_backoff``) for as long as it takes: a receiver that is down gets every payload once it is
back. Any other 4xx is the receiver refusing that payload: sending it again would be refused again,
so it is logged, counted and skipped. When the queue is full the oldest payload is dropped (and
counted); agents/metrics.py sends firing alerts again every ALERT_REPEAT_INTERVAL, which makes good
such a drop, or a queue lost with its worker, for every alert still firing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Dict, Optional

import aiohttp

from app.retry import retrying

log = logging.getLogger(__name__)


class RetryableResponse(Exception):
    """The receiver answered 429 or 5xx: worth trying again."""


class WebhookSender:
    """POSTs JSON payloads to one URL, in order, from a background task."""

    def __init__(
        self, url: str, *, max_pending: int = 1000, timeout: float = 5.0, initial_backoff: float = 0.2, max_backoff: float = 10.0
    ) -> None:
        self.url = url
        self.queue: "asyncio.Queue[bytes]" = asyncio.Queue(max_pending)
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.stats: Dict[str, int] = {"sent": 0, "refused": 0, "dropped": 0, "retries": 0}

    def notify(self, payload: Dict[str, Any]) -> None:
        """Queue a payload without waiting; when the queue is full the oldest one is dropped.
        Encoded here, so a payload that is not JSON fails its caller, never the sender."""
        body = json.dumps(payload).encode()
        if self.queue.full():
            self.queue.get_nowait()
            self.stats["dropped"] += 1
        self.queue.put_nowait(body)

    async def run(self) -> None:
        """Deliver queued payloads forever."""
        async with aiohttp.ClientSession(timeout=self.timeout) as session:
            while True:
                body = await self.queue.get()
                await self._deliver(session, body)

    async def _deliver(self, session: aiohttp.ClientSession, body: bytes) -> None:
        async for attempt in retrying("webhook", max_backoff=self.max_backoff, initial=self.initial_backoff):
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    self.stats["retries"] += 1
                await self._post(session, body)

    async def _post(self, session: aiohttp.ClientSession, body: bytes) -> None:
        async with session.post(self.url, data=body, headers={"Content-Type": "application/json"}) as response:
            if response.status == 429 or response.status >= 500:
                raise RetryableResponse(f"HTTP {response.status}")
            if response.status >= 400:
                self.stats["refused"] += 1
                text = (await response.text(errors="replace"))[:200]
                log.error("webhook %s refused a payload for good: HTTP %s %s", self.url, response.status, text)
                return
            self.stats["sent"] += 1


def webhook_sender(url: Optional[str]) -> Optional[WebhookSender]:
    """A sender for ``url``, or None when no webhook is configured."""
    return WebhookSender(url) if url else None
