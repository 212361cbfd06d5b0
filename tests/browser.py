"""A page opened in headless Chromium, driven over the DevTools protocol on a pipe (no extra package):
what it requested, what it logged as an error, what its DOM says, and a screenshot.

--remote-debugging-pipe: Chromium reads commands on fd 3 and writes answers and events on fd 4, each
a JSON message ended by a NUL byte. Chromium runs as root here, so --no-sandbox; it is killed by
its process group (its own session, started here) whatever happens, and every read has a deadline.
"""
from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

FLAGS = ("--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio")
# bash puts the pipes on the fds Chromium expects; `exec` keeps the pid (the Debian wrapper execs too).
# CDP_IN < CDP_OUT (made first, the lowest free fds), so neither copy overwrites the other's source.
ON_FDS_3_4 = 'exec "$0" "$@" 3<&"$CDP_IN" 4>&"$CDP_OUT"'


def chromium() -> str | None:
    """The Chromium binary (`make install` installs Debian's), None when there is none."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """One Chromium and its protocol pipe; use as `with DevTools.started(...) as tools:`."""

    def __init__(self, proc: subprocess.Popen, commands: int, answers: int, timeout: float):
        self.proc, self.commands, self.answers, self.timeout = proc, commands, answers, timeout
        self.buffer = bytearray()
        self.events: list[dict] = []
        self.next_id = 0
        self.session: str | None = None

    @classmethod
    @contextmanager
    def started(cls, timeout: float = 60.0) -> Iterator["DevTools"]:
        binary = chromium()
        if binary is None:
            raise FileNotFoundError("chromium not found")
        to_read, to_write = os.pipe()
        from_read, from_write = os.pipe()
        with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
            proc = subprocess.Popen(
                ["bash", "-c", ON_FDS_3_4, binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                pass_fds=(to_read, from_write),
                env={**os.environ, "CDP_IN": str(to_read), "CDP_OUT": str(from_write)},
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
            os.close(to_read)
            os.close(from_write)  # Chromium's end only: its exit then ends our reads
            tools = cls(proc, to_write, from_read, timeout)
            try:
                yield tools
            finally:
                os.close(to_write)
                os.close(from_read)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # its group: the renderer and GPU helpers too
                except ProcessLookupError:
                    pass
                proc.wait(timeout=30)

    def _read(self, deadline: float) -> dict:
        """The next message; TimeoutError past the deadline, EOFError when Chromium is gone."""
        start = 0
        while (end := self.buffer.find(b"\0", start)) < 0:
            start = len(self.buffer)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.answers], [], [], left)[0]:
                raise TimeoutError(f"no answer from chromium within {self.timeout:g}s")
            chunk = os.read(self.answers, 1 << 20)
            if not chunk:
                raise EOFError(f"chromium closed its pipe (exit code {self.proc.poll()})")
            self.buffer += chunk
        message = json.loads(self.buffer[:end])
        del self.buffer[:end + 1]
        return message

    def send(self, method: str, **params) -> dict:
        """One command (to the attached page, once there is one) -> its result; events are kept."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            answer = self._read(deadline)
            if answer.get("id") != self.next_id:
                self.events.append(answer)
            elif "error" in answer:
                raise RuntimeError(f"{method}: {answer['error']}")
            else:
                return answer.get("result", {})

    def wait_for(self, event: str) -> dict:
        """The first event of that name (already received, or the next ones)."""
        deadline = time.monotonic() + self.timeout
        while True:
            found = next((e for e in self.events if e.get("method") == event), None)
            if found is not None:
                return found["params"]
            self.events.append(self._read(deadline))

    def named(self, event: str) -> list[dict]:
        return [e["params"] for e in self.events if e.get("method") == event]


@dataclass
class Page:
    """What a page did while it loaded."""

    url: str
    sections: list[str]  # the ids of its <section>s, in order
    scripts: int  # <script> elements in its DOM
    requests: list[str]  # every URL it asked for, the page's own first
    errors: list[str]  # console errors, exceptions, log entries of level error (CSP refusals among them)
    screenshot: bytes  # PNG of the whole page


def open_page(url: str, width: int = 1200, timeout: float = 60.0) -> Page:
    """Load `url` in a fresh headless Chromium; its sections' ids, requests, errors and a full-page PNG."""
    with DevTools.started(timeout) as tools:
        target = tools.send("Target.createTarget", url="about:blank")["targetId"]
        tools.session = tools.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Network", "Runtime", "Log", "Page"):
            tools.send(f"{domain}.enable")
        tools.send("Emulation.setDeviceMetricsOverride", width=width, height=800, deviceScaleFactor=1,
                   mobile=False)
        tools.send("Page.navigate", url=url)
        tools.wait_for("Page.loadEventFired")
        dom = tools.send("Runtime.evaluate", returnByValue=True, expression=(
            "({sections: [...document.querySelectorAll('section[id]')].map(s => s.id),"
            " scripts: document.scripts.length})"))["result"]["value"]
        size = tools.send("Page.getLayoutMetrics")["cssContentSize"]
        shot = tools.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        tools.send("Runtime.evaluate", expression="0")  # events logged during the capture arrive first
        errors = ([f"console.error: {e['args']}" for e in tools.named("Runtime.consoleAPICalled")
                   if e["type"] == "error"]
                  + [f"exception: {e['exceptionDetails']}" for e in tools.named("Runtime.exceptionThrown")]
                  + [f"log: {e['entry']}" for e in tools.named("Log.entryAdded")
                     if e["entry"]["level"] == "error"])
        requests = [e["request"]["url"] for e in tools.named("Network.requestWillBeSent")]
        return Page(url, dom["sections"], dom["scripts"], requests, errors, base64.b64decode(shot["data"]))


def screenshot(html: Path, png: Path, width: int = 1200) -> None:
    """Save a full-page screenshot of a local HTML file (docs/report.png)."""
    png.write_bytes(open_page(html.resolve().as_uri(), width).screenshot)
