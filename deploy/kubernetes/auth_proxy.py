"""Authorization in front of one replica's inference API, for the load-balanced inference Service.

Each TorchServe writes its own keys, so a request that a Service sends to a random replica
cannot carry the right one. This sidecar accepts one cluster-wide token (a Secret, compared in
constant time) and forwards the request to its own pod's TorchServe with that pod's inference
key, renewed with the API key when it expires. Authorization stays on at both hops; the
management API is never behind it. Fleet clients skip it and talk to each replica directly.

    python deploy/kubernetes/auth_proxy.py --listen 0.0.0.0:8090 --token-file /etc/ts-token/token \
        --key-file /keys/ts-0/key_file.json
"""
from __future__ import annotations

import argparse
import hmac
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

from core.torchserve import Keys, new_session, request_with_key

log = logging.getLogger("auth_proxy")
# Hop-by-hop headers (RFC 9110 7.6.1) and the ones this proxy sets itself.
DROPPED = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
           "transfer-encoding", "upgrade", "host", "authorization", "content-length"}


class Token:
    """The shared token from its file, re-read when a request's token does not match (rotation)."""

    def __init__(self, path: str):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._token = self._read()

    def _read(self) -> bytes:
        token = self.path.read_text(encoding="utf-8").strip().encode()
        if len(token) < 16:
            raise ValueError(f"{self.path}: the token must have at least 16 characters")
        return token

    def accepts(self, header: str | None) -> bool:
        """True when the Authorization header carries the token."""
        if not header or not header.startswith("Bearer "):
            return False
        given = header[len("Bearer "):].strip().encode()
        with self._lock:
            if hmac.compare_digest(given, self._token):
                return True
            try:  # a rotated Secret reaches the mounted file without a restart
                self._token = self._read()
            except (OSError, ValueError) as e:
                log.warning("cannot re-read %s: %s", self.path, e)
            return hmac.compare_digest(given, self._token)


def make_handler(backend: str, token: Token, keys: Keys, max_body: int, timeout: float):
    """The request handler class bound to one backend, token and key file."""
    sessions = threading.local()  # one keep-alive session per server thread

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (headers or {"Content-Type": "application/json"}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _forward(self) -> None:
            if not token.accepts(self.headers.get("Authorization")):
                self._reply(401, b'{"code": 401, "error": "missing or wrong bearer token"}')
                return
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                self._reply(411, b'{"code": 411, "error": "send Content-Length, not chunked"}')
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > max_body:
                self._reply(413, b'{"code": 413, "error": "request larger than max_request_size"}')
                self.close_connection = True
                return
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in DROPPED}
            if not hasattr(sessions, "session"):
                sessions.session = new_session(1)
            try:
                response = request_with_key(sessions.session, self.command, backend + self.path, keys,
                                            "inference", data=body, headers=headers, timeout=timeout)
            except requests.RequestException as e:
                self._reply(502, f'{{"code": 502, "error": "TorchServe: {type(e).__name__}"}}'.encode())
                return
            kept = {k: v for k, v in response.headers.items() if k.lower() not in DROPPED}
            self._reply(response.status_code, response.content, kept)

        do_GET = do_POST = do_PUT = do_DELETE = do_OPTIONS = _forward

        def log_message(self, format: str, *args) -> None:  # access logs would flood the pod's log
            log.debug(format, *args)

    return Handler


def get_args_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="0.0.0.0:8090", help="HOST:PORT to serve (default: %(default)s)")
    parser.add_argument("--backend", default="http://127.0.0.1:8080",
                        help="this pod's TorchServe inference URL (default: %(default)s)")
    parser.add_argument("--management-url", default="http://127.0.0.1:8081",
                        help="its management URL, for renewing the key (default: %(default)s)")
    parser.add_argument("--key-file", required=True, help="this pod's key_file.json")
    parser.add_argument("--token-file", required=True, help="the shared token clients send as Bearer")
    parser.add_argument("--max-body", type=int, default=67108864,
                        help="largest request body, TorchServe's max_request_size (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for TorchServe (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> int:
    """Serve until stopped."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    host, _, port = args.listen.rpartition(":")
    try:
        token = Token(args.token_file)
        server = ThreadingHTTPServer((host, int(port)), make_handler(
            args.backend.rstrip("/"), token, Keys(args.key_file, args.management_url.rstrip("/"), keys={}),
            args.max_body, args.timeout))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server.daemon_threads = True
    log.info("forwarding %s -> %s with the keys of %s", args.listen, args.backend, args.key_file)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
