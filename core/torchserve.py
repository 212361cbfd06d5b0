"""One client for TorchServe's APIs: inference, management and a server's state, one line per error.

It sits below training and the client (core/), so that every part of the project, deploy/ included,
talks to TorchServe through this one class; the credentials live in core/keys.py, the HTTP details in
core/http.py, and serve.sh's wait/status helper in core/readiness.py.
"""
from __future__ import annotations

import argparse
import json
import threading

import requests

from core.errors import BadAnswer, KeyRefused, Refused, ServerUnavailable
from core.http import is_auth_error, management_url_for, new_session, server_message
from core.keys import Keys, request_with_key

DEFAULT_INFERENCE_URL = "http://127.0.0.1:8080"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """--url, --management-url and the credentials: which one server a command talks to (a fleet of one)."""
    parser.add_argument("--url", default=None,
                        help=f"TorchServe inference URL (default: {DEFAULT_INFERENCE_URL})")
    parser.add_argument("--management-url", default=None,
                        help="management URL (default: the inference URL's host, port + 1)")
    parser.add_argument("--token-file", default=None,
                        help="the server's key_file.json (default: the one at the repository root)")
    parser.add_argument("--inference-token-file", default=None, metavar="FILE",
                        help="behind the front proxy: the file holding the inference token "
                             "(instead of a key_file.json)")
    parser.add_argument("--management-token-file", default=None, metavar="FILE",
                        help="behind the front proxy: the file holding the management token "
                             "(needed for register, scale, set-default, unregister, rollout)")


def ping(inference_url: str, keys: Keys | None = None, timeout: float = 2.0,
         session: requests.Session | None = None) -> str | None:
    """None when /ping answers Healthy, else why not; KeyRefused when the key or token is refused."""
    keys = keys or Keys(keys={})
    own = session is None
    session = session or new_session(1)
    try:
        response = request_with_key(session, "GET", f"{inference_url}/ping", keys, "inference",
                                    timeout=timeout)
    except requests.RequestException as e:
        return f"unreachable: no answer on {inference_url}/ping ({type(e).__name__})"
    finally:
        if own:
            session.close()
    if is_auth_error(response):
        raise KeyRefused(f"the server at {inference_url} refused the inference "
                         + ("key" if keys.key_file else "token") + f" from {keys.source}")
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code == 200 and isinstance(body, dict) and body.get("status") == "Healthy":
        return None
    return f"/ping answered {response.status_code}: {' '.join(response.text.split())[:200]}"


