"""One client for TorchServe's APIs: keys, sessions, inference, management and readiness.

TorchServe 0.12 enforces token authorization: `torchserve --start` writes key_file.json
in its working folder (the repository root, beside config.properties, for serve.sh).
Inference and management keys expire after 60 minutes and change on every restart; the
API key can ask the management API for a fresh inference or management key.

It sits below training and the client (core/), so that every part of the project, deploy/ included,
talks to TorchServe through this one module. As a command it is what scripts/serve.sh runs to wait
for a server and print its status:
    python -m core.torchserve wait|status --url URL --management-url URL --key-file PATH
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from typing import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import requests

from core.errors import KeyRefused, Refused, ServerUnavailable, command

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_KEY_FILE = REPO_ROOT / "key_file.json"  # where serve.sh runs torchserve
DEFAULT_INFERENCE_URL = "http://127.0.0.1:8080"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"
KEY_KINDS = ("inference", "management", "API")


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


TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]{32,512}")


def read_token(path: str | os.PathLike) -> str:
    """The bearer token to send from a token file: its first token line.

    The rule deploy/nginx/render.sh reads the same file by: one token a line (two during a
    rotation), each line stripped, blank lines and #-comments skipped, 32 to 512 characters of
    letters, digits and . _ ~ + / = -. nginx accepts every line; a client sends the first, so a
    rotation puts the new token first only once every proxy accepts it (docs/security.md).
    """
    tokens = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), 1):  # as render.sh
        token = line.replace("\r", "").strip()
        if not token or token.startswith("#"):
            continue
        if not TOKEN_CHARS.fullmatch(token):
            raise ValueError(f"line {number}: a token is 32 to 512 letters, digits or . _ ~ + / = - "
                             f"(found {len(token)} characters)")
        tokens.append(token)
    if not tokens:
        raise ValueError("the token file holds no token")
    return tokens[0]


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is replaced or rewritten (a Kubernetes Secret update swaps a link)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


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


def new_session(pool_size: int = 4) -> requests.Session:
    """A keep-alive session whose connection pool holds `pool_size` connections."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.trust_env = False  # never route through a proxy from the environment, nor use .netrc
    return session


