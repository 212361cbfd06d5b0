"""One replica's side of a run: the checks a replica must pass to take files (at the start and when it
comes back), one POST of a prepared file with key renewal, and the version that answered.
"""
from __future__ import annotations

import argparse
import logging
import threading
import time
from dataclasses import dataclass

import requests

from client import pixels
from client.policy import Kind, Outcome
from client.results import error_row, ok_row
from core.errors import BadAnswer, KeyRefused, Refused, ServerUnavailable, UserError
from core.http import error_message, is_auth_error
from core.torchserve import TorchServe

logger = logging.getLogger("classify_dir")
KEY_REFRESHES = 3  # per request: a rotated key is renewed, a wrong one is not renewed forever
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
    kind: Kind = Kind.ANSWER

    @property
    def outcome(self) -> Outcome:
        """What the dispatcher's policy sees of it."""
        why = f"{self.reason} ({self.error})" if self.row is None else self.row.get("error") or self.reason
        return Outcome(self.kind, self.status, " ".join(str(why or "").split()))


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
                return Answer(None, "timeout", error=f"no answer within {self.timeout:g}s", kind=Kind.NO_ANSWER)
            except requests.RequestException as e:  # refused, reset, or cut partway through the answer
                return Answer(None, "connection", error=f"connection failed ({type(e).__name__})",
                              kind=Kind.NO_ANSWER)
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
            except (ValueError, KeyError, IndexError, TypeError):  # the replica's fault: taken out if it persists
                text = " ".join(response.text[:200].split())
                return Answer(error_row(row, f"unexpected answer: {text!r}", 200), "bad answer", 200,
                              kind=Kind.BAD_ANSWER)
        return Answer(error_row(row, error_message(response), response.status_code),
                      f"http {response.status_code}", response.status_code)

    def no_ready_worker(self) -> str | None:
        """After a 503: why every request there would get 503 (no worker of the version is READY), if so."""
        try:
            served = Served.look(self.server, self.model, self.version)
        except BadAnswer as e:  # nonsense: the replica is unusable
            return str(e)
        except (ServerUnavailable, Refused) as e:  # not known: the 503 is the file's answer, as it is
            logger.debug("workers of %s unknown: %s", self.model, e)
            return None
        if served is not None and not served.ready:
            return (f"model '{self.model}' version {served.version} has no READY worker on "
                    f"{self.server.url} and answers 503; add one: scripts/manage.py scale "
                    f"{self.model} {served.version} --min 1")
        return None


@dataclass(frozen=True)
class Served:
    """What one replica serves of a model, from one describe: the version, its workers' states and,
    when asked for, the handler's preprocessing settings (describe with customized=true)."""

    version: str
    workers: tuple[str, ...]
    settings: pixels.PixelSettings | None = None
    unread: str | None = None  # why the settings asked for could not be read (None: read, or not asked)

    @property
    def ready(self) -> bool:
        """Whether a worker is READY, i.e. the version can answer now."""
        return "READY" in self.workers

    @classmethod
    def look(cls, server: TorchServe, model: str, version: str | None,
             settings: bool = False) -> "Served | None":
        """`version` of `model` (None: the default) on `server`; None when not registered there."""
        unread = None
        try:
            description = server.describe(model, version, customized="true" if settings else None)
        except Refused as e:
            if not settings:
                raise
            # TorchServe asks a worker for the handler's part (503 without one): the rest, then, alone
            description, settings, unread = server.describe(model, version), False, str(e)
        if not description:
            return None
        entry = description[0]  # describe checked its shape: dicts with a modelVersion
        return cls(entry["modelVersion"], tuple(str(w.get("status")) for w in entry.get("workers", [])),
                   pixels.settings_of(entry, model) if settings else None, unread)


NOT_LOOKED = object()  # RunCheck.problem's `served` when nobody looked yet: it describes the replica itself


def look_up(server: TorchServe, model: str, version: str | None, settings: bool) -> "Served | None | bool":
    """Served.look with the management API optional: False, said in a warning, when it does not answer
    (the replica is then not checked); BadAnswer, for a replica answering nonsense, goes up."""
    try:
        return Served.look(server, model, version, settings)
    except BadAnswer:
        raise
    except (ServerUnavailable, Refused) as e:
        logger.warning("%s: model %s not checked with the management API (%s)", server.url, model, e)
        return False


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

    def problem(self, server: TorchServe, ready: bool, served: "Served | None | bool | object" = NOT_LOOKED
                ) -> str | None:
        """Why `server` may not take the run's files (None: it may); `ready`: a READY worker is needed,
        not only a worker (at the start a worker still loading is fine); `served`: what look_up gave,
        when already looked up (one describe a replica at the start)."""
        if served is NOT_LOOKED:
            try:
                served = look_up(server, self.model, self.version, settings=self.settings is not None)
            except BadAnswer as e:  # answering nonsense: it stays out, with its reason
                return str(e)
        if served is False:  # its management API did not answer (said): not checked, not refused
            return None
        if served is None:
            return (f"model '{self.model}'" + (f" version {self.version}" if self.version else "")
                    + f" is not registered on {server.management_url}")
        if not served.workers or (ready and not served.ready):
            return (f"model '{self.model}' version {served.version} has no {'READY ' if ready else ''}worker on "
                    f"{server.management_url}; add one: scripts/manage.py scale {self.model} {served.version} --min 1")
        if self.default_version is not None and served.version != self.default_version:
            return (f"serves '{self.model}' version {served.version}, not the run's {self.default_version} "
                    f"(pass --allow-mixed-versions to accept it)")
        if self.settings is not None and served.unread:
            return f"its preprocessing settings could not be read ({served.unread})"
        if self.settings is not None and served.settings != self.settings:
            return (f"preprocesses '{self.model}' differently from the run's other replicas "
                    f"({served.settings} against {self.settings})")
        return None


def resolve_model(args: argparse.Namespace, servers: list[TorchServe]) -> str:
    """The model to use: --model when every healthy replica has it (and --version), or the only one.
    A replica that answers nonsense is passed over here; the run's checks keep it out."""
    answers: dict[str, list[str]] = {}
    for server in servers:
        try:
            answers[server.url] = (server.model_names() if args.model is None
                                   else [v["modelVersion"] for v in server.versions(args.model)])
        except BadAnswer as e:
            logger.warning("%s: %s", server.url, e)
            continue
        except (ServerUnavailable, Refused) as e:
            if args.model is None:
                raise UserError(f"pass --model: cannot list the models at {server.management_url} ({e})") from None
            logger.warning("cannot check model %s with the management API (%s); going on", args.model, e)
            return args.model
        if args.model is None:
            break
    if not answers:
        raise BadAnswer("no replica answers TorchServe's model list or describe sensibly: "
                        + ", ".join(s.management_url for s in servers))
    if args.model is None:
        names = next(iter(answers.values()))
        if len(names) != 1:
            raise UserError(f"pass --model: the server has {len(names)} models ({', '.join(names) or 'none'})")
        return names[0]
    if not any(answers.values()):
        raise UserError(f"model '{args.model}' is not registered on " + ", ".join(s.management_url for s in servers))
    if args.version and not any(args.version in v for v in answers.values()):
        registered = sorted({v for vs in answers.values() for v in vs})
        raise UserError(f"model '{args.model}' has no version '{args.version}' "
                        f"(registered: {', '.join(registered)})")
    return args.model