class TorchServe:
    """The management and inference APIs of one server, with its keys; errors become one line.

    Thread-safe: every thread gets its own keep-alive session (requests.Session is not meant to be
    shared across threads); close() closes them all.
    """

    def __init__(self, url: str, management_url: str | None = None, keys: Keys | None = None,
                 timeout: float = 10.0):
        self.url = url.rstrip("/")
        self.management_url = (management_url or management_url_for(self.url)).rstrip("/")
        self.keys = keys if keys is not None else Keys(None, self.management_url)
        self.timeout = timeout
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()

    def session(self) -> requests.Session:
        """This thread's keep-alive session with the server."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = new_session(2)
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        """Close every thread's session, and the keys' renewal session."""
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
        self.keys.close()

    def ping(self, timeout: float = 2.0) -> str | None:
        """None when /ping answers Healthy, else why not (see ping())."""
        return ping(self.url, self.keys, timeout, self.session())

    def call(self, method: str, path: str, what: str, ok_404: bool = False, **params) -> object:
        """One management request -> its JSON body; Refused with the server's message on an error."""
        params = {k: v for k, v in params.items() if v is not None}
        url = f"{self.management_url}{path}"
        try:
            response = request_with_key(self.session(), method, url, self.keys, "management",
                                        params=params, timeout=self.timeout)
        except requests.ConnectionError:
            raise ServerUnavailable(f"server unreachable at {self.management_url} (is TorchServe running? "
                                    f"scripts/serve.sh status)") from None
        except requests.Timeout:
            raise Refused(f"{what}: no answer within {self.timeout:g}s") from None
        except requests.RequestException as e:  # an invalid URL, a cut answer: one line, not a traceback
            raise Refused(f"{what}: {type(e).__name__}: {e}") from None
        if is_auth_error(response):
            if self.keys.token_file or self.keys.management_token_file:
                raise KeyRefused(f"{what}: the management API refused the token from {self.keys.source} "
                                 f"(writes need the management token: management_token_file, "
                                 f"--management-token-file)")
            if self.keys.key_file is None or not self.keys.key_file.is_file():
                missing = self.keys.key_file or "key file"
                raise KeyRefused(f"the server wants a key and there is no {missing}; pass the server's "
                                 f"key_file.json with --token-file (key_file in a fleet)")
            raise KeyRefused(f"the management API refused the key from {self.keys.key_file} and no fresh "
                             f"one could be had; pass the server's key_file.json with --token-file")
        if response.status_code == 404 and ok_404:
            return None
        if response.status_code >= 400:
            raise Refused(f"{what}: {server_message(response)}")
        try:
            return response.json()
        except ValueError:
            return {}

    def model_names(self) -> list[str]:
        """Names of the registered models, every page of GET /models."""
        names, token = [], None
        while True:
            body = self.call("GET", "/models", "list models", limit=100, next_page_token=token)
            models = body.get("models") if isinstance(body, dict) else None  # always there, if only []
            if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("modelName"), str)
                                                       for m in models):
                raise BadAnswer(f"list models: {self.management_url} answered {_excerpt(body)}, "
                                f"not TorchServe's model list")
            names += [m["modelName"] for m in models]
            token = body.get("nextPageToken")
            if not token:
                return names

    def versions(self, name: str) -> list[dict]:
        """Every registered version of `name` (TorchServe's describe), [] when not registered."""
        what = f"describe {name}"
        return checked_versions(self.call("GET", f"/models/{name}/all", what, ok_404=True), what, self.management_url)

    def describe(self, name: str, version: str | None = None, **params) -> list[dict]:
        """TorchServe's describe of `version` (None: the default version), [] when not registered."""
        path, what = f"/models/{name}" + (f"/{version}" if version else ""), f"describe {name} {version or ''}".strip()
        return checked_versions(self.call("GET", path, what, ok_404=True, **params), what, self.management_url)

    def default_version(self, name: str) -> str | None:
        """The version /predictions/NAME answers with, None when `name` is not registered."""
        body = self.describe(name)
        return body[0]["modelVersion"] if body else None

    def predict(self, name: str, version: str | None, data: bytes,
                content_type: str = "application/octet-stream",
                timeout: float | None = None) -> requests.Response:
        """POST one body to /predictions/NAME[/VERSION] with the inference key (renewed once if refused)."""
        url = f"{self.url}/predictions/{name}" + (f"/{version}" if version else "")
        return request_with_key(self.session(), "POST", url, self.keys, "inference", data=data,
                                timeout=timeout or self.timeout, headers={"Content-Type": content_type})


def checked_versions(body: object, what: str, url: str) -> list[dict]:
    """A describe's answer -> its versions, each a dict with a modelVersion and a list of worker dicts;
    None (404) -> []; BadAnswer for anything else, so that no caller reads a field that is not there."""
    if body is None:
        return []
    if isinstance(body, list) and all(
            isinstance(e, dict) and isinstance(e.get("modelVersion"), str) and e["modelVersion"]
            and isinstance(e.get("workers", []), list) and all(isinstance(w, dict) for w in e.get("workers", []))
            for e in body):
        return body
    raise BadAnswer(f"{what}: {url} answered {_excerpt(body)}, not a list of model versions")


def _excerpt(body: object) -> str:
    """The start of an answer, one line, for an error message."""
    return " ".join(json.dumps(body, default=str)[:120].split())


def format_version(entry: dict, default: str | None) -> str:
    """One line: version, default mark, workers by status, batching and the archive."""
    states = [w.get("status", "?") for w in entry.get("workers", [])]
    counts = ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states))) or "no workers"
    mark = " (default)" if entry["modelVersion"] == default else ""
    return (f"{entry['modelName']} {entry['modelVersion']}{mark}: workers {counts} (min "
            f"{entry.get('minWorkers')}, max {entry.get('maxWorkers')}), batch {entry.get('batchSize')}, "
            f"delay {entry.get('maxBatchDelay')} ms, queue {pending_requests(entry)}, "
            f"{entry.get('modelUrl')}")


def pending_requests(entry: dict) -> int:
    """Requests waiting in a version's queue (not those a worker already took)."""
    return int((entry.get("jobQueueStatus") or {}).get("pendingRequests", 0))


def unready_models(server: TorchServe) -> list[str]:
    """Model versions that have no READY worker yet, as "name/version (worker states)"."""
    waiting = []
    for name in server.model_names():
        for entry in server.versions(name):
            states = [w.get("status", "?") for w in entry.get("workers", [])]
            if "READY" not in states:
                waiting.append(f"{name}/{entry['modelVersion']} ({', '.join(states) or 'no workers'})")
    return waiting
