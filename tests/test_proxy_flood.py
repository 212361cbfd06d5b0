"""A flood of connections that never finish their request header, all from one address, against a
real nginx rendered by deploy/nginx/render.sh (issue 25, item 1: 2,100 such connections, reopened as
nginx closed them, took nginx's 2 x 1024 connections and left token holders empty replies). Behind
nginx a recording fake (tests.conftest.FakeHTTP) answers GET /ping 200, standing in for TorchServe:
what is tested is nginx's front, not what stands behind it. Token holders ping from another loopback
address (127.0.0.2) while the flood runs; every ping must be answered. Bounded: 15 s of flood, at
most 300,000 connections opened; no assertion on speed."""
from __future__ import annotations

import os
import re
import resource
import secrets
import selectors
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from client.local_server import free_ports
from tests.conftest import REPO, FakeHTTP, wait_for
from tests.test_front_proxy import proxy_base

RENDER = REPO / "deploy" / "nginx" / "render.sh"
FLOOD_SOCKETS = 2100  # the flood: more connections than nginx then had (2 workers x 1024)
FLOOD_SECONDS = 15
FLOOD_MAX_OPENS = 300_000
TOKEN_HOLDER = "127.0.0.2"  # another address than the flood's 127.0.0.1
PARTIAL_HEADER = b"GET /ping HTTP/1.1\r\nHost: torchserve\r\nX-Never-Ends: "


@dataclass
class Flood:
    """FLOOD_SOCKETS connections from 127.0.0.1 that send a partial header and wait; each one nginx
    closes (or refuses) is opened again at once, until `stop`, the deadline or FLOOD_MAX_OPENS."""

    port: int
    stop: threading.Event = field(default_factory=threading.Event)
    opened: int = 0
    closed_by_server: int = 0
    full: threading.Event = field(default_factory=threading.Event)  # all FLOOD_SOCKETS opened once

    def run(self, seconds: float) -> None:
        selector = selectors.DefaultSelector()
        deadline = time.monotonic() + seconds

        def open_one() -> None:
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", self.port))
            selector.register(s, selectors.EVENT_WRITE)
            self.opened += 1

        def reopen(s: socket.socket) -> None:
            selector.unregister(s)
            s.close()
            self.closed_by_server += 1
            if self.opened < FLOOD_MAX_OPENS:
                open_one()

        try:
            for _ in range(FLOOD_SOCKETS):
                open_one()
            self.full.set()
            while not self.stop.is_set() and time.monotonic() < deadline:
                for key, events in selector.select(timeout=0.2):
                    s = key.fileobj
                    if events & selectors.EVENT_WRITE:  # connected, or failed to
                        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                            reopen(s)
                            continue
                        try:
                            s.send(PARTIAL_HEADER)
                        except OSError:
                            reopen(s)
                            continue
                        selector.modify(s, selectors.EVENT_READ)
                    else:  # an answer (a 408 or 400) or the close: either way nginx let it go
                        try:
                            data = s.recv(4096)
                        except OSError:
                            data = b""
                        if not data:
                            reopen(s)
        finally:
            for key in list(selector.get_map().values()):
                key.fileobj.close()
            selector.close()


def ping(port: int, token: str) -> int | None:
    """GET /ping with the token from TOKEN_HOLDER on a fresh connection: the status, or None for an
    empty reply, a reset or no answer within 20 s."""
    try:
        with socket.socket() as s:
            s.settimeout(20)
            s.bind((TOKEN_HOLDER, 0))
            s.connect(("127.0.0.1", port))
            s.sendall(f"GET /ping HTTP/1.1\r\nHost: torchserve\r\nAuthorization: Bearer {token}\r\n"
                      "Connection: close\r\n\r\n".encode())
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
    except OSError:
        return None
    found = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    return int(found.group(1)) if found else None


def start_nginx(base: Path, upstream: FakeHTTP, workers: int, fd_limit: int | None,
                ts_config: Path = REPO / "config.properties", **extra: str):
    """render.sh --foreground with fresh tokens on a free port, the fd limit lowered to `fd_limit`
    (soft and hard, as a container's runtime would set it) when given, `extra` added to its
    environment: (process, port, token)."""
    token = secrets.token_hex(32)
    (base / "inference.token").write_text(token + "\n")
    (base / "management.token").write_text(secrets.token_hex(32) + "\n")
    port, management_port = free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "TS_"))}
    env.update(PROXY_LISTEN=f"127.0.0.1:{port}", PROXY_BACKEND=upstream.url,
               PROXY_TOKEN_FILE=str(base / "inference.token"),
               PROXY_MANAGEMENT_LISTEN=f"127.0.0.1:{management_port}",
               PROXY_MANAGEMENT_TOKEN_FILE=str(base / "management.token"),
               PROXY_DIR=str(base / "run"), PROXY_TS_CONFIG=str(ts_config),
               PROXY_WORKERS=str(workers), **extra)

    def limit_fds() -> None:
        if fd_limit:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

    with open(base / "render.out", "w") as out:
        nginx = subprocess.Popen(["sh", str(RENDER), "--foreground"], env=env, stdout=out,
                                 stderr=subprocess.STDOUT, preexec_fn=limit_fds)
    return nginx, port, token


@pytest.mark.parametrize("workers,fd_limit", [(2, None), (1, 3072)],
                         ids=["as-in-the-pods", "smallest-fd-limit-render-accepts"])
def test_a_flood_of_unfinished_headers_from_one_address_starves_no_token_holder(workers, fd_limit):
    """The second case gives nginx fewer connections (2,048 in one worker) than the flood opens, so
    only the per-address limit in front of the http server keeps room for the token holders."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < FLOOD_SOCKETS + 200:
        pytest.skip(f"this process may open {hard} files; the flood needs {FLOOD_SOCKETS + 200}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    upstream = FakeHTTP({"/ping": (200, b'{"status": "Healthy"}')})
    base = proxy_base()
    nginx, port, token = start_nginx(base, upstream, workers, fd_limit)
    flood = Flood(port)
    flooding = threading.Thread(target=flood.run, args=(FLOOD_SECONDS,))
    answers: list[int | None] = []
    try:
        assert wait_for(lambda: ping(port, token) == 200 or nginx.poll() is not None, 30), "no answer"
        assert nginx.poll() is None, (base / "render.out").read_text()
        flooding.start()
        assert flood.full.wait(30)
        time.sleep(1)  # the flood has reached nginx and fills it
        while flooding.is_alive() and len(answers) < 200:
            answers.append(ping(port, token))
            time.sleep(0.2)
    finally:
        flood.stop.set()
        flooding.join(60)
        nginx.terminate()
        nginx.wait(timeout=30)
        upstream.close()
        error_log = (base / "run" / "logs" / "error.log")
        errors = error_log.read_text(errors="replace") if error_log.exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    answered = answers.count(200)
    print(f"flood: {flood.opened} connections opened from 127.0.0.1, {flood.closed_by_server} let go by "
          f"nginx; token holder's /ping: {answered} of {len(answers)} answered")
    assert flood.opened >= FLOOD_SOCKETS and flood.closed_by_server > 0  # the flood ran and was pushed back
    assert len(answers) >= 20
    assert answered == len(answers), f"{answered} of {len(answers)} pings answered: {answers}"
    assert "worker_connections are not enough" not in errors
