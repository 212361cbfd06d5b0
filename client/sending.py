"""The directory classifier's sending side: the server and model checks before a run, one POST
per file with retries and key renewal, and the version each answer came from.
"""
from __future__ import annotations

import argparse
import logging
import random
import threading
import time
from pathlib import Path

import requests

from client.errors import Refused, ServerUnavailable, UserError
from client.pixels import BadImage, Prepare, send_file
from client.results import error_row, ok_row
from client.torchserve import TorchServe, error_message, is_auth_error, new_session, ping
from client.walk import DEFAULT_MAX_BYTES, NotSent, read_image

logger = logging.getLogger("classify_dir")
TRANSIENT_STATUSES = (502, 503, 504, 507)  # busy, queue full, out of memory: worth another try
MAX_BACKOFF_S = 8.0
KEY_REFRESHES = 3  # per file: a rotated key is renewed, a wrong one is not renewed forever
VERSION_RETRY_S = 5.0  # after a failed default-version lookup, reuse the last answer this long


class VersionTracker:
    """The version that answered when the server does not say (no X-Model-Version header).

    --version pins it. Otherwise the management API's default version, looked up again
    whenever the last lookup was sent before the request was: a request sent after a
    set-default is labelled with the new version; only one in flight across the switch
    can be labelled new while the old version answered it. Lookups are shared between
    threads, so it costs about one per batch of answers.
    """

    def __init__(self, server: TorchServe, model: str, pinned: str | None):
        self.server, self.model, self.pinned = server, model, pinned
        self._lock = threading.Lock()
        self._value: str | None = pinned
        self._looked_at = float("-inf")  # when the last lookup was sent (time.monotonic)

    def version_for(self, sent_at: float) -> str | None:
        """The version for a request sent at `sent_at` (time.monotonic)."""
        if self.pinned:
            return self.pinned
        with self._lock:
            if self._looked_at < sent_at:
                looked_at = time.monotonic()
                try:
                    self._value = self.server.default_version(self.model)
                    self._looked_at = looked_at
                except (ServerUnavailable, Refused, ValueError, LookupError) as e:
                    logger.debug("default version unknown: %s", e)
                    self._looked_at = looked_at + VERSION_RETRY_S  # do not ask once per answer
            return self._value


