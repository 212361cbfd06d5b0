"""A TorchServe's versions, for manage.py and the rollout: the archive a version comes from, register,
drain and unregister a version, and what every replica serves (snapshots, version skew).
"""
from __future__ import annotations

import json
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

from client.fleet import Replica
from client.server_logs import BatchWatch, LogTail, worker_failure
from core.errors import Refused, ServerUnavailable, UserError
from core.torchserve import TorchServe, pending_requests

API_ERRORS = (Refused, UserError, ServerUnavailable, requests.RequestException)


@dataclass(frozen=True)
class Member:
    """One replica a management command acts on: its name, its APIs, its log folder when readable."""

    name: str
    server: TorchServe
    log_dir: Path | None = None

    @classmethod
    def of(cls, replica: Replica, timeout: float) -> "Member":
        return cls(replica.name, replica.api(timeout=timeout), replica.log_dir)


def read_manifest(mar: Path) -> tuple[str, str]:
    """(model name, version) from the archive's MAR-INF/MANIFEST.json, not from its file name."""
    try:
        with zipfile.ZipFile(mar) as archive:
            model = json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]
        return str(model["modelName"]), str(model["modelVersion"])
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError, OSError) as e:
        raise Refused(f"{mar} is not a readable model archive (MAR-INF/MANIFEST.json with modelName "
                      f"and modelVersion): {type(e).__name__}: {e}") from None


def locate_mar(mar: str, store: Path) -> Path:
    """The archive as a path inside the model store: TorchServe registers only files of its store."""
    path = Path(mar).expanduser()
    if not path.is_file() and not path.is_absolute() and (store / mar).is_file():
        path = store / mar
    if not path.is_file():
        raise UserError(f"model archive not found: {mar} (nor in the model store {store})")
    if path.resolve().parent != store.resolve():
        raise UserError(f"{mar} is not in the model store {store}: copy it there, or pass the store "
                        f"the server serves with --model-store")
    return path


def register(client: TorchServe, mar: Path, workers: int | None, batch_size: int | None,
             max_batch_delay: int | None, log_dir: Path | None = None) -> tuple[str, str]:
    """Register an archive of the store and wait until its workers are READY; (name, version)."""
    name, version = read_manifest(mar)
    if any(v["modelVersion"] == version for v in client.versions(name)):
        raise Refused(f"{name} version {version} is already registered: unregister it first, or "
                      f"archive the new model under a new version")
    model_log = LogTail(log_dir / "model_log.log") if log_dir else None  # lines from here on
    try:
        client.call("POST", "/models", f"register {mar.name} ({name} {version})", url=mar.name,
                    synchronous="true", initial_workers=workers, batch_size=batch_size,
                    max_batch_delay=max_batch_delay)
    except Refused as e:
        if "Model not found at" in str(e):
            raise Refused(f"{e} (the server's model store has no {mar.name}: is --model-store the "
                          f"store it serves?)") from None
        reason = model_log and worker_reason(model_log, name, version)
        if reason:  # the API says only "Failed to start workers"; the worker's log says why
            raise Refused(f"{e}; the worker said: {reason}") from None
        raise
    entry = client.call("GET", f"/models/{name}/{version}", f"describe {name} {version}")[0]
    if workers and entry.get("minWorkers") != workers:  # the archive's maxWorkers caps initial_workers
        client.call("PUT", f"/models/{name}/{version}", f"scale {name} {version}", min_worker=workers,
                    max_worker=max(workers, int(entry.get("maxWorkers") or 0)), synchronous="true")
    return name, version


def worker_reason(model_log: LogTail, name: str, version: str) -> str | None:
    """The exception line of a worker that failed to start; the log may trail the API by a moment."""
    for _ in range(10):
        reason = worker_failure(model_log, name, version)
        if reason:
            return reason
        time.sleep(0.1)
    return None


def drain(client: TorchServe, name: str, version: str, quiet_s: float, timeout_s: float,
          watch: BatchWatch | None) -> bool:
    """Wait until a version has had no queued request and no worker inside a batch for quiet_s
    seconds; False after timeout_s more. Without `watch` only the queue is seen."""
    deadline, quiet_since = time.monotonic() + quiet_s + timeout_s, None
    while time.monotonic() < deadline:
        entry = client.call("GET", f"/models/{name}/{version}", f"describe {name} {version}", ok_404=True)
        if not entry:
            return True
        now = time.monotonic()
        ids = [str(w.get("id")) for w in entry[0].get("workers", [])]
        if pending_requests(entry[0]) or (watch and watch.busy(ids)):
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= quiet_s:
            return True
        time.sleep(0.1)
    return False


