"""A token holder sending a request body slowly, against a real nginx rendered by
deploy/nginx/render.sh with its default timeouts (issue 25, item 6: a byte every 20 s held a body
open under the 30 s read timeout for as long as the sender liked). Debian's nginx 1.22 has no bound
on a body's total time (docs/security.md); what it has is the pause allowed between two reads,
PROXY_BODY_TIMEOUT, and the upstream sees nothing until the whole body is in. Behind nginx a
recording fake (tests.conftest.FakeHTTP) stands in for TorchServe, to see that nothing reached it."""
from __future__ import annotations

import select
import shutil
import socket
import time

from tests.conftest import FakeHTTP, wait_for
from tests.test_proxy_flood import ping, start_nginx
from tests.test_front_proxy import proxy_base

BODY_TIMEOUT_S = 10  # render.sh's default PROXY_BODY_TIMEOUT, as docs/security.md states it
PAUSE_S = 20  # the trickle: a byte every 20 s


def test_a_body_trickled_a_byte_every_20_s_is_cut_and_never_reaches_the_upstream():
    upstream = FakeHTTP({"/ping": (200, b'{"status": "Healthy"}'), "/predictions/m": (200, b"{}")})
    base = proxy_base()
    nginx, port, token = start_nginx(base, upstream, workers=1, fd_limit=None)
    try:
        assert wait_for(lambda: ping(port, token) == 200 or nginx.poll() is not None, 30), "no answer"
        assert nginx.poll() is None, (base / "render.out").read_text()
        seen = len(upstream.requests)
        head = (f"POST /predictions/m HTTP/1.1\r\nHost: torchserve\r\nAuthorization: Bearer {token}\r\n"
                "Content-Type: application/octet-stream\r\nContent-Length: 100\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(head + b"x")
            started = time.monotonic()
            cut_after = None
            # A byte every PAUSE_S until nginx lets go, for at most 3 x BODY_TIMEOUT_S.
            while cut_after is None and time.monotonic() - started < 3 * BODY_TIMEOUT_S:
                readable, _, _ = select.select([s], [], [], PAUSE_S)
                if readable:
                    try:
                        answer = s.recv(65536)
                    except ConnectionResetError:
                        answer = b""
                    assert b" 200 " not in answer
                    cut_after = time.monotonic() - started
                else:
                    try:
                        s.send(b"x")
                    except (BrokenPipeError, ConnectionResetError):
                        cut_after = time.monotonic() - started
        assert cut_after is not None, f"nginx still read the body after {3 * BODY_TIMEOUT_S} s"
        assert cut_after < 3 * BODY_TIMEOUT_S  # generous: the claim is one PROXY_BODY_TIMEOUT
        assert ping(port, token) == 200 and len(upstream.requests) == seen + 1
        assert all(path != "/predictions/m" for _, path, _ in upstream.requests)
    finally:
        nginx.terminate()
        nginx.wait(timeout=30)
        upstream.close()
        shutil.rmtree(base, ignore_errors=True)


def test_one_address_trickling_bodies_holds_at_most_half_of_a_spool_class():
    """Bodies over 256 KiB hold a place of the spool from their header on, for as long as they are
    sent: a token holder trickling them from one address gets half of a class's places (the rest 429),
    and a body of that class from another address still goes through to the upstream."""
    max_body, budget = 2_000_000, 20_000_000  # the medium class (7 digits): 2 places, 1 an address
    base = proxy_base()
    config = base / "config.properties"
    config.write_text(f"max_request_size={max_body}\n")
    upstream = FakeHTTP({"/ping": (200, b'{"status": "Healthy"}'), "/predictions/m": (200, b"{}")})
    nginx, port, token = start_nginx(base, upstream, workers=1, fd_limit=None, ts_config=config,
                                     PROXY_SPOOL_BYTES=str(budget))
    head = (f"POST /predictions/m HTTP/1.1\r\nHost: torchserve\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {max_body}\r\n\r\n").encode()
    trickling = []
    try:
        assert wait_for(lambda: ping(port, token) == 200 or nginx.poll() is not None, 30), "no answer"
        assert nginx.poll() is None, (base / "render.out").read_text()
        for _ in range(3):
            conn = socket.create_connection(("127.0.0.1", port), timeout=30)
            conn.sendall(head + b"x")
            trickling.append(conn)
        answers = []
        for conn in trickling:
            readable, _, _ = select.select([conn], [], [], 3)
            answers.append(conn.recv(4096).split(b"\r\n")[0] if readable else b"held")
        assert answers.count(b"held") == 1 and answers.count(b"HTTP/1.1 429 Too Many Requests") == 2, answers
        with socket.create_connection(("127.0.0.1", port), 30, ("127.0.0.2", 0)) as other:
            other.sendall(head + b"y" * max_body)
            assert other.recv(4096).startswith(b"HTTP/1.1 200 ")
        assert any(path == "/predictions/m" for _, path, _ in upstream.requests)
    finally:
        for conn in trickling:
            conn.close()
        nginx.terminate()
        nginx.wait(timeout=30)
        upstream.close()
        shutil.rmtree(base, ignore_errors=True)
