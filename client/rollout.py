"""Changing what a TorchServe serves, for manage.py: the archive a version comes from, register,
drain and unregister a version, and the rollout that swaps versions with no failed request
(smoke test first, roll back on failure).
"""
from __future__ import annotations

import argparse
import json
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from core.errors import Refused, RolledBack, ServerUnavailable, UserError
from client.server_logs import BatchWatch, LogTail, worker_failure
from core.torchserve import TorchServe, pending_requests, server_message
from core.files import DEFAULT_EXTENSIONS, iter_files, true_label_of


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


def list_smoke_images(directory: str, min_accuracy: float | None) -> list[tuple[bytes, str, str | None]]:
    """(bytes, relative path, class folder or None) of the smoke set; read and checked before anything
    changes, so that a file that cannot be read fails the command, not a rollout half done."""
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"--smoke-dir is not a folder: {directory}")
    extensions = {e.lower() for e in DEFAULT_EXTENSIONS.split(",")}
    images = []
    for path in iter_files(root, extensions):
        rel = path.relative_to(root).as_posix()
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UserError(f"--smoke-dir: cannot read {path}: {e.strerror or e}") from None
        images.append((data, rel, true_label_of(rel)))
    if not images:
        raise UserError(f"--smoke-dir has no images ({DEFAULT_EXTENSIONS}): {directory}")
    loose = [rel for _, rel, label in images if label is None]
    if min_accuracy is not None and loose:
        raise UserError(f"--min-accuracy needs --smoke-dir laid out as class folders (DIR/<label>/...), "
                        f"but {loose[0]} is directly in {directory}")
    return images


def classify_smoke(client: TorchServe, name: str, version: str, images: list) -> list:
    """(relative path, predicted label or None, error or None) of every smoke image on NAME/VERSION."""
    def one(item: tuple[bytes, str, str | None]) -> tuple[str, str | None, str | None]:
        data, rel, _ = item
        try:
            response = client.predict(name, version, data)
        except requests.RequestException as e:
            return rel, None, f"{type(e).__name__}"
        if response.status_code != 200:
            return rel, None, server_message(response)
        try:
            return rel, response.json()[0]["label"], None
        except (ValueError, LookupError, TypeError):
            return rel, None, f"unexpected answer {response.text[:100]!r}"

    with ThreadPoolExecutor(min(16, len(images))) as pool:  # enough in flight to fill the batches
        return list(pool.map(one, images))


def smoke_accuracy(images: list, results: list) -> float | None:
    """Share of right labels (a failed image counts as wrong); None unless every image has a class folder."""
    truth = [label for _, _, label in images]
    if not truth or None in truth:
        return None
    return sum(t == p for t, (_, p, _) in zip(truth, results)) / len(truth)


def smoke_test(client: TorchServe, name: str, version: str, images: list, min_accuracy: float | None,
               baseline: tuple[str, float] | None = None, max_drop: float = 1.0) -> str:
    """Send every image to NAME/VERSION; Refused unless all succeed, accuracy >= min_accuracy and it
    is at most max_drop below the baseline (old version, its accuracy on the same images)."""
    results = classify_smoke(client, name, version, images)
    failed = [(rel, error) for rel, _, error in results if error]
    if failed:
        raise Refused(f"smoke test: {len(failed)}/{len(images)} images failed on {name} {version} "
                      f"(first: {failed[0][0]}: {failed[0][1]})")
    summary = f"{len(images)}/{len(images)} smoke images ok"
    accuracy = smoke_accuracy(images, results)
    if accuracy is not None:
        summary += f", accuracy {accuracy:.4f}"
        if min_accuracy is not None and accuracy < min_accuracy:
            raise Refused(f"smoke test: accuracy {accuracy:.4f} of {name} {version} on {len(images)} "
                          f"images is below --min-accuracy {min_accuracy:g}")
        if baseline is not None:
            old, old_accuracy = baseline
            summary += f" ({name} {old}: {old_accuracy:.4f})"
            if accuracy < old_accuracy - max_drop - 1e-9:  # 1e-9: a drop of exactly max_drop passes
                raise Refused(f"smoke test: accuracy {accuracy:.4f} of {name} {version} is "
                              f"{old_accuracy - accuracy:.4f} below {name} {old}'s {old_accuracy:.4f} on "
                              f"the same {len(images)} images (--max-accuracy-drop {max_drop:g}; pass "
                              f"--max-accuracy-drop 1 to roll out a worse model on purpose)")
    return summary


