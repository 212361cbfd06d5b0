"""The management and inference APIs of one TorchServe for manage.py, how a version is shown, and
what the server's logs (when local) add: a worker's reason to fail, the batches workers hold."""
from __future__ import annotations

import argparse
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import requests

from scripts import tsclient
from training.errors import UserError


class Refused(Exception):
    """The server refused an operation, or a rollout failed and was rolled back: exit code 1."""


class Client:
    """The management and inference APIs of one server, with its keys; errors become one line."""

    def __init__(self, args: argparse.Namespace):
        self.url = args.url.rstrip("/")
        self.management_url = (args.management_url or tsclient.management_url_for(self.url)).rstrip("/")
        if args.token_file and not Path(args.token_file).is_file():
            raise UserError(f"--token-file not found: {args.token_file}")
        self.keys = tsclient.Keys(args.token_file, self.management_url)
        self.timeout = args.timeout
        self.session = tsclient.new_session()
        self._local = threading.local()  # the smoke test's threads: one keep-alive session each

    def call(self, method: str, path: str, what: str, ok_404: bool = False, **params) -> object:
        """One management request -> its JSON body; Refused with the server's message on an error."""
        params = {k: v for k, v in params.items() if v is not None}
        url = f"{self.management_url}{path}"
        try:
            response = tsclient.request_with_key(self.session, method, url, self.keys, "management",
                                                 params=params, timeout=self.timeout)
        except requests.ConnectionError:
            raise UserError(f"server unreachable at {self.management_url} (is TorchServe running? "
                            f"scripts/serve.sh status)") from None
        except requests.Timeout:
            raise Refused(f"{what}: no answer within {self.timeout:g}s") from None
        if tsclient.is_auth_error(response):
            if not self.keys.key_file.is_file():
                raise UserError(f"the server wants a key and there is no {self.keys.key_file}; pass the "
                                f"server's key_file.json with --token-file")
            raise UserError(f"the management API refused the key from {self.keys.key_file} and no fresh "
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

    def default_version(self, name: str) -> str | None:
        """The version /predictions/NAME answers with, None when `name` is not registered."""
        body = self.call("GET", f"/models/{name}", f"describe {name}", ok_404=True)
        return body[0]["modelVersion"] if body else None

    def predict(self, name: str, version: str, data: bytes) -> requests.Response:
        """POST one image to /predictions/NAME/VERSION with the inference key."""
        if not hasattr(self._local, "session"):
            self._local.session = tsclient.new_session(1)
        url = f"{self.url}/predictions/{name}/{version}"
        return tsclient.request_with_key(self._local.session, "POST", url, self.keys, "inference",
                                         data=data, timeout=self.timeout,
                                         headers={"Content-Type": "application/octet-stream"})


def server_message(response: requests.Response) -> str:
    """TorchServe's error message ({"code", "type", "message"}), else the status line."""
    return f"HTTP {response.status_code}: {tsclient.error_message(response)}"


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


def worker_thread(name: str, version: str) -> str:
    """A regex of the frontend's thread name for the workers of NAME VERSION (W-<id>-NAME_VERSION)."""
    return rf"W-(\d+)-{re.escape(name)}_{re.escape(version)}"


class LogTail:
    """The complete lines a server log gets after a point, read as they come (rotation restarts it)."""

    def __init__(self, path: Path, from_end: bool = True):
        self.path = path
        self.offset = self.size() if from_end else 0

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def new_lines(self) -> Iterator[str]:
        """Lines written since the last call; a partial last line waits for the next call."""
        if self.size() < self.offset:  # rolled over to a fresh file
            self.offset = 0
        try:
            with open(self.path, "rb") as log:
                log.seek(self.offset)
                for raw in log:
                    if not raw.endswith(b"\n"):
                        return
                    self.offset += len(raw)
                    yield raw.decode("utf-8", "replace")
        except OSError:
            return


EXCEPTION_LINE = re.compile(r"^(?:\w+\.)*\w*(?:Error|Exception|Exit|Interrupt)\b(?::.*)?$")


def worker_failure(log: LogTail, name: str, version: str) -> str | None:
    """The last exception line the workers of NAME VERSION wrote to model_log.log since `log`'s offset."""
    thread = re.compile(worker_thread(name, version) + r"-std(?:out|err) MODEL_LOG - (.*)$")
    reason = None
    for line in log.new_lines():
        match = thread.search(line.rstrip("\n"))
        if match and EXCEPTION_LINE.match(match.group(2).strip()):
            reason = match.group(2).strip()
    return reason


class BatchWatch:
    """Which workers of NAME VERSION hold a batch, from the frontend's ts_log.log.

    TorchServe's WorkerThread logs "Looping backend response" once it has sent a batch to its
    worker and "Backend response time" once every answer of it is out; the management API shows
    neither (a batch a worker holds has left pendingRequests). The log is the certain signal.
    """

    def __init__(self, log_dir: Path, name: str, version: str):
        self.log = LogTail(log_dir / "ts_log.log", from_end=False)
        self.pattern = re.compile(worker_thread(name, version)
                                  + r" org\.pytorch\.serve\.wlm\.WorkerThread - "
                                    r"(Looping backend response|Backend response time)")
        self.holding: dict[str, bool] = {}  # worker id -> between the two lines

    def busy(self, worker_ids: list[str]) -> set[str] | None:
        """The workers among `worker_ids` inside a batch; None when the log never mentions any of them."""
        for line in self.log.new_lines():
            match = self.pattern.search(line)
            if match:
                self.holding[match.group(1)] = match.group(2).startswith("Looping")
        if not any(w in self.holding for w in worker_ids):
            return None
        return {w for w in worker_ids if self.holding.get(w)}