class Keys:
    """Thread-safe holder of one server's credentials, re-read or renewed when the server rejects one.

    Either TorchServe's own key_file.json (token authorization on: inference, management and API
    keys; an expired key is renewed with the API key) or the front proxy's tokens (token_file for
    inference and read-only management calls, management_token_file for every management call),
    re-read from their files when refused or when a token file changes, so a rotated token is
    picked up before the proxy drops the old one. The files are read on first use: an unreadable
    one is that server's ServerUnavailable, not a crash at start.
    """

    def __init__(self, key_file: str | os.PathLike | None = None, management_url: str | None = None,
                 keys: dict[str, str] | None = None, default_file: bool = True, *,
                 token_file: str | os.PathLike | None = None,
                 management_token_file: str | os.PathLike | None = None):
        # default_file=False (a fleet's replica): no key_file means no keys, never the local server's
        use_key_file = (key_file or default_file) and not (token_file or management_token_file)
        self.key_file = find_key_file(key_file) if use_key_file else None
        self.token_file = Path(token_file).expanduser() if token_file else None
        self.management_token_file = Path(management_token_file).expanduser() if management_token_file else None
        self.management_url = management_url
        self._lock = threading.Lock()  # guards _keys only: never held across I/O
        self._renewing = threading.Lock()  # one renewal at a time; readers of the keys never wait for it
        self._keys = dict(keys) if keys is not None else None
        self._session: requests.Session | None = None
        self._token_files = [f for f in (self.token_file, self.management_token_file) if f]
        self._signatures = self._token_signatures() if self._token_files else None

    def _token_signatures(self) -> list:
        return [file_signature(f) for f in self._token_files]

    @property
    def source(self) -> str:
        """Where the credentials come from, for error messages."""
        files = [str(f) for f in (self.key_file, self.token_file, self.management_token_file) if f]
        return ", ".join(files) or "no key file"

    def _read(self) -> dict[str, str]:
        keys: dict[str, str] = {}
        for path, kinds in ((self.token_file, ("inference",)), (self.management_token_file, ("management",))):
            if path is not None:
                try:
                    keys.update(dict.fromkeys(kinds, read_token(path)))
                except (OSError, ValueError) as e:
                    raise ServerUnavailable(f"cannot read token file {path}: {getattr(e, 'strerror', None) or e}"
                                            ) from None
        if self.token_file and "management" not in keys:
            keys["management"] = keys["inference"]  # the proxy lets either token read; writes are refused
        if self.key_file is None:
            return keys
        for attempt in range(20):  # the server may be writing the file right now
            try:
                return read_keys(self.key_file)
            except FileNotFoundError:
                return {}
            except (OSError, ValueError) as e:
                if attempt == 19:
                    raise ServerUnavailable(f"cannot read key file {self.key_file}: "
                                            f"{getattr(e, 'strerror', None) or e}") from None
                time.sleep(0.05)
        return {}

    def get(self, kind: str) -> str | None:
        """The current key of `kind` ("inference", "management", "API"), or None."""
        signatures = self._token_signatures() if self._token_files else None
        with self._lock:
            if self._keys is not None and signatures == self._signatures:
                return self._keys.get(kind)
        try:
            fresh = self._read()
        except ServerUnavailable:
            with self._lock:  # a token file caught mid-rewrite: keep the last good token, look again
                if self._keys is not None:
                    return self._keys.get(kind)
            raise
        with self._lock:
            if self._keys is None or signatures != self._signatures:
                self._keys, self._signatures = fresh, signatures
            return self._keys.get(kind)

    def headers(self, kind: str) -> dict[str, str]:
        """The Authorization header for `kind`, empty when there is no key (auth disabled)."""
        key = self.get(kind)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _replace(self, fresh: dict[str, str], kind: str, rejected: str | None) -> bool:
        if fresh.get(kind) and fresh.get(kind) != rejected:
            with self._lock:
                self._keys = fresh
            return True
        return False

    def refresh(self, kind: str, rejected: str | None) -> bool:
        """After `rejected` was refused: re-read the files, else ask for a new key; True if renewed."""
        with self._renewing:
            if self.get(kind) != rejected:
                return True  # another thread renewed it already
            fresh = self._read()
            if self._replace(fresh, kind, rejected):
                return True
            api_key = fresh.get("API") or self.get("API")
            if kind == "API" or not api_key or not self.management_url or self.key_file is None:
                return False
            if self._session is None:
                self._session = new_session(1)
            try:  # TorchServe answers with an empty body and rewrites the key file
                response = self._session.get(f"{self.management_url}/token", params={"type": kind},
                                             headers={"Authorization": f"Bearer {api_key}"}, timeout=10)
            except requests.RequestException:
                return False
            return response.status_code == 200 and self._replace(self._read(), kind, rejected)


def request_with_key(session: requests.Session, method: str, url: str, keys: Keys, kind: str,
                     **kwargs) -> requests.Response:
    """Send a request with the `kind` key; on a key rejection refresh it once and resend."""
    extra = kwargs.pop("headers", None) or {}
    sent = keys.get(kind)
    response = session.request(method, url, headers={**extra, **keys.headers(kind)}, **kwargs)
    if is_auth_error(response) and keys.refresh(kind, sent):
        response = session.request(method, url, headers={**extra, **keys.headers(kind)}, **kwargs)
    return response


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
        """Close every thread's session."""
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

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
            names += [m["modelName"] for m in body.get("models", [])]
            token = body.get("nextPageToken")
            if not token:
                return names

    def versions(self, name: str) -> list[dict]:
        """Every registered version of `name` (TorchServe's describe), [] when not registered."""
        return self.call("GET", f"/models/{name}/all", f"describe {name}", ok_404=True) or []

    def describe(self, name: str, version: str | None = None, **params) -> list[dict]:
        """TorchServe's describe of `version` (None: the default version), [] when not registered."""
        path = f"/models/{name}" + (f"/{version}" if version else "")
        return self.call("GET", path, f"describe {name} {version or ''}".strip(), ok_404=True, **params) or []

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


def server_message(response: requests.Response) -> str:
    """TorchServe's error message ({"code", "type", "message"}), else the status line."""
    return f"HTTP {response.status_code}: {error_message(response)}"


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


LOAD_FAILED = re.compile(r"Load model failed: (\S+), error: Worker died")
LOAD_FAILURES_TO_GIVE_UP = 3  # TorchServe retries a dying worker for ever; the third death of a model's
                              # workers at load says each retry fails alike (a missing module, a bad file)


