"""Real headless Chromium (Debian's ``chromium``) driven over the DevTools protocol, for tests of
what a person sees in ``/docs`` and ``/redoc``.

The browser can reach nothing but loopback: every host name resolves to nothing
(``--host-resolver-rules``), background services are off, and the page's requests are recorded
so a test can assert that none left the server. The protocol client is the ``websockets``
library the server already depends on (synchronous client), a few lines instead of a browser
automation framework that would bring its own browser build.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str:
    """The browser binary; skips outside CI when there is none, fails under CI (``CI=true``)."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    reason = "Chromium not found (Debian: apt-get install -y chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI must run the browser tests (.ci/run installs it)")
    pytest.skip(reason)


class Page:
    """One tab: ``evaluate`` JavaScript, wait for conditions, read the network log."""

    def __init__(self, ws: ClientConnection, session_id: str):
        self._ws = ws
        self._session = session_id
        self._ids = itertools.count(1)
        self.requests: list[str] = []
        self.failed: list[tuple[str, str]] = []  # (url, error text)
        self.blocked_by_page: list[str] = []
        self.console_errors: list[str] = []
        self._request_urls: dict[str, str] = {}

    def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30) -> dict[str, Any]:
        message_id = next(self._ids)
        self._ws.send(
            json.dumps(
                {"id": message_id, "method": method, "params": params or {}, "sessionId": self._session}
            )
        )
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self._ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._event(message)

    def _event(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            self.requests.append(url)
            self._request_urls[params["requestId"]] = url
        elif method == "Network.loadingFailed":
            url = self._request_urls.get(params["requestId"], "?")
            if params.get("blockedReason") == "csp":
                self.blocked_by_page.append(url)  # refused by the page's Content-Security-Policy: never sent
            else:
                self.failed.append((url, params.get("errorText", "")))
        elif method == "Runtime.exceptionThrown":
            self.console_errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.console_errors.append(
                " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            )

    def pump(self, seconds: float) -> None:
        """Let events arrive for a while (records requests made in the meantime)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                self._event(json.loads(self._ws.recv(timeout=left)))
            except TimeoutError:
                return

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        result = self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript error in {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30, what: str = "") -> Any:
        """Poll ``expression`` until it is truthy; its value is returned."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what or expression}; console errors: {self.console_errors[:5]}; "
                    f"failed requests: {self.failed[:5]}"
                )
            self.pump(0.1)

    def click(self, selector: str, *, text: str | None = None, within: str = "document") -> None:
        """Click the first element matching ``selector`` (and containing ``text``)."""
        found = self.evaluate(
            f"""(() => {{
                const root = {within};
                const items = [...root.querySelectorAll({json.dumps(selector)})]
                    .filter(e => {json.dumps(text)} === null || e.textContent.includes({json.dumps(text)}));
                if (!items.length) return false;
                items[0].scrollIntoView(); items[0].click(); return true;
            }})()"""
        )
        assert found, f"nothing to click: {selector} {text or ''}"

    def type_into(self, selector: str, value: str) -> None:
        """Set an input's value the way React notices (native setter + input event)."""
        done = self.evaluate(
            f"""(() => {{
                const el = document.querySelector({json.dumps(selector)});
                if (!el) return false;
                const proto = el.tagName === 'TEXTAREA' ? HTMLTextAreaElement : HTMLInputElement;
                Object.getOwnPropertyDescriptor(proto.prototype, 'value').set.call(el, {json.dumps(value)});
                el.dispatchEvent(new Event('input', {{bubbles: true}}));
                el.dispatchEvent(new Event('change', {{bubbles: true}}));
                return true;
            }})()"""
        )
        assert done, f"no input {selector}"

    def screenshot(self, path: str) -> None:
        import base64

        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as out:
            out.write(base64.b64decode(data))

    def outside(self, base_url: str) -> list[str]:
        """Requests that went to anything but ``base_url`` (inline data: and blob: URLs are local;
        requests the page's CSP refused never left the browser)."""
        return [
            u
            for u in self.requests
            if not u.startswith((base_url, "data:", "blob:", "about:")) and u not in self.blocked_by_page
        ]


@contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator[Page]:
    binary = chromium_path()
    profile = tempfile.mkdtemp(prefix="flp-chromium-")
    args = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--no-default-browser-check",
        "--metrics-recording-only",
        "--disable-dev-shm-usage",
        # Nothing resolves: the page can reach only 127.0.0.1, which needs no resolution.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--no-proxy-server",
        f"--window-size={width},{height}",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "about:blank",
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ws_url = _devtools_url(process)
        with connect(ws_url, max_size=None, open_timeout=30) as ws:
            ids = itertools.count(10_000)

            def browser_call(method: str, params: dict[str, Any]) -> dict[str, Any]:
                message_id = next(ids)
                ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
                while True:
                    message = json.loads(ws.recv(timeout=30))
                    if message.get("id") == message_id:
                        if "error" in message:
                            raise RuntimeError(f"{method}: {message['error']}")
                        return message["result"]

            target = browser_call("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = browser_call("Target.attachToTarget", {"targetId": target, "flatten": True})[
                "sessionId"
            ]
            page = Page(ws, session)
            for domain in ("Page", "Runtime", "Network"):
                page.send(f"{domain}.enable")
            yield page
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(profile, ignore_errors=True)


def _devtools_url(process: subprocess.Popen[str], timeout: float = 60) -> str:
    """Chromium prints ``DevTools listening on ws://…`` on stderr once it is ready."""
    assert process.stderr is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        match = re.search(r"DevTools listening on (ws://\S+)", line)
        if match:
            # Keep draining stderr so a chatty browser never blocks on a full pipe.
            import threading

            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()  # type: ignore[union-attr]
            return match.group(1)
    raise RuntimeError(f"Chromium did not start: {''.join(seen)[-2000:]}")
