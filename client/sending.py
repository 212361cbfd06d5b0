"""One replica's side of a run: the checks a replica must pass to take files (at the start and when it
comes back), one POST of a prepared file with key renewal, the version that answered, and the retry
policy the dispatcher applies across replicas.
"""
from __future__ import annotations

import argparse
import logging
import random
import threading
import time
from dataclasses import dataclass

import requests

from client import pixels
from client.results import error_row, ok_row
from core.errors import KeyRefused, Refused, ServerUnavailable, UserError
from core.torchserve import TorchServe, error_message, is_auth_error

logger = logging.getLogger("classify_dir")
KEY_REFRESHES = 3  # per request: a rotated key is renewed, a wrong one is not renewed forever
VERSION_RETRY_S = 5.0  # after a failed default-version lookup, reuse the last answer this long


@dataclass(frozen=True)
class Retry:
    """How a file is tried again, declared once per run (immutable, as urllib3's Retry).

    `total` more attempts after the first, over every replica; a transient status waits
    backoff * 2**attempt seconds (at most max_backoff, jittered by +-25 %) before the next;
    `take_out_after` non-transient 5xx answers in a row take a replica out of the run.
    """

    total: int = 3
    backoff: float = 0.25
    max_backoff: float = 8.0
    statuses: frozenset[int] = frozenset({429, 502, 503, 504, 507})  # tried again after a backoff
    busy: frozenset[int] = frozenset({429, 503, 507})  # too many at once, queue full, out of memory: the server is there
    take_out_after: int = 5  # 5xx answers in a row, other than `busy` ones

    def allows(self, attempt: int) -> bool:
        """Whether attempt number `attempt` (from 0) may be followed by another."""
        return attempt < self.total

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retrying after attempt number `attempt`."""
        return min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.75, 1.25)


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
                except (ServerUnavailable, Refused) as e:
                    logger.debug("default version unknown: %s", e)
                    self._looked_at = looked_at + VERSION_RETRY_S  # do not ask once per answer
            return self._value


@dataclass
class Answer:
    """What one attempt on one replica gave: a row (an answer, ok or not) or, without one, why."""

    row: dict | None
    reason: str | None  # the summary's reason for a failure: "http 400", "timeout", "connection"
    status: int | None = None
    error: str | None = None  # without a row: what went wrong, for the row if it stays so


class Classifier:
    """Sends prepared files to one replica; thread-safe (its TorchServe keeps a session per thread)."""

    def __init__(self, server: TorchServe, model: str, version: str | None, *, topk: int, timeout: float):
        self.server, self.model, self.version = server, model, version
        self.versions = VersionTracker(server, model, version)
        self.topk, self.timeout = topk, timeout

    def send(self, body: bytes, content_type: str, row: dict) -> Answer:
        """One POST (resent once per key renewal); KeyRefused or ServerUnavailable when the replica
        cannot serve at all (key refused, model unknown there)."""
        row = dict(row)
        for _ in range(KEY_REFRESHES + 1):
            sent_key, sent_at, started = self.server.keys.get("inference"), time.monotonic(), time.perf_counter()
            try:
                response = self.server.predict(self.model, self.version, body, content_type, self.timeout)
            except requests.Timeout:
                return Answer(None, "timeout", error=f"no answer within {self.timeout:g}s")
            except requests.RequestException as e:  # refused, reset, or cut partway through the answer
                return Answer(None, "connection", error=f"connection failed ({type(e).__name__})")
            row["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
            if not is_auth_error(response):
                break
            if not self.server.keys.refresh("inference", sent_key):
                break
        if is_auth_error(response):
            raise KeyRefused(f"{self.server.url} refused the inference key or token from "
                             f"{self.server.keys.source} and no fresh one could be read or requested")
        if response.status_code == 404 and _is_unknown_model(response):
            raise ServerUnavailable(f"{self.server.url}: {error_message(response)}")
        row["model_version"] = response.headers.get("X-Model-Version") or self.versions.version_for(sent_at)
        if response.status_code == 200:
            try:
                return Answer(ok_row(row, response.json(), self.topk), None, 200)
            except (ValueError, KeyError, IndexError, TypeError):
                return Answer(error_row(row, f"unexpected answer: {response.text[:200]}", 200), "bad answer", 200)
        return Answer(error_row(row, error_message(response), response.status_code),
                      f"http {response.status_code}", response.status_code)

    def check_workers_after_503(self) -> None:
        """After a 503: ServerUnavailable when no worker of the version is READY (all would be 503)."""
        found = version_workers(self.server, self.model, self.version)
        if found is not None and not has_ready_worker(found[1]):
            raise ServerUnavailable(f"model '{self.model}' version {found[0]} has no READY worker on "
                                    f"{self.server.url} and answers 503; add one: scripts/manage.py scale "
                                    f"{self.model} {found[0]} --min 1")


def has_ready_worker(workers: list) -> bool:
    """True when one of describe's workers is READY, i.e. the version can answer now."""
    return any(isinstance(w, dict) and w.get("status") == "READY" for w in workers)