def load_failures(log: str | os.PathLike, offset: int = 0) -> Callable[[], str | None]:
    """A check for wait_ready: why to give up, once TorchServe's log (ts_log.log), from `offset` on,
    shows LOAD_FAILURES_TO_GIVE_UP deaths at load of one model's workers; None before that."""
    def failing() -> str | None:
        try:
            with open(log, "rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return None
        deaths = Counter(LOAD_FAILED.findall(text))
        for model, count in deaths.items():
            if count >= LOAD_FAILURES_TO_GIVE_UP:
                return f"the workers of {model} died {count} times while loading it (TorchServe retries for ever)"
        return None
    return failing


def wait_ready(server: TorchServe, timeout: float, alive=lambda: True,
               failing: Callable[[], str | None] = lambda: None) -> str | None:
    """Poll until /ping is healthy and every model has a READY worker: None, or why not (the server
    exited, `failing` gave a reason, or `timeout` seconds passed)."""
    deadline = time.monotonic() + timeout
    why = "no answer on /ping"
    while time.monotonic() < deadline:
        if not alive():
            return "the server process exited"
        given_up = failing()
        if given_up:
            return given_up
        try:
            why = server.ping()
        except KeyRefused as e:
            return str(e)
        except ServerUnavailable as e:  # the key file unreadable: perhaps half written, so read it again
            why = str(e)
        if why is None:
            try:
                waiting = unready_models(server)
                if not waiting:
                    return None
                why = "waiting for a READY worker: " + "; ".join(waiting)
            except (ServerUnavailable, Refused, ValueError) as e:
                why = f"management API: {e}"
        time.sleep(0.5)
    return why


def format_status(server: TorchServe) -> str:
    """Models, versions, the default version and workers, one line per version."""
    lines = []
    for name in server.model_names():
        default = server.default_version(name)
        for entry in server.versions(name):
            workers = ", ".join(f"{w.get('id')}:{w.get('status')} pid {w.get('pid')}"
                                for w in entry.get("workers", [])) or "none"
            mark = " (default)" if entry["modelVersion"] == default else ""
            lines.append(f"{name} {entry['modelVersion']}{mark}: batch {entry.get('batchSize')}, "
                         f"workers {workers}")
    return "\n".join(lines) or "no models registered"


def get_args_parser() -> argparse.ArgumentParser:
    """The serve.sh helper's command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("wait", "status"), help="wait for readiness, or print status")
    parser.add_argument("--url", default=DEFAULT_INFERENCE_URL, help="inference URL")
    parser.add_argument("--management-url", default=DEFAULT_MANAGEMENT_URL, help="management URL")
    parser.add_argument("--key-file", default=str(DEFAULT_KEY_FILE), help="the server's key_file.json")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds `wait` waits")
    parser.add_argument("--pid", type=int, default=0, help="`wait` gives up when this process exits")
    parser.add_argument("--log", default=None, help="`wait` gives up when this ts_log.log shows a model's "
                                                    "workers dying at load again and again")
    parser.add_argument("--log-offset", type=int, default=0, help="where this start's lines begin in --log")
    return parser


def pid_alive(pid: int) -> bool:
    """Whether a process of that pid exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def main(args: argparse.Namespace) -> int:
    """Run `wait` or `status`; the exit code says whether it worked."""
    if args.command == "status":
        server = TorchServe(args.url, args.management_url, Keys(args.key_file, args.management_url))
        try:
            why = server.ping()
        except KeyRefused as e:
            why = str(e)
        if why:
            print(f"error: {why}", file=sys.stderr)
            return 1
        try:
            print(format_status(server))
        except (ServerUnavailable, Refused) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    key_file = find_key_file(args.key_file)
    deadline = time.monotonic() + args.timeout
    while not key_file.exists() and time.monotonic() < deadline:  # written at startup
        if args.pid and not pid_alive(args.pid):
            break
        time.sleep(0.2)
    server = TorchServe(args.url, args.management_url, Keys(key_file, args.management_url))
    why = wait_ready(server, max(0.0, deadline - time.monotonic()),
                     alive=lambda: not args.pid or pid_alive(args.pid),
                     failing=load_failures(args.log, args.log_offset) if args.log else lambda: None)
    if why:
        print(why, file=sys.stderr)
        return 1
    return 0


cli = command(main, get_args_parser)  # scripts/serve.sh's helper: a known error is one line, never a traceback


if __name__ == "__main__":
    cli()
