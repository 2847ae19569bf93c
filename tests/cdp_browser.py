"""Headless Chromium driven over the DevTools protocol, for the dashboard's
browser test (no WebDriver: a websocket to the page's DevTools target).

`HeadlessChromium` starts Debian's ``chromium`` with a throwaway profile,
answers HTTP authentication challenges with the given credentials as a user
at the browser's prompt would (``Fetch.authRequired``), and records the URL
of every request the page makes (``Fetch.requestPaused``); a request that
leaves ``allowed_origin`` is failed and recorded in ``outside``. A missing
browser fails the test with the apt command that installs it.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request

import pytest

INSTALL = "apt-get install -y chromium chromium-driver"


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(f"the dashboard's browser test needs Chromium: run `{INSTALL}` "
                "(bash .ci/run does)", pytrace=False)


class HeadlessChromium:
    def __init__(self, allowed_origin: str, credentials: tuple[str, str] | None = None,
                 size=(1280, 1100)):
        from websockets.sync.client import connect

        self.allowed, self.credentials = allowed_origin, credentials
        self.requests: list[str] = []
        self.outside: list[str] = []
        self.auth_challenges = 0
        self.errors: list[str] = []  # uncaught exceptions in the page's scripts
        self._ids = itertools.count(1)
        self._waiting: dict[int, queue.Queue] = {}
        binary = chromium_binary()
        self._profile = tempfile.mkdtemp(prefix="jpaged-chromium-")
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--disable-background-networking", "--disable-sync",
             "--disable-component-update", "--remote-debugging-port=0",
             f"--user-data-dir={self._profile}", f"--window-size={size[0]},{size[1]}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port = self._devtools_port()
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
            page = next(t for t in targets if t["type"] == "page")
            self._stack = contextlib.ExitStack()
            self.ws = self._stack.enter_context(connect(page["webSocketDebuggerUrl"],
                                                        max_size=None))
            threading.Thread(target=self._read, daemon=True).start()
            self.send("Fetch.enable", {"patterns": [{"urlPattern": "*"}],
                                       "handleAuthRequests": True})
            self.send("Page.enable")
            self.send("Runtime.enable")
        except BaseException:
            self.close()
            raise

    def _devtools_port(self, timeout: float = 30.0) -> int:
        path = os.path.join(self._profile, "DevToolsActivePort")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            if os.path.exists(path):
                with open(path) as f:
                    first = f.readline().strip()
                if first:
                    return int(first)
            time.sleep(0.05)
        raise RuntimeError("chromium did not open its DevTools port")

    # ----------------------------------------------------------- protocol
    def send(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        i = next(self._ids)
        box = self._waiting[i] = queue.Queue()
        self.ws.send(json.dumps({"id": i, "method": method, "params": params or {}}))
        msg = box.get(timeout=timeout)
        if "error" in msg:
            raise RuntimeError(f"{method}: {msg['error']}")
        return msg.get("result", {})

    def _post(self, method: str, params: dict) -> None:  # from the reader: no reply awaited
        self.ws.send(json.dumps({"id": next(self._ids), "method": method, "params": params}))

    def _read(self) -> None:
        try:
            while True:
                msg = json.loads(self.ws.recv())
                if "id" in msg:
                    box = self._waiting.pop(msg["id"], None)
                    if box is not None:
                        box.put(msg)
                elif msg.get("method") == "Fetch.requestPaused":
                    self._on_request(msg["params"])
                elif msg.get("method") == "Fetch.authRequired":
                    self._on_auth(msg["params"])
                elif msg.get("method") == "Runtime.exceptionThrown":
                    self.errors.append(json.dumps(msg["params"]["exceptionDetails"])[:2000])
        except Exception:  # noqa: BLE001 - the socket closed: the test is over
            return

    def _on_request(self, p: dict) -> None:
        url = p["request"]["url"]
        self.requests.append(url)
        if url.startswith(self.allowed + "/"):
            self._post("Fetch.continueRequest", {"requestId": p["requestId"]})
        else:
            self.outside.append(url)
            self._post("Fetch.failRequest", {"requestId": p["requestId"],
                                             "errorReason": "BlockedByClient"})

    def _on_auth(self, p: dict) -> None:
        self.auth_challenges += 1
        if self.credentials is None:
            answer = {"response": "CancelAuth"}
        else:
            user, password = self.credentials
            answer = {"response": "ProvideCredentials", "username": user, "password": password}
        self._post("Fetch.continueWithAuth", {"requestId": p["requestId"],
                                              "authChallengeResponse": answer})

    # ------------------------------------------------------------ helpers
    def navigate(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def evaluate(self, expression: str):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                           "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:80]}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, poll: float = 0.1):
        """Evaluate until the value is truthy; returns it (fails on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError:
                value = None  # the page is still loading
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {expression!r}")
            time.sleep(poll)

    def screenshot(self, path: str) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png",
                                                    "captureBeyondViewport": True})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self) -> None:
        stack = getattr(self, "_stack", None)
        if stack is not None:
            stack.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self._profile, ignore_errors=True)
