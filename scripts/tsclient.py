"""Small TorchServe client helpers shared by the scripts: keys, sessions, URLs, model queries.

TorchServe 0.12 enforces token authorization: `torchserve --start` writes key_file.json
in its working folder (the repository root, beside config.properties, for serve.sh).
Inference and management keys expire after 60 minutes and change on every restart; the
API key can ask the management API for a fresh inference or management key.

As a command, it is what scripts/serve.sh uses to wait for the server and print status
(the code is in readiness.py):
    python scripts/tsclient.py wait|status --management-url URL --key-file PATH
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_KEY_FILE = REPO_ROOT / "key_file.json"  # where serve.sh runs torchserve
DEFAULT_INFERENCE_URL = "http://127.0.0.1:8080"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"
KEY_KINDS = ("inference", "management", "API")


class KeyRejected(Exception):
    """The server refused our key and no fresh one could be found."""


def find_key_file(path: str | os.PathLike | None = None) -> Path:
    """The key file to use: `path` when given, else key_file.json at the repository root."""
    return Path(path).expanduser() if path else DEFAULT_KEY_FILE


def read_keys(path: str | os.PathLike) -> dict[str, str]:
    """key_file.json -> {"inference": key, "management": key, "API": key} (missing kinds left out)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    keys = {}
    for kind in KEY_KINDS:
        entry = data.get(kind) if isinstance(data, dict) else None
        if isinstance(entry, dict) and isinstance(entry.get("key"), str):
            keys[kind] = entry["key"]
    return keys


def management_url_for(inference_url: str) -> str:
    """The management URL beside an inference URL: same host, the next port (8080 -> 8081)."""
    parts = urlsplit(inference_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return urlunsplit((parts.scheme, f"{parts.hostname}:{port + 1}", "", "", ""))


def is_auth_error(response: requests.Response) -> bool:
    """True when TorchServe refused the request's key (it answers 400 InvalidKeyException)."""
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
    return str(message or response.reason or response.text[:200])


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """--url, --management-url and --token-file: which server a command talks to, with which keys."""
    parser.add_argument("--url", default=DEFAULT_INFERENCE_URL,
                        help="TorchServe inference URL (default: %(default)s)")
    parser.add_argument("--management-url", default=None,
                        help="management URL (default: the inference URL's host, port + 1)")
    parser.add_argument("--token-file", default=None,
                        help="the server's key_file.json (default: the one at the repository root)")


def new_session(pool_size: int = 4) -> requests.Session:
    """A keep-alive session whose connection pool holds `pool_size` connections."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.trust_env = False  # loopback server: never route through a proxy from the environment
    return session


class Keys:
    """Thread-safe holder of the server's keys, re-read or renewed when the server rejects one."""

    def __init__(self, key_file: str | os.PathLike | None = None, management_url: str | None = None,
                 keys: dict[str, str] | None = None):
        self.key_file = find_key_file(key_file)
        self.management_url = management_url
        self._lock = threading.Lock()
        self._keys = dict(keys) if keys is not None else self._read()

    def _read(self) -> dict[str, str]:
        for attempt in range(20):  # the server may be writing the file right now
            try:
                return read_keys(self.key_file)
            except FileNotFoundError:
                return {}
            except (OSError, ValueError) as e:
                if attempt == 19:
                    raise KeyRejected(f"cannot read key file {self.key_file}: {e}") from None
                time.sleep(0.05)
        return {}

    def get(self, kind: str) -> str | None:
        """The current key of `kind` ("inference", "management", "API"), or None."""
        with self._lock:
            return self._keys.get(kind)

    def headers(self, kind: str) -> dict[str, str]:
        """The Authorization header for `kind`, empty when there is no key (auth disabled)."""
        key = self.get(kind)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def refresh(self, kind: str, rejected: str | None) -> bool:
        """After `rejected` was refused: re-read the file, else ask for a new key; True if renewed."""
        with self._lock:
            if self._keys.get(kind) != rejected:
                return True  # another thread renewed it already
            fresh = self._read()
            if fresh.get(kind) and fresh.get(kind) != rejected:
                self._keys = fresh
                return True
            api_key = fresh.get("API") or self._keys.get("API")
            if kind == "API" or not api_key or not self.management_url:
                return False
            try:  # TorchServe answers with an empty body and rewrites the key file
                response = requests.get(f"{self.management_url}/token", params={"type": kind},
                                        headers={"Authorization": f"Bearer {api_key}"}, timeout=10)
            except requests.RequestException:
                return False
            if response.status_code != 200:
                return False
            fresh = self._read()
            if fresh.get(kind) and fresh.get(kind) != rejected:
                self._keys = fresh
                return True
            return False


def request_with_key(session: requests.Session, method: str, url: str, keys: Keys, kind: str,
                     **kwargs) -> requests.Response:
    """Send a request with the `kind` key; on a key rejection refresh it once and resend."""
    extra = kwargs.pop("headers", None) or {}
    sent = keys.get(kind)
    response = session.request(method, url, headers={**extra, **keys.headers(kind)}, **kwargs)
    if is_auth_error(response) and keys.refresh(kind, sent):
        response = session.request(method, url, headers={**extra, **keys.headers(kind)}, **kwargs)
    return response


def ping(inference_url: str, keys: Keys | None = None, timeout: float = 2.0) -> str | None:
    """None when /ping answers Healthy, else what it answered (0.12 wants the inference key)."""
    keys = keys or Keys(keys={})
    try:
        response = request_with_key(new_session(1), "GET", f"{inference_url}/ping", keys, "inference",
                                    timeout=timeout)
    except requests.RequestException as e:
        return f"no answer on {inference_url}/ping ({type(e).__name__})"
    try:
        if response.status_code == 200 and response.json().get("status") == "Healthy":
            return None
    except ValueError:
        pass
    return f"/ping answered {response.status_code}: {response.text.strip()[:200]}"


def list_models(management_url: str, keys: Keys, session: requests.Session | None = None) -> list[str]:
    """Names of the registered models."""
    session = session or new_session()
    names, token = [], None
    while True:
        params = {"limit": 100, **({"next_page_token": token} if token else {})}
        response = request_with_key(session, "GET", f"{management_url}/models", keys, "management",
                                    params=params, timeout=10)
        response.raise_for_status()
        body = response.json()
        names += [m["modelName"] for m in body.get("models", [])]
        token = body.get("nextPageToken")
        if not token:
            return names


def describe(management_url: str, keys: Keys, model: str, version: str | None = None,
             session: requests.Session | None = None) -> list[dict]:
    """Management describe of a model: every version ("all") or one; [] when not registered."""
    session = session or new_session()
    url = f"{management_url}/models/{model}/{version or 'all'}"
    response = request_with_key(session, "GET", url, keys, "management", timeout=10)
    if response.status_code == 404:
        return []
    if is_auth_error(response):
        raise KeyRejected(f"the management API refused the key from {keys.key_file}")
    response.raise_for_status()
    return response.json()


def default_version(management_url: str, keys: Keys, model: str,
                    session: requests.Session | None = None) -> str | None:
    """The version TorchServe routes /predictions/MODEL to, or None when not registered."""
    session = session or new_session()
    response = request_with_key(session, "GET", f"{management_url}/models/{model}", keys,
                                "management", timeout=10)
    if response.status_code == 404:
        return None
    response.raise_for_status()
    versions = response.json()
    return versions[0]["modelVersion"] if versions else None


if __name__ == "__main__":  # the serve.sh helper; its code is in readiness.py
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from scripts import readiness

    sys.exit(readiness.main(readiness.get_args_parser().parse_args()))
