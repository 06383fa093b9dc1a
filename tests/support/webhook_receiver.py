"""A real aiohttp server that records the JSON POSTed to it, run in a thread for worker tests."""
from __future__ import annotations

import asyncio
import threading
from typing import Any, List, Optional

from aiohttp import web

from tests.support.ports import free_port


class WebhookReceiver:
    """``with WebhookReceiver() as receiver:`` -> POST JSON to ``receiver.url``; read ``receiver.payloads``."""

    def __init__(self, fail_first: int = 0) -> None:
        self.port = free_port()
        self.payloads: List[Any] = []
        self.fail_first = fail_first  # answer 503 to this many requests first (retry paths)
        self.requests = 0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _receive(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.requests <= self.fail_first:
            return web.json_response({"error": "try again"}, status=503)
        self.payloads.append(await request.json())
        return web.json_response({"ok": True})

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        application = web.Application()
        application.router.add_post("/hook", self._receive)
        runner = web.AppRunner(application)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def __enter__(self) -> "WebhookReceiver":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("webhook receiver did not start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
