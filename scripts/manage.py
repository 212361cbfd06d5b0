"""Manage the models TorchServe serves: list, register, scale, switch versions, roll out safely.

Every command goes through the management API with the management key from key_file.json
(renewed with the API key when it has expired). `rollout` swaps versions with no failed request:
the new version gets its own workers and answers a smoke set before it becomes the default,
and the old version is unregistered only once its queue has drained.

    .venv/bin/python scripts/manage.py list
    .venv/bin/python scripts/manage.py rollout model_store/digits-2.0.mar --smoke-dir demo/val
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `scripts` and `training` importable
    sys.path.insert(0, str(REPO_ROOT))

from scripts import tsclient  # noqa: E402
from scripts.walk import DEFAULT_EXTENSIONS, iter_files, true_label_of  # noqa: E402
from training.errors import UserError, run_main  # noqa: E402

DEFAULT_STORE = Path(os.environ.get("MODEL_STORE") or REPO_ROOT / "model_store")  # as serve.sh


class Refused(Exception):
    """The server refused an operation, or a rollout failed and was rolled back: exit code 1."""


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
    try:
        body = response.json()
        message = body.get("message") or body.get("error")
    except (ValueError, AttributeError):
        message = None
    return f"HTTP {response.status_code}: {message or response.reason or response.text[:200]}"


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


def register(client: Client, mar: Path, workers: int | None, batch_size: int | None,
             max_batch_delay: int | None) -> tuple[str, str]:
    """Register an archive of the store and wait until its workers are READY; (name, version)."""
    name, version = read_manifest(mar)
    if any(v["modelVersion"] == version for v in client.versions(name)):
        raise Refused(f"{name} version {version} is already registered: unregister it first, or "
                      f"archive the new model under a new version")
    try:
        client.call("POST", "/models", f"register {mar.name} ({name} {version})", url=mar.name,
                    synchronous="true", initial_workers=workers, batch_size=batch_size,
                    max_batch_delay=max_batch_delay)
    except Refused as e:
        if "Model not found at" in str(e):
            raise Refused(f"{e} (the server's model store has no {mar.name}: is --model-store the "
                          f"store it serves?)") from None
        raise
    entry = client.call("GET", f"/models/{name}/{version}", f"describe {name} {version}")[0]
    if workers and entry.get("minWorkers") != workers:  # the archive's maxWorkers caps initial_workers
        client.call("PUT", f"/models/{name}/{version}", f"scale {name} {version}", min_worker=workers,
                    max_worker=max(workers, int(entry.get("maxWorkers") or 0)), synchronous="true")
    return name, version


def drain(client: Client, name: str, version: str, quiet_s: float, timeout_s: float) -> bool:
    """Wait until a version's queue has stayed empty for quiet_s seconds; False after timeout_s."""
    deadline, quiet_since = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        entry = client.call("GET", f"/models/{name}/{version}", f"describe {name} {version}", ok_404=True)
        if not entry:
            return True
        now = time.monotonic()
        if pending_requests(entry[0]):
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= quiet_s:
            return True
        time.sleep(0.1)
    return False


def unregister(client: Client, name: str, version: str, quiet_s: float, timeout_s: float) -> None:
    """Unregister a version once its queue has drained: TorchServe drops the jobs of a removed worker."""
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
    if not drain(client, name, version, quiet_s, timeout_s):
        raise Refused(f"{name} {version} still has queued requests after {timeout_s:g}s (clients calling "
                      f"/predictions/{name}/{version} directly?); not unregistered")
    client.call("DELETE", f"/models/{name}/{version}", f"unregister {name} {version}")


def list_smoke_images(directory: str, min_accuracy: float | None) -> list[tuple[Path, str, str | None]]:
    """(path, relative path, class folder or None) of the smoke set; checked before anything changes."""
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"--smoke-dir is not a folder: {directory}")
    extensions = {e.lower() for e in DEFAULT_EXTENSIONS.split(",")}
    images = []
    for path in iter_files(root, extensions):
        rel = path.relative_to(root).as_posix()
        images.append((path, rel, true_label_of(rel)))
    if not images:
        raise UserError(f"--smoke-dir has no images ({DEFAULT_EXTENSIONS}): {directory}")
    loose = [rel for _, rel, label in images if label is None]
    if min_accuracy is not None and loose:
        raise UserError(f"--min-accuracy needs --smoke-dir laid out as class folders (DIR/<label>/...), "
                        f"but {loose[0]} is directly in {directory}")
    return images


