"""A real headless Chromium driven over the DevTools protocol, for tests that must measure what a
person sees (where a column is drawn, whether it is inside the visible table), not only what the
page's DOM holds: open a URL, wait for an expression to hold, evaluate JavaScript, take screenshots."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import time
from pathlib import Path

CHROMIUM = next((path for path in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if path), None)


class Browser:
    """One headless Chromium with a fresh profile (a first visit), one page, `width` x `height`."""

    def __init__(self, profile: Path, width: int = 1920, height: int = 1080):
        self.profile, self.width, self.height = profile, width, height
        self.process: subprocess.Popen | None = None
        self.socket = None
        self.session = None
        self.next_id = 0

    async def __aenter__(self) -> Browser:
        import aiohttp

        self.process = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}",
                f"--window-size={self.width},{self.height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file, deadline = self.profile / "DevToolsActivePort", time.time() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            assert self.process.poll() is None and time.time() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as answer:
            pages = [target for target in await answer.json() if target["type"] == "page"]
        self.socket = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=self.height,
            deviceScaleFactor=1,
            mobile=False,
        )
        return self

    async def __aexit__(self, *exc) -> None:
        if self.socket is not None:
            await self.socket.close()
        if self.session is not None:
            await self.session.close()
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    async def call(self, method: str, **params) -> dict:
        """One DevTools command; its result (events in between are skipped)."""
        self.next_id += 1
        await self.socket.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            message = json.loads((await self.socket.receive()).data)
            if message.get("id") == self.next_id:
                assert "error" not in message, f"{method}: {message['error']}"
                return message["result"]

    async def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (JSON-serializable)."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def open(self, url: str, ready: str, seconds: float = 90) -> None:
        """Go to `url` and wait until the expression `ready` is truthy (then a moment for layout)."""
        await self.call("Page.navigate", url=url)
        deadline = time.time() + seconds
        while not await self.evaluate(
            f"(() => {{ try {{ return Boolean({ready}); }} catch (e) {{ return false; }} }})()"
        ):
            assert time.time() < deadline, f"{url}: never ready ({ready})"
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.5)

    async def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