def version_workers(server: TorchServe, model: str, version: str | None) -> tuple[str, list[dict]] | None:
    """(version, its workers) for `version` (None: the default) from the management API; None if unknown."""
    try:
        description = server.describe(model, version)
    except (ServerUnavailable, Refused) as e:
        logger.debug("workers of %s unknown: %s", model, e)
        return None
    entry = description[0] if description and isinstance(description[0], dict) else None
    if entry is None or "modelVersion" not in entry:
        return None
    return str(entry["modelVersion"]), [w for w in entry.get("workers") or [] if isinstance(w, dict)]


def _is_unknown_model(response: requests.Response) -> bool:
    try:
        return response.json().get("type") in ("ModelNotFoundException", "ModelVersionNotFoundException")
    except (ValueError, AttributeError):
        return False


@dataclass(frozen=True)
class RunCheck:
    """What every replica must serve to take a run's files: checked at the start and again whenever a
    replica comes back, so a late or restarted replica that serves something else stays out."""

    model: str
    version: str | None  # --version, else None: the default version
    default_version: str | None = None  # without --version and mixed versions refused: the run's version
    settings: pixels.PixelSettings | None = None  # client-side preprocessing: the replica must match them

    def problem(self, server: TorchServe, ready: bool) -> str | None:
        """Why `server` may not take the run's files (None: it may); `ready`: a READY worker is needed,
        not only a worker (at the start a worker still loading is fine)."""
        try:
            description = server.describe(self.model, self.version)
        except (ServerUnavailable, Refused) as e:  # the management API is optional: said, not fatal
            logger.warning("%s: model %s not checked with the management API (%s)", server.url, self.model, e)
            return None
        try:
            found = version_workers(server, self.model, self.version) if description else None
            if found is None:
                return (f"model '{self.model}'" + (f" version {self.version}" if self.version else "")
                        + f" is not registered on {server.management_url}")
            version, workers = found
            if not workers or (ready and not has_ready_worker(workers)):
                return (f"model '{self.model}' version {version} has no {'READY ' if ready else ''}worker on "
                        f"{server.management_url}; add one: scripts/manage.py scale {self.model} {version} --min 1")
            if self.default_version is not None and version != self.default_version:
                return (f"serves '{self.model}' version {version}, not the run's {self.default_version} "
                        f"(pass --allow-mixed-versions to accept it)")
            if self.settings is not None:
                settings = pixels.fetch_settings(server, self.model, self.version)
                if settings != self.settings:
                    return (f"preprocesses '{self.model}' differently from the run's other replicas "
                            f"({settings} against {self.settings})")
        except (ServerUnavailable, Refused) as e:
            return str(e)
        return None


def resolve_model(args: argparse.Namespace, servers: list[TorchServe]) -> str:
    """The model to use: --model when every healthy replica has it (and --version), or the only one."""
    server = servers[0]
    try:
        if args.model is None:
            names = server.model_names()
            if len(names) != 1:
                raise UserError(f"pass --model: the server has {len(names)} models "
                                f"({', '.join(names) or 'none'})")
            return names[0]
        versions = {s.url: [v["modelVersion"] for v in s.versions(args.model)] for s in servers}
    except (ServerUnavailable, Refused) as e:
        if args.model is None:
            raise UserError(f"pass --model: cannot list the models at {server.management_url} ({e})") from None
        logger.warning("cannot check model %s with the management API (%s); going on", args.model, e)
        return args.model
    if not any(versions.values()):
        raise UserError(f"model '{args.model}' is not registered on " + ", ".join(s.management_url for s in servers))
    if args.version and not any(args.version in v for v in versions.values()):
        registered = sorted({v for vs in versions.values() for v in vs})
        raise UserError(f"model '{args.model}' has no version '{args.version}' "
                        f"(registered: {', '.join(registered)})")
    return args.model