def smoke_test(client: Client, name: str, version: str, images: list, min_accuracy: float | None) -> str:
    """Send every image to NAME/VERSION; Refused unless all succeed (and accuracy >= min_accuracy)."""
    def one(item: tuple[Path, str, str | None]) -> tuple[str, str | None, str | None]:
        path, rel, _ = item
        try:
            response = client.predict(name, version, path.read_bytes())
        except requests.RequestException as e:
            return rel, None, f"{type(e).__name__}"
        if response.status_code != 200:
            return rel, None, server_message(response)
        try:
            return rel, response.json()[0]["label"], None
        except (ValueError, LookupError, TypeError):
            return rel, None, f"unexpected answer {response.text[:100]!r}"

    with ThreadPoolExecutor(min(16, len(images))) as pool:  # enough in flight to fill the batches
        results = list(pool.map(one, images))
    failed = [(rel, error) for rel, _, error in results if error]
    if failed:
        raise Refused(f"smoke test: {len(failed)}/{len(images)} images failed on {name} {version} "
                      f"(first: {failed[0][0]}: {failed[0][1]})")
    summary = f"{len(images)}/{len(images)} smoke images ok"
    labelled = [(label, predicted) for (_, _, label), (_, predicted, _) in zip(images, results) if label]
    if labelled and len(labelled) == len(images):
        accuracy = sum(t == p for t, p in labelled) / len(labelled)
        summary += f", accuracy {accuracy:.4f}"
        if min_accuracy is not None and accuracy < min_accuracy:
            raise Refused(f"smoke test: accuracy {accuracy:.4f} of {name} {version} on {len(labelled)} "
                          f"images is below --min-accuracy {min_accuracy:g}")
    return summary


def rollout(client: Client, args: argparse.Namespace) -> str:
    """Register, smoke-test, make default, retire the old default; undo the new version on failure."""
    images = list_smoke_images(args.smoke_dir, args.min_accuracy) if args.smoke_dir else []
    mar = locate_mar(args.mar, args.model_store)
    try:
        name, version = read_manifest(mar)
    except Refused as e:
        raise Refused(f"rollout: {e}; nothing was changed on the server") from None
    versions = client.versions(name)
    old = client.default_version(name) if versions else None
    if any(v["modelVersion"] == version for v in versions):
        raise Refused(f"rollout: {name} version {version} is already registered; archive the new model "
                      f"under a new version (nothing changed)")
    old_entry = next((v for v in versions if v["modelVersion"] == old), None)
    workers = args.workers or (old_entry or {}).get("minWorkers") or None  # the capacity it replaces
    step = f"register {name} {version}"
    try:
        count = f"{workers} worker(s)" if workers else "the archive's workers"
        say(f"rollout: {step} ({count}) while {name} {old or '(none)'} serves")
        register(client, mar, workers, args.batch_size, args.max_batch_delay)
        summary = "no smoke set"
        if images:
            step = "smoke test"
            say(f"rollout: sending {len(images)} smoke images to /predictions/{name}/{version}")
            summary = smoke_test(client, name, version, images, args.min_accuracy)
        step = f"set-default {name} {version}"
        client.call("PUT", f"/models/{name}/{version}/set-default", step)
    except (Refused, UserError, requests.RequestException, KeyboardInterrupt) as e:
        still = roll_back(client, name, version, old)
        if isinstance(e, KeyboardInterrupt):
            raise
        reason = str(e) if isinstance(e, (Refused, UserError)) else f"{step}: {type(e).__name__}: {e}"
        raise Refused(f"rollout of {name} {version} failed and was rolled back: {reason}; {still}") from None
    say(f"rollout: {name} {version} is the default ({summary})")
    if old is None or args.keep_old:
        kept = f"; {name} {old} kept" if old else ""
        return f"rollout: {name} {old or '(none)'} -> {version}, {summary}{kept}"
    say(f"rollout: draining and unregistering {name} {old}")
    try:
        unregister(client, name, old, args.drain_seconds, args.drain_timeout)
    except Refused as e:
        raise Refused(f"rollout: {name} {version} is the default and serving, but the old version stays "
                      f"registered: {e}") from None
    return f"rollout: {name} {old} -> {version}, {summary}; {name} {old} unregistered"