def rollout(client: TorchServe, args: argparse.Namespace) -> str:
    """Register, smoke-test, make default, retire the old default; undo the new version on failure."""
    images = list_smoke_images(args.smoke_dir, args.min_accuracy) if args.smoke_dir else []
    mar = locate_mar(args.mar, args.model_store)
    try:
        name, version = read_manifest(mar)
    except Refused as e:
        raise Refused(f"rollout: {e}; nothing was changed on the server") from None
    versions = client.versions(name)
    old = client.default_version(name) if versions else None
    others = [] if versions or args.new_model else client.model_names()
    if others:  # a typo'd or foreign name would add a model, and clients without --model then fail
        raise Refused(f"rollout: {mar.name} is model {name}, which the server does not serve (it serves "
                      f"{', '.join(others)}); a rollout replaces a served model's version: rebuild the "
                      f"archive with the served name, or pass --new-model to add {name} beside them "
                      f"(nothing changed)")
    if any(v["modelVersion"] == version for v in versions):
        raise Refused(f"rollout: {name} version {version} is already registered; archive the new model "
                      f"under a new version (nothing changed)")
    old_entry = next((v for v in versions if v["modelVersion"] == old), None)
    workers = args.workers or (old_entry or {}).get("minWorkers") or None  # the capacity it replaces
    baseline = None
    if old and images and all(label for _, _, label in images):  # class folders: compare
        say(f"rollout: measuring {name} {old} on the {len(images)} smoke images")
        baseline = old, smoke_accuracy(images, classify_smoke(client, name, old, images))
    step = f"register {name} {version}"
    try:
        count = f"{workers} worker(s)" if workers else "the archive's workers"
        say(f"rollout: {step} ({count}) while {name} {old or '(none)'} serves")
        register(client, mar, workers, args.batch_size, args.max_batch_delay, args.log_dir)
        summary = "no smoke set"
        if images:
            step = "smoke test"
            say(f"rollout: sending {len(images)} smoke images to /predictions/{name}/{version}")
            summary = smoke_test(client, name, version, images, args.min_accuracy, baseline,
                                 args.max_accuracy_drop)
        step = f"set-default {name} {version}"
        client.call("PUT", f"/models/{name}/{version}/set-default", step)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - whatever failed, undo, then report it
        still = roll_back(client, name, version, old)
        if not isinstance(e, (Refused, UserError, ServerUnavailable, requests.RequestException)):
            say(f"rollout: {step} failed ({type(e).__name__}); rolled back: {still}")
            raise
        reason = (str(e) if isinstance(e, (Refused, UserError, ServerUnavailable))
                  else f"{step}: {type(e).__name__}: {e}")
        raise RolledBack(f"rollout of {name} {version} failed and was rolled back: {reason}; {still}") from None
    say(f"rollout: {name} {version} is the default ({summary})")
    if old is None or args.keep_old:
        kept = f"; {name} {old} kept" if old else ""
        return f"rollout: {name} {old or '(none)'} -> {version}, {summary}{kept}"
    say(f"rollout: draining and unregistering {name} {old}")
    try:
        unregister(client, name, old, args.drain_seconds, args.drain_timeout, args.log_dir)
    except Refused as e:
        raise Refused(f"rollout: {name} {version} is the default and serving, but the old version stays "
                      f"registered: {e}") from None
    return f"rollout: {name} {old} -> {version}, {summary}; {name} {old} unregistered"


def roll_back(client: TorchServe, name: str, version: str, old: str | None) -> str:
    """Remove the new version (if it got registered) and say what serves now."""
    try:
        if any(v["modelVersion"] == version for v in client.versions(name)):
            if old and client.default_version(name) == version:  # only if set-default went through
                client.call("PUT", f"/models/{name}/{old}/set-default", f"set-default {name} {old}")
            client.call("DELETE", f"/models/{name}/{version}", f"unregister {name} {version}")
        default = client.default_version(name)
    except (Refused, UserError, ServerUnavailable, requests.RequestException) as e:
        return f"the rollback itself failed ({e}): check with manage.py describe {name}"
    return f"{name} {default} is still the default" if default else f"{name} is not registered"


def say(message: str) -> None:
    """A progress line on stdout, flushed so that callers see each step as it happens."""
    print(message, flush=True)