class Classifier:
    """Sends one file, with retries and key renewal; thread-safe, one keep-alive session per thread."""

    def __init__(self, server: TorchServe, model: str, version: str | None, versions: VersionTracker, *,
                 topk: int, retries: int, timeout: float, max_bytes: int = DEFAULT_MAX_BYTES,
                 prepare: Prepare = send_file):
        self.endpoint = f"{server.url}/predictions/{model}" + (f"/{version}" if version else "")
        self.server, self.keys = server, server.keys
        self.model, self.version, self.versions = model, version, versions
        self.topk, self.retries, self.timeout, self.max_bytes = topk, retries, timeout, max_bytes
        self.prepare = prepare  # file bytes -> (body, content type): the file, or its pixels (--preprocess)
        self.abort = threading.Event()
        self._local = threading.local()

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = new_session(pool_size=2)
        return self._local.session

    def classify(self, path: Path, rel: str) -> tuple[dict, str | None] | None:
        """One file -> (row, failure reason or None); None when the run was aborted first."""
        row = {"path": rel, "model": self.model}
        started = time.perf_counter()
        try:
            data, content_type = self.prepare(read_image(path, self.max_bytes))
        except NotSent as e:
            return error_row(row, str(e), None), e.reason
        except BadImage as e:  # refused here by the server's own check: its message, code, and time taken
            row["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
            return error_row(row, e.message, e.code), f"http {e.code}"
        attempt, refreshes = 0, 0
        while not self.abort.is_set():
            key = self.keys.get("inference")
            headers = {"Content-Type": content_type, **self.keys.headers("inference")}
            started, sent_at = time.perf_counter(), time.monotonic()
            try:
                response = self._session().post(self.endpoint, data=data, headers=headers,
                                                timeout=self.timeout)
                transient = response.status_code in TRANSIENT_STATUSES
                reason = f"http {response.status_code}"
            except requests.Timeout:
                response, transient, reason = None, True, "timeout"
            except requests.RequestException:  # refused, reset, or cut partway through the answer
                response, transient, reason = None, True, "connection"
            row["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
            if response is not None and is_auth_error(response):
                refreshes += 1
                if refreshes <= KEY_REFRESHES and self.keys.refresh("inference", key):
                    continue
                source = f"from {self.keys.key_file}" if self.keys.key_file else "(no key file given)"
                raise ServerUnavailable(f"the server refused the inference key {source} and no fresh key "
                                        f"could be read or requested; pass the right file with --token-file")
            if response is not None and response.status_code == 404 and _is_unknown_model(response):
                message = error_message(response) or f"HTTP {response.status_code}"
                raise ServerUnavailable(f"{self.endpoint}: {message}")
            if response is not None and response.status_code == 503 and attempt >= self.retries:
                self._stop_without_workers()
            if transient and attempt < self.retries:
                self.abort.wait(min(MAX_BACKOFF_S, 0.25 * 2 ** attempt) * random.uniform(0.75, 1.25))
                attempt += 1
                continue
            if response is None:
                if reason == "connection":
                    raise ServerUnavailable(f"server unreachable at {self.endpoint} after {self.retries} retries")
                return error_row(row, f"no answer within {self.timeout:g}s "
                                      f"(tried {attempt + 1} times)", None), reason
            row["model_version"] = (response.headers.get("X-Model-Version")
                                    or self.versions.version_for(sent_at))
            if response.status_code == 200:
                try:
                    return ok_row(row, response.json(), self.topk), None
                except (ValueError, KeyError, IndexError, TypeError):
                    return error_row(row, f"unexpected answer: {response.text[:200]}", 200), "bad answer"
            message = error_message(response) or f"HTTP {response.status_code}"
            return error_row(row, message, response.status_code), reason
        return None


    def _stop_without_workers(self) -> None:
        """After a last 503: ServerUnavailable when no worker of the version is READY (all would be 503)."""
        found = version_workers(self.server, self.model, self.version)
        if found is not None and not has_ready_worker(found[1]):
            raise ServerUnavailable(f"model '{self.model}' version {found[0]} has no READY worker and "
                                    f"answers 503; add one: scripts/manage.py scale {self.model} "
                                    f"{found[0]} --min 1")


def has_ready_worker(workers: list) -> bool:
    """True when one of describe's workers is READY, i.e. the version can answer now."""
    return any(isinstance(w, dict) and w.get("status") == "READY" for w in workers)


def version_workers(server: TorchServe, model: str, version: str | None) -> tuple[str, list[dict]] | None:
    """(version, its workers) for `version` (None: the default) from the management API; None if unknown."""
    try:
        description = server.describe(model, version)[0]
        return str(description["modelVersion"]), list(description.get("workers") or [])
    except (ServerUnavailable, Refused, ValueError, LookupError, TypeError) as e:
        logger.debug("workers of %s unknown: %s", model, e)
        return None


def check_workers(server: TorchServe, model: str, version: str | None) -> None:
    """Before a run: ServerUnavailable when the version has no worker at all, so nothing could answer."""
    found = version_workers(server, model, version)
    if found is not None and not found[1]:
        raise ServerUnavailable(f"model '{model}' version {found[0]} has no worker, so every request "
                                f"would get 503; add one: scripts/manage.py scale {model} {found[0]} --min 1")


def check_ready(server: TorchServe, model: str, version: str | None) -> None:
    """Before a replica is put back in: ServerUnavailable unless the version is there with a READY worker."""
    try:
        description = server.describe(model, version)
    except Refused as e:
        raise ServerUnavailable(str(e)) from None
    if not description:
        raise ServerUnavailable(f"model '{model}'" + (f" version {version}" if version else "")
                                + f" is not registered on {server.management_url}")
    entry = description[0] if isinstance(description[0], dict) else {}
    if not has_ready_worker(entry.get("workers") or []):
        raise ServerUnavailable(f"model '{model}' version {entry.get('modelVersion')} has no READY "
                                f"worker on {server.management_url}")


def _is_unknown_model(response: requests.Response) -> bool:
    try:
        return response.json().get("type") in ("ModelNotFoundException", "ModelVersionNotFoundException")
    except (ValueError, AttributeError):
        return False


def resolve_model(args: argparse.Namespace, server: TorchServe) -> str:
    """Check the model (and version) is registered; with no --model, take the only one there is."""
    try:
        if args.model is None:
            names = server.model_names()
            if len(names) != 1:
                raise UserError(f"pass --model: the server has {len(names)} models "
                                f"({', '.join(names) or 'none'})")
            return names[0]
        versions = [v["modelVersion"] for v in server.versions(args.model)]
    except (ServerUnavailable, Refused, ValueError) as e:
        if args.model is None:
            raise UserError(f"pass --model: cannot list the models at {server.management_url} ({e})") from None
        logger.warning("cannot check model %s with the management API (%s); going on", args.model, e)
        return args.model
    if not versions:
        raise UserError(f"model '{args.model}' is not registered on {server.management_url}")
    if args.version and args.version not in versions:
        raise UserError(f"model '{args.model}' has no version '{args.version}' "
                        f"(registered: {', '.join(versions)})")
    return args.model


def wait_for_server(server: TorchServe, retries: int) -> None:
    """Check /ping, retrying with backoff; ServerUnavailable when it never answers or refuses the key."""
    url, keys, why = server.url, server.keys, None
    for attempt in range(retries + 1):
        why = ping(url, keys)
        if why is None:
            return
        if "InvalidKeyException" in why:
            if keys.key_file is None or not keys.key_file.exists():
                raise ServerUnavailable(f"the server at {url} wants a key and there is no {keys.key_file}; "
                                        f"pass the server's key_file.json with --token-file")
            raise ServerUnavailable(f"the server at {url} refused the inference key from {keys.key_file}; "
                                    f"pass the server's key_file.json with --token-file")
        if attempt < retries:
            time.sleep(min(MAX_BACKOFF_S, 0.25 * 2 ** attempt))
    raise ServerUnavailable(f"server unreachable: {why}")
