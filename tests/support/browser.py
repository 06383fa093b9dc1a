"""A real headless Chromium (Debian's ``chromium``) driven over the DevTools protocol.

``HeadlessPage`` starts one browser with a fresh profile and drives its page: navigate, evaluate
JavaScript, type text, and record what the page requested and every error it logged. Host names
resolve to nothing but 127.0.0.1, so a page that tried to load anything from elsewhere would fail.
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional

import aiohttp

from tests.support.workers import http_get, wait_for

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--window-size=1400,1000",
]


class HeadlessPage:
    """One headless Chromium page; ``with HeadlessPage(tmp_path) as page: page.navigate(url)``."""

    def __init__(self, work_dir: Path) -> None:
        if CHROMIUM is None:
            raise RuntimeError("chromium not found: apt-get install chromium (make test does)")
        self.profile = work_dir / "chromium-profile"
        self.log_path = work_dir / "chromium.log"
        self.events: List[Dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._process: Optional[subprocess.Popen] = None
        self._session: Optional[aiohttp.ClientSession] = None
        self._socket: Optional[aiohttp.ClientWebSocketResponse] = None

    def __enter__(self) -> "HeadlessPage":
        self.profile.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "about:blank"],
                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
            )
        port_file = self.profile / "DevToolsActivePort"  # Chromium writes the port it chose here
        wait_for(lambda: port_file.exists() and port_file.read_text().strip(), timeout=30, message="chromium's DevTools port")
        port = int(port_file.read_text().splitlines()[0])
        _, targets = http_get(f"http://127.0.0.1:{port}/json/list")
        page = next(target for target in targets if target["type"] == "page")
        self._loop.run_until_complete(self._connect(page["webSocketDebuggerUrl"]))
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.run_until_complete(self._close())
        self._loop.close()
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    async def _connect(self, url: str) -> None:
        self._session = aiohttp.ClientSession()
        self._socket = await self._session.ws_connect(url, max_msg_size=0)

    async def _close(self) -> None:
        if self._socket is not None:
            await self._socket.close()
        if self._session is not None:
            await self._session.close()

    async def _call(self, method: str, params: Dict[str, Any]) -> Dict[str, Any]:
        call_id = next(self._ids)
        await self._socket.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads((await self._socket.receive(timeout=30)).data)
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            if "method" in message:
                self.events.append(message)

    def call(self, method: str, **params: Any) -> Dict[str, Any]:
        """One DevTools command; events that arrive meanwhile are kept in ``events``."""
        return self._loop.run_until_complete(self._call(method, params))

    async def _next_event(self, method: str, after: int) -> Dict[str, Any]:
        while not any(event["method"] == method for event in self.events[after:]):
            message = json.loads((await self._socket.receive(timeout=30)).data)
            if "method" in message:
                self.events.append(message)
        return next(event for event in self.events[after:] if event["method"] == method)

    def navigate(self, url: str) -> None:
        """Open ``url`` and return once its load event fired (its scripts have run)."""
        before = len(self.events)
        self.call("Page.navigate", url=url)
        self._loop.run_until_complete(self._next_event("Page.loadEventFired", before))

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} raised: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout: float = 30.0) -> Any:
        """Evaluate ``expression`` until it is truthy; return its value."""
        return wait_for(lambda: self.evaluate(expression), timeout=timeout, message=expression)

    def type_into(self, selector: str, text: str) -> None:
        """Focus a field, select what it holds, and type ``text`` over it (input events fire)."""
        self.evaluate(f"(el => {{ el.focus(); el.select(); return true; }})(document.querySelector({json.dumps(selector)}))")
        self.call("Input.insertText", text=text)

    def screenshot(self, path: Path) -> Path:
        """A PNG of the page as it is now (kept next to a test's files for a look after a failure)."""
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def requests(self) -> List[Dict[str, Any]]:
        """Every request the page has sent so far (``Network.requestWillBeSent`` ``request`` objects)."""
        self.evaluate("1")  # collects the events that arrived since the last command
        return [event["params"]["request"] for event in self.events if event["method"] == "Network.requestWillBeSent"]

    def errors(self) -> List[Any]:
        """Uncaught exceptions and error-level log entries (failed loads, CSP refusals, console.error)."""
        self.evaluate("1")
        errors: List[Any] = []
        for event in self.events:
            if event["method"] == "Runtime.exceptionThrown":
                errors.append(event["params"]["exceptionDetails"])
            elif event["method"] == "Log.entryAdded" and event["params"]["entry"]["level"] == "error":
                errors.append(event["params"]["entry"])
            elif event["method"] == "Runtime.consoleAPICalled" and event["params"]["type"] == "error":
                errors.append(event["params"]["args"])
        return errors