def roll_back(client: Client, name: str, version: str, old: str | None) -> str:
    """Remove the new version (if it got registered) and say what serves now."""
    try:
        if any(v["modelVersion"] == version for v in client.versions(name)):
            if old and client.default_version(name) == version:  # only if set-default went through
                client.call("PUT", f"/models/{name}/{old}/set-default", f"set-default {name} {old}")
            client.call("DELETE", f"/models/{name}/{version}", f"unregister {name} {version}")
        default = client.default_version(name)
    except (Refused, UserError, requests.RequestException) as e:
        return f"the rollback itself failed ({e}): check with manage.py describe {name}"
    return f"{name} {default} is still the default" if default else f"{name} is not registered"


def say(message: str) -> None:
    """A progress line on stdout, flushed so that callers see each step as it happens."""
    print(message, flush=True)


def run_command(client: Client, args: argparse.Namespace) -> str:
    """Do the subcommand; return its one-line (or, for list/describe, multi-line) summary."""
    if args.command == "list":
        lines = []
        for name in client.model_names():
            default = client.default_version(name)
            lines += [format_version(entry, default) for entry in client.versions(name)]
        return "\n".join(lines) or "no models registered"
    if args.command == "describe":
        path = f"/models/{args.name}/{args.version or 'all'}"
        entries = client.call("GET", path, f"describe {args.name} {args.version or ''}".strip())
        if args.json:
            return json.dumps(entries, indent=2)
        default, lines = client.default_version(args.name), []
        for entry in entries:
            lines.append(format_version(entry, default))
            for w in entry.get("workers", []):
                memory = int(w.get("memoryUsage") or 0)  # 0 until TorchServe first measures it
                lines.append(f"  worker {w.get('id')}: {w.get('status')}, pid {w.get('pid')}, "
                             + (f"{memory / 2**20:.0f} MiB, " if memory else "")
                             + f"started {w.get('startTime')}")
        return "\n".join(lines)
    if args.command == "register":
        name, version = register(client, locate_mar(args.mar, args.model_store), args.workers,
                                 args.batch_size, args.max_batch_delay)
        entry = client.call("GET", f"/models/{name}/{version}", f"describe {name} {version}")[0]
        return "register: " + format_version(entry, client.default_version(name))
    if args.command == "set-default":
        client.call("PUT", f"/models/{args.name}/{args.version}/set-default",
                    f"set-default {args.name} {args.version}")
        return f"set-default: /predictions/{args.name} now answers with version {args.version}"
    if args.command == "scale":
        path = f"/models/{args.name}" + (f"/{args.version}" if args.version else "")
        client.call("PUT", path, f"scale {args.name} {args.version or '(default)'}", min_worker=args.min,
                    max_worker=args.max, synchronous="true")
        entry = client.call("GET", path, f"describe {args.name}")[0]
        return "scale: " + format_version(entry, client.default_version(args.name))
    if args.command == "unregister":
        unregister(client, args.name, args.version, args.drain_seconds, args.drain_timeout)
        left = [v["modelVersion"] for v in client.versions(args.name)]
        return f"unregister: {args.name} {args.version} removed; versions left: {', '.join(left) or 'none'}"
    return rollout(client, args)


def check_args(args: argparse.Namespace) -> None:
    """Usage errors found before any request is sent."""
    if (getattr(args, "workers", None) or 1) < 1 or (getattr(args, "batch_size", None) or 1) < 1:
        raise UserError("--workers and --batch-size must be >= 1")
    if (getattr(args, "max_batch_delay", None) or 0) < 0:
        raise UserError("--max-batch-delay must be >= 0")
    if args.command == "scale" and (args.min < 0 or (args.max is not None and args.max < args.min)):
        raise UserError("scale needs 0 <= --min <= --max")
    if args.command == "rollout" and args.min_accuracy is not None:
        if not 0 <= args.min_accuracy <= 1:
            raise UserError("--min-accuracy must be between 0 and 1")
        if not args.smoke_dir:
            raise UserError("--min-accuracy needs --smoke-dir")
    if args.timeout <= 0:
        raise UserError("--timeout must be > 0")


