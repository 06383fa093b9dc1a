"""Webhook delivery that never blocks a stream: a bounded queue, one sender task, retries with backoff.

The stream hands a payload over with ``notify()`` and moves on. If the receiver is slow or down,
payloads wait in the queue (the oldest is dropped, and counted, when it is full) and each POST is
retried with exponential backoff on connection errors, timeouts, 429 and 5xx.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Dict, Optional

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

log = logging.getLogger(__name__)


class RetryableResponse(Exception):
    """The receiver answered 429 or 5xx: worth trying again."""


class WebhookSender:
    """POSTs JSON payloads to one URL, in order, from a background task."""

    def __init__(self, url: str, *, max_pending: int = 1000, attempts: int = 6, timeout: float = 5.0,
                 initial_backoff: float = 0.2, max_backoff: float = 10.0) -> None:
        self.url = url
        self.queue: asyncio.Queue = asyncio.Queue(max_pending)
        self.attempts = attempts
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.backoff = wait_exponential(multiplier=initial_backoff, max=max_backoff)
        self.stats: Dict[str, int] = {"sent": 0, "failed": 0, "dropped": 0, "retries": 0}

    def notify(self, payload: Dict[str, Any]) -> None:
        """Queue a payload without waiting; when the queue is full the oldest one is dropped."""
        if self.queue.full():
            self.queue.get_nowait()
            self.stats["dropped"] += 1
        self.queue.put_nowait(payload)

    async def run(self) -> None:
        """Deliver queued payloads forever."""
        async with aiohttp.ClientSession(timeout=self.timeout) as session:
            while True:
                payload = await self.queue.get()
                await self._deliver(session, payload)

    async def _deliver(self, session: aiohttp.ClientSession, payload: Dict[str, Any]) -> None:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.attempts),
            wait=self.backoff,
            retry=retry_if_exception_type((aiohttp.ClientError, asyncio.TimeoutError, RetryableResponse)),
            before_sleep=self._count_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._post(session, payload)
            self.stats["sent"] += 1
        except Exception as error:  # noqa: BLE001 - a receiver's failure must not stop the sender
            self.stats["failed"] += 1
            log.warning("webhook %s failed after %d attempts: %r", self.url, self.attempts, error)

    async def _post(self, session: aiohttp.ClientSession, payload: Dict[str, Any]) -> None:
        async with session.post(self.url, json=payload) as response:
            if response.status == 429 or response.status >= 500:
                raise RetryableResponse(f"HTTP {response.status}")
            if response.status >= 400:
                log.warning("webhook %s refused a payload: HTTP %s", self.url, response.status)

    def _count_retry(self, retry_state: Any) -> None:
        self.stats["retries"] += 1


def webhook_sender(url: Optional[str]) -> Optional[WebhookSender]:
    """A sender for ``url``, or None when no webhook is configured."""
    return WebhookSender(url) if url else None