def unregister(client: TorchServe, name: str, version: str, quiet_s: float, timeout_s: float,
               log_dir: Path | None = None, label: str = "") -> None:
    """Unregister a version once its queue is empty and its workers hold no batch: TorchServe never
    answers the requests of a removed version (docs/rollout.md)."""
    versions = [v["modelVersion"] for v in client.versions(name)]
    if version not in versions:
        raise Refused(f"{name} has no version {version} (registered: {', '.join(versions) or 'none'})")
    default = client.default_version(name)
    if version == default and len(versions) > 1:
        others = ", ".join(v for v in versions if v != version)
        raise Refused(f"{name} {version} is the default version and other versions are registered "
                      f"({others}); TorchServe refuses to remove it: make another one the default first "
                      f"(manage.py set-default {name} VERSION)")
    entry = client.call("GET", f"/models/{name}/{version}", f"describe {name} {version}")[0]
    quiet_s = max(quiet_s, 2 * int(entry.get("maxBatchDelay") or 0) / 1000)  # a batch still filling
    watch = BatchWatch(log_dir, name, version) if log_dir else None
    if watch is None or watch.busy([str(w.get("id")) for w in entry.get("workers", [])]) is None:
        # No log of this server's workers: a batch ends within responseTimeout (TorchServe
        # restarts a worker that is silent for longer), so that long a quiet queue is certain too.
        quiet_s = max(quiet_s, float(entry.get("responseTimeout") or 120))
        watch = None
        where = f"in {log_dir} (--log-dir)" if log_dir else "to read (no log folder given)"
        say(f"{label}{name} {version}: no ts_log.log of its workers {where}; waiting "
            f"{quiet_s:g}s of empty queue (its responseTimeout) so that no batch is cut")
    if not drain(client, name, version, quiet_s, timeout_s, watch):
        raise Refused(f"{name} {version} still has queued requests or a batch in a worker after "
                      f"{quiet_s + timeout_s:g}s (clients calling /predictions/{name}/{version} "
                      f"directly?); not unregistered")
    client.call("DELETE", f"/models/{name}/{version}", f"unregister {name} {version}")


@dataclass
class Snapshot:
    """What one replica serves: model -> (default version, describe entries), or why it is unknown."""

    replica: str
    models: dict[str, tuple[str | None, list[dict]]] = field(default_factory=dict)
    error: str | None = None
    failure: Exception | None = field(default=None, repr=False)


def snapshot(member: Member, names: list[str] | None = None) -> Snapshot:
    """Read the given models (None: all) of one replica; an unreachable replica keeps its error."""
    client = member.server
    try:
        models = {}
        for name in client.model_names() if names is None else names:
            entries = client.versions(name)
            if entries:
                models[name] = (client.default_version(name), entries)
        return Snapshot(member.name, models)
    except API_ERRORS as e:
        return Snapshot(member.name, error=str(e), failure=e)


def snapshots(members: list[Member], names: list[str] | None = None) -> list[Snapshot]:
    """Every replica read at once (one thread each), in the fleet file's order."""
    with ThreadPoolExecutor(len(members)) as pool:
        return list(pool.map(lambda m: snapshot(m, names), members))


def _grouped(values: dict[str, str]) -> str:
    """{replica: value} -> "value on r1, r2; other on r3"."""
    groups: dict[str, list[str]] = {}
    for replica, value in values.items():
        groups.setdefault(value, []).append(replica)
    return "; ".join(f"{value} on {', '.join(replicas)}" for value, replicas in groups.items())


def version_skew(snaps: list[Snapshot]) -> list[str]:
    """One line per model whose default, or whose set of versions, differs between readable replicas."""
    readable = [s for s in snaps if s.error is None]
    lines = []
    for model in sorted({m for s in readable for m in s.models}):
        defaults, registered = {}, {}
        for s in readable:
            default, entries = s.models.get(model, (None, []))
            defaults[s.replica] = default or "(not registered)"
            registered[s.replica] = ", ".join(sorted(e["modelVersion"] for e in entries)) or "none"
        if len(set(defaults.values())) > 1:
            lines.append(f"version skew: {model} default is {_grouped(defaults)}")
        elif len(set(registered.values())) > 1:
            lines.append(f"version skew: {model} versions registered: {_grouped(registered)}")
    return lines


def read_state(client: TorchServe, name: str) -> tuple[str | None, list[str]]:
    """(default version or None, every registered version) of `name` on one replica."""
    versions = sorted(v["modelVersion"] for v in client.versions(name))
    return (client.default_version(name) if versions else None), versions


def say(message: str) -> None:
    """A progress line on stdout, flushed so that callers see each step as it happens."""
    print(message, flush=True)