def get_args_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per operation, the server flags on each."""
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--url", default=tsclient.DEFAULT_INFERENCE_URL,
                        help="TorchServe inference URL (default: %(default)s)")
    server.add_argument("--management-url", default=None,
                        help="management URL (default: the inference URL's host, port + 1)")
    server.add_argument("--token-file", default=None,
                        help="the server's key_file.json (default: the one at the repository root)")
    server.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for one answer; registering waits for its workers "
                             "(default: %(default)s)")
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--model-store", type=Path, default=DEFAULT_STORE,
                       help="the server's model store; MAR must be in it "
                            "(default: $MODEL_STORE, else model_store/)")
    workers = argparse.ArgumentParser(add_help=False)
    workers.add_argument("--workers", type=int, default=None,
                         help="workers of the new version (default: rollout keeps the old default's "
                              "count; register: the archive's model-config.yaml)")
    workers.add_argument("--batch-size", type=int, default=None,
                         help="server-side batch size (default: the archive's model-config.yaml)")
    workers.add_argument("--max-batch-delay", type=int, default=None,
                         help="ms a batch waits to fill (default: the archive's model-config.yaml)")
    drain_ = argparse.ArgumentParser(add_help=False)
    drain_.add_argument("--drain-seconds", type=float, default=2.0,
                        help="seconds a version's queue must stay empty before it is removed "
                             "(default: %(default)s)")
    drain_.add_argument("--drain-timeout", type=float, default=60.0,
                        help="seconds after which an undrained version is kept, not removed "
                             "(default: %(default)s)")

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", parents=[server], help="models, versions, the default, workers")
    p = sub.add_parser("describe", parents=[server], help="one model's versions and their workers")
    p.add_argument("name", metavar="NAME", help="model name")
    p.add_argument("version", metavar="VERSION", nargs="?", default=None, help="one version (default: all)")
    p.add_argument("--json", action="store_true", help="print TorchServe's describe answer as JSON")
    p = sub.add_parser("register", parents=[server, store, workers],
                       help="register a .mar of the model store, wait until its workers are READY")
    p.add_argument("mar", metavar="MAR", help="archive path or file name in the model store")
    p = sub.add_parser("set-default", parents=[server], help="route /predictions/NAME to VERSION")
    p.add_argument("name", metavar="NAME", help="model name")
    p.add_argument("version", metavar="VERSION", help="the version to make the default")
    p = sub.add_parser("scale", parents=[server], help="set a version's worker count")
    p.add_argument("name", metavar="NAME", help="model name")
    p.add_argument("version", metavar="VERSION", nargs="?", default=None,
                   help="version (default: the default version)")
    p.add_argument("--min", type=int, required=True, help="minimum workers")
    p.add_argument("--max", type=int, default=None, help="maximum workers (default: --min)")
    p = sub.add_parser("unregister", parents=[server, drain_],
                       help="remove a version once its queue has drained")
    p.add_argument("name", metavar="NAME", help="model name")
    p.add_argument("version", metavar="VERSION", help="the version to remove")
    p = sub.add_parser("rollout", parents=[server, store, workers, drain_],
                       help="register, smoke-test, set default, retire the old default; roll back on failure")
    p.add_argument("mar", metavar="MAR", help="the new version's archive (path or file name in the store)")
    p.add_argument("--smoke-dir", default=None,
                   help="images that must all succeed on the new version (class folders: accuracy too)")
    p.add_argument("--min-accuracy", type=float, default=None,
                   help="with class folders in --smoke-dir: the least accuracy (0-1) the new version needs")
    p.add_argument("--keep-old", action="store_true", help="keep the old default version registered")
    return parser


def main(args: argparse.Namespace) -> int:
    """Run one subcommand; 0 done, 1 refused or rolled back (usage errors raise UserError: 2)."""
    check_args(args)
    client = Client(args)
    try:
        print(run_command(client, args))
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except tsclient.KeyRejected as e:
        raise UserError(str(e)) from None
    except requests.ConnectionError:
        raise UserError(f"server unreachable at {client.management_url} (is TorchServe running? "
                        f"scripts/serve.sh status)") from None
    return 0


if __name__ == "__main__":
    def _main(args: argparse.Namespace) -> None:
        sys.exit(main(args))

    run_main(_main, get_args_parser().parse_args())
