"""app/webhooks.py against real HTTP receivers: a receiver that is down gets every payload, in
order, once it is up (however many attempts that takes); a 4xx refusal is skipped, 429 retried."""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, List

from aiohttp import web
from aiohttp.test_utils import TestServer

from app.webhooks import WebhookSender
from tests.support.webhook_receiver import WebhookReceiver


async def until(condition, timeout: float = 20.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition() and loop.time() < deadline:
        await asyncio.sleep(0.01)
    return condition()


@contextlib.asynccontextmanager
async def running(sender: WebhookSender) -> AsyncIterator[WebhookSender]:
    task = asyncio.ensure_future(sender.run())
    try:
        yield sender
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def quick_sender(url: str) -> WebhookSender:
    return WebhookSender(url, initial_backoff=0.005, max_backoff=0.02, timeout=2.0)


async def test_a_receiver_that_is_down_gets_every_payload_in_order_once_it_is_up():
    receiver = WebhookReceiver()  # its port is chosen; nothing listens on it yet
    async with running(quick_sender(receiver.url)) as sender:
        sender.notify({"n": 1})
        sender.notify({"n": 2})
        assert await until(lambda: sender.stats["retries"] >= 20), "kept trying while the receiver was down"
        with receiver:
            assert await until(lambda: len(receiver.payloads) == 2)
    assert receiver.payloads == [{"n": 1}, {"n": 2}]
    assert sender.stats["sent"] == 2 and sender.stats["refused"] == 0


async def test_a_receiver_answering_503_many_times_still_gets_the_payload():
    with WebhookReceiver(fail_first=12) as receiver:
        async with running(quick_sender(receiver.url)) as sender:
            sender.notify({"n": 1})
            assert await until(lambda: receiver.payloads)
    assert receiver.payloads == [{"n": 1}] and receiver.requests == 13


class ScriptedReceiver:
    """Answers each POST with the next status of ``statuses`` (200 once they run out)."""

    def __init__(self, statuses: List[int]) -> None:
        self.statuses = list(statuses)
        self.received: List[Any] = []

    async def receive(self, request: web.Request) -> web.Response:
        status = self.statuses.pop(0) if self.statuses else 200
        self.received.append((await request.json(), status))
        return web.json_response({}, status=status)


async def test_a_4xx_refusal_is_logged_and_skipped_but_429_is_retried(caplog):
    script = ScriptedReceiver([400, 429, 200, 404])
    application = web.Application()
    application.router.add_post("/hook", script.receive)
    async with TestServer(application, host="127.0.0.1") as server:
        async with running(quick_sender(str(server.make_url("/hook")))) as sender:
            for n in (1, 2, 3):
                sender.notify({"n": n})
            assert await until(lambda: len(script.received) == 4)
            await asyncio.sleep(0.1)  # a refused payload sent again would arrive now

    assert script.received == [({"n": 1}, 400), ({"n": 2}, 429), ({"n": 2}, 200), ({"n": 3}, 404)]
    assert sender.stats == {"sent": 1, "refused": 2, "dropped": 0, "retries": 1}
    assert "refused a payload for good: HTTP 400" in caplog.text


async def test_a_full_queue_drops_its_oldest_payload_and_counts_it():
    sender = WebhookSender("http://127.0.0.1:9/hook", max_pending=2)
    for n in (1, 2, 3):
        sender.notify({"n": n})
    assert sender.stats["dropped"] == 1 and sender.queue.qsize() == 2
