"""HTTP to TorchServe and the front proxy: sessions, the Authorization header, reading an error answer.

Below everything that talks to a server (core/torchserve.py, the client, the benchmark): one place that
decides how a session is made, when a key was refused and what one line an error answer becomes.
"""
from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import requests


def new_session(pool_size: int = 4) -> requests.Session:
    """A keep-alive session whose connection pool holds `pool_size` connections."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.trust_env = False  # never route through a proxy from the environment, nor use .netrc
    return session


def management_url_for(inference_url: str) -> str:
    """The management URL beside an inference URL: same host, the next port (8080 -> 8081)."""
    parts = urlsplit(inference_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname  # IPv6 keeps brackets
    return urlunsplit((parts.scheme, f"{host}:{port + 1}", "", "", ""))


def is_auth_error(response: requests.Response) -> bool:
    """True when the key or token was refused: TorchServe answers 400 InvalidKeyException, the proxy 401/403."""
    if response.status_code in (401, 403):
        return True
    if response.status_code != 400:
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("type") == "InvalidKeyException"


def error_message(response: requests.Response) -> str:
    """An error answer's message (TorchServe's "message", the handler's "error"), else its status line."""
    try:
        body = response.json()
        message = body.get("error") or body.get("message")
    except (ValueError, AttributeError):
        message = None
    return " ".join(str(message or response.reason or response.text[:200]).split())  # one line


def server_message(response: requests.Response) -> str:
    """TorchServe's error message ({"code", "type", "message"}), else the status line."""
    return f"HTTP {response.status_code}: {error_message(response)}"


def bearer(key: str | None) -> dict[str, str]:
    """The Authorization header of `key`, empty when there is none (auth disabled)."""
    return {"Authorization": f"Bearer {key}"} if key else {}
