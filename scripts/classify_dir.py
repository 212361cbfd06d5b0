"""Classify every image under a directory with a model served by TorchServe.

One POST per image to /predictions/MODEL[/VERSION] with many requests in flight, so
the server fills its batches; one result row per file (JSONL, or CSV by the output's
extension) written and flushed as the answers arrive, so a kill loses only the files
in flight and `--resume` finishes the run.

    .venv/bin/python scripts/classify_dir.py DIR --model NAME [--class-folders]
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import sys
import threading
import time
from array import array
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Iterator

import requests
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `scripts` and `training` importable
    sys.path.insert(0, str(REPO_ROOT))

from scripts import tsclient  # noqa: E402
from training.errors import UserError, run_main  # noqa: E402

logger = logging.getLogger("classify_dir")
DEFAULT_EXTENSIONS = ".jpg,.jpeg,.png,.bmp,.gif,.webp,.tif,.tiff"
TRANSIENT_STATUSES = (502, 503, 504, 507)  # busy, queue full, out of memory: worth another try
FIELDS = ("path", "status", "label", "probability", "topk", "error", "http_status", "model",
          "model_version", "latency_ms")
MAX_BACKOFF_S = 8.0
KEY_REFRESHES = 3  # per file: a rotated key is renewed, a wrong one is not renewed forever
VERSION_RETRY_S = 5.0  # after a failed default-version lookup, reuse the last answer this long


class Fatal(UserError):
    """The run cannot go on (server unreachable, key refused): exit code 2."""


def iter_files(root: Path, extensions: set[str], recursive: bool = True,
               skip: frozenset[Path] = frozenset()) -> Iterator[Path]:
    """Files under root with one of the extensions (any case), in sorted order, each folder once."""
    seen: set[tuple[int, int]] = set()
    stack: list[Iterator[os.DirEntry]] = []

    def enter(directory: str) -> None:
        try:
            st = os.stat(directory)
            if (st.st_dev, st.st_ino) in seen:  # a symlink loop, or a second link to one folder
                return
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            logger.warning("skipping folder %s: %s", directory, e.strerror or e)
            return
        stack.append(iter(entries))

    enter(str(root))
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        try:
            if entry.is_dir():
                if recursive:
                    enter(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in extensions:
                # a broken link is yielded too: it becomes an "unreadable" row, not a silent gap
                if (entry.is_file() or entry.is_symlink()) and Path(entry.path) not in skip:
                    yield Path(entry.path)
        except OSError:
            continue


class VersionTracker:
    """The version that answered when the server does not say (no X-Model-Version header).

    --version pins it. Otherwise the management API's default version, looked up again
    whenever the last lookup was sent before the request was: a request sent after a
    set-default is labelled with the new version; only one in flight across the switch
    can be labelled new while the old version answered it. Lookups are shared between
    threads, so it costs about one per batch of answers.
    """

    def __init__(self, management_url: str, keys: tsclient.Keys, model: str, pinned: str | None):
        self.management_url, self.keys, self.model, self.pinned = management_url, keys, model, pinned
        self._lock = threading.Lock()
        self._value: str | None = pinned
        self._looked_at = float("-inf")  # when the last lookup was sent (time.monotonic)
        self._session = tsclient.new_session(1)

    def version_for(self, sent_at: float) -> str | None:
        """The version for a request sent at `sent_at` (time.monotonic)."""
        if self.pinned:
            return self.pinned
        with self._lock:
            if self._looked_at < sent_at:
                looked_at = time.monotonic()
                try:
                    self._value = tsclient.default_version(self.management_url, self.keys, self.model,
                                                           self._session)
                    self._looked_at = looked_at
                except (requests.RequestException, ValueError, tsclient.KeyRejected) as e:
                    logger.debug("default version unknown: %s", e)
                    self._looked_at = looked_at + VERSION_RETRY_S  # do not ask once per answer
            return self._value


class Classifier:
    """Sends one file, with retries and key renewal; thread-safe, one keep-alive session per thread."""

    def __init__(self, url: str, model: str, version: str | None, keys: tsclient.Keys,
                 versions: VersionTracker, *, topk: int, retries: int, timeout: float):
        self.endpoint = f"{url}/predictions/{model}" + (f"/{version}" if version else "")
        self.model, self.keys, self.versions = model, keys, versions
        self.topk, self.retries, self.timeout = topk, retries, timeout
        self.abort = threading.Event()
        self._local = threading.local()

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = tsclient.new_session(pool_size=2)
        return self._local.session

    def classify(self, path: Path, rel: str) -> tuple[dict, str | None] | None:
        """One file -> (row, failure reason or None); None when the run was aborted first."""
        row = {"path": rel, "model": self.model}
        try:
            data = path.read_bytes()
        except OSError as e:
            return error_row(row, f"cannot read the file: {e.strerror or e}", None), "unreadable"
        attempt, refreshes = 0, 0
        while not self.abort.is_set():
            key = self.keys.get("inference")
            headers = {"Content-Type": "application/octet-stream", **self.keys.headers("inference")}
            started, sent_at = time.perf_counter(), time.monotonic()
            try:
                response = self._session().post(self.endpoint, data=data, headers=headers,
                                                timeout=self.timeout)
                transient = response.status_code in TRANSIENT_STATUSES
                reason = f"http {response.status_code}"
            except requests.Timeout:
                response, transient, reason = None, True, "timeout"
            except requests.ConnectionError:
                response, transient, reason = None, True, "connection"
            row["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
            if response is not None and tsclient.is_auth_error(response):
                refreshes += 1
                if refreshes <= KEY_REFRESHES and self.keys.refresh("inference", key):
                    continue
                raise Fatal(f"the server refused the inference key from {self.keys.key_file} and no "
                            f"fresh key could be read or requested; pass the right file with --token-file")
            if response is not None and response.status_code == 404 and _is_unknown_model(response):
                raise Fatal(f"{self.endpoint}: {_error_message(response)}")
            if transient and attempt < self.retries:
                self.abort.wait(min(MAX_BACKOFF_S, 0.25 * 2 ** attempt) * random.uniform(0.75, 1.25))
                attempt += 1
                continue
            if response is None:
                if reason == "connection":
                    raise Fatal(f"server unreachable at {self.endpoint} after {self.retries} retries")
                return error_row(row, f"no answer within {self.timeout:g}s "
                                      f"(tried {attempt + 1} times)", None), reason
            row["model_version"] = (response.headers.get("X-Model-Version")
                                    or self.versions.version_for(sent_at))
            if response.status_code == 200:
                try:
                    return ok_row(row, response.json(), self.topk), None
                except (ValueError, KeyError, IndexError, TypeError):
                    return error_row(row, f"unexpected answer: {response.text[:200]}", 200), "bad answer"
            return error_row(row, _error_message(response), response.status_code), reason
        return None


def _is_unknown_model(response: requests.Response) -> bool:
    try:
        return response.json().get("type") in ("ModelNotFoundException", "ModelVersionNotFoundException")
    except (ValueError, AttributeError):
        return False


def _error_message(response: requests.Response) -> str:
    try:
        body = response.json()
        message = body.get("error") or body.get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or response.reason or response.text[:200] or f"HTTP {response.status_code}")


def ok_row(row: dict, answer: list, topk: int) -> dict:
    """Fill a row from the handler's top-k list (highest first)."""
    top = [{"label": a["label"], "index": int(a["index"]), "probability": float(a["probability"])}
           for a in answer[:topk]]
    return {**row, "status": "ok", "label": top[0]["label"], "probability": top[0]["probability"],
            "topk": top, "error": None, "http_status": 200}


def error_row(row: dict, message: str, http_status: int | None) -> dict:
    """Fill a row for a file that got no prediction."""
    return {**row, "status": "error", "label": None, "probability": None, "topk": None,
            "error": message, "http_status": http_status}


class RowWriter:
    """Appends rows to JSONL or CSV, one flush per row."""

    def __init__(self, path: Path, fields: tuple[str, ...], append: bool, as_csv: bool | None = None):
        self.fields = fields
        self.csv = path.suffix.lower() == ".csv" if as_csv is None else as_csv
        exists = append and path.exists() and path.stat().st_size > 0
        # surrogateescape: a file name that is not valid UTF-8 is written back byte for byte
        self.file = open(path, "a" if append else "w", encoding="utf-8", newline="",
                         errors="surrogateescape")
        if self.csv:
            self.writer = csv.DictWriter(self.file, fieldnames=fields, extrasaction="ignore")
            if not exists:
                self.writer.writeheader()

    def write(self, row: dict) -> None:
        """Write one row and flush it to the operating system."""
        row = {f: row.get(f) for f in self.fields}
        if self.csv:
            if row.get("topk") is not None:
                row["topk"] = json.dumps(row["topk"], ensure_ascii=False)
            self.writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
        else:
            self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        """Close the file."""
        self.file.close()


def read_rows(path: Path) -> Iterator[dict]:
    """Rows of an earlier output; a line cut short by a kill is skipped."""
    with open(path, encoding="utf-8", newline="", errors="surrogateescape") as f:
        if path.suffix.lower() == ".csv":
            for row in csv.DictReader(f):
                if None in row.values() or None in row:  # short or overlong: cut by a kill
                    continue
                yield row
        else:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    yield row


def true_label_of(rel: str) -> str | None:
    """With class folders, the first folder under DIR names the true label."""
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 else None


def keep_finished_rows(path: Path, fields: tuple[str, ...], stats: "Stats") -> set[str]:
    """--resume: rewrite the output with only its ok rows (first per path); return their paths."""
    done: set[str] = set()
    if not path.exists():
        return done
    partial = path.with_name(path.name + ".resume-tmp")
    writer = RowWriter(partial, fields, append=False, as_csv=path.suffix.lower() == ".csv")
    try:
        for row in read_rows(path):
            if row.get("status") == "ok" and isinstance(row.get("path"), str) and row["path"] not in done:
                done.add(row["path"])
                if isinstance(row.get("topk"), str):  # CSV: back to a list
                    row["topk"] = json.loads(row["topk"]) if row["topk"] else None
                if "true_label" in fields and not row.get("true_label"):
                    row["true_label"] = true_label_of(row["path"])
                writer.write(row)
                stats.add(row, None, resumed=True)
    finally:
        writer.close()
    os.replace(partial, path)
    return done


class Stats:
    """Counts, latencies and (with class folders) the confusion counts; O(files) floats at most."""

    def __init__(self):
        self.files = self.ok = self.resumed = 0
        self.failed: Counter[str] = Counter()
        self.latencies = array("f")
        self.confusion: Counter[tuple[str, str]] = Counter()
        self.true_counts: Counter[str] = Counter()
        self.errors_with_label = 0

    def add(self, row: dict, reason: str | None, resumed: bool = False) -> None:
        """Account for one row."""
        self.files += 1
        self.resumed += resumed
        if not resumed and row.get("latency_ms") is not None:
            self.latencies.append(float(row["latency_ms"]))
        true = row.get("true_label")
        if true:
            self.true_counts[true] += 1
        if row.get("status") == "ok":
            self.ok += 1
            if true:
                self.confusion[(true, row["label"])] += 1
        else:
            self.failed[reason or "error"] += 1
            self.errors_with_label += bool(true)

    def percentile(self, q: float) -> float:
        """The q-th percentile of this run's latencies (nearest rank), 0 when none."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def report_class_metrics(stats: Stats, png: Path) -> str:
    """Print accuracy, error rate, per-class precision/recall; write the confusion matrix PNG."""
    classified = sum(stats.confusion.values())
    correct = sum(n for (t, p), n in stats.confusion.items() if t == p)
    labelled = sum(stats.true_counts.values())
    labels = sorted({t for t, _ in stats.confusion} | {p for _, p in stats.confusion}
                    | set(stats.true_counts))
    lines = [f"accuracy {correct / max(1, classified):.4f}, error rate {1 - correct / max(1, classified):.4f} "
             f"({correct}/{classified} classified files right); "
             f"{stats.errors_with_label}/{labelled} files failed and are not counted",
             f"{'class':<24} {'precision':>9} {'recall':>9} {'support':>8}"]
    for label in labels:
        tp = stats.confusion[(label, label)]
        predicted = sum(n for (_, p), n in stats.confusion.items() if p == label)
        actual = sum(n for (t, _), n in stats.confusion.items() if t == label)
        precision = f"{tp / predicted:.4f}" if predicted else "-"
        recall = f"{tp / actual:.4f}" if actual else "-"
        lines.append(f"{label[:24]:<24} {precision:>9} {recall:>9} {actual:>8}")
    if labels:
        plot_confusion(labels, stats.confusion, png)
        lines.append(f"confusion matrix: {png}")
    return "\n".join(lines)


def plot_confusion(labels: list[str], confusion: Counter, png: Path) -> None:
    """Rows: true class, columns: predicted class; counts written in the cells when few."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = {label: i for i, label in enumerate(labels)}
    grid = [[0] * len(labels) for _ in labels]
    for (true, pred), n in confusion.items():
        grid[index[true]][index[pred]] = n
    size = min(20.0, 2.5 + 0.45 * len(labels))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(grid, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (class folder)")
    if len(labels) <= 30:
        peak = max(max(r) for r in grid) or 1
        for i, r in enumerate(grid):
            for j, n in enumerate(r):
                ax.text(j, i, n, ha="center", va="center", color="white" if n > peak / 2 else "black")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def resolve_model(args, management_url: str, keys: tsclient.Keys) -> str:
    """Check the model (and version) is registered; with no --model, take the only one there is."""
    try:
        if args.model is None:
            names = tsclient.list_models(management_url, keys)
            if len(names) != 1:
                raise UserError(f"pass --model: the server has {len(names)} models "
                                f"({', '.join(names) or 'none'})")
            return names[0]
        versions = [v["modelVersion"] for v in tsclient.describe(management_url, keys, args.model)]
    except (requests.RequestException, tsclient.KeyRejected, ValueError) as e:
        if args.model is None:
            raise UserError(f"pass --model: cannot list the models at {management_url} ({e})") from None
        logger.warning("cannot check model %s with the management API (%s); going on", args.model, e)
        return args.model
    if not versions:
        raise UserError(f"model '{args.model}' is not registered on {management_url}")
    if args.version and args.version not in versions:
        raise UserError(f"model '{args.model}' has no version '{args.version}' "
                        f"(registered: {', '.join(versions)})")
    return args.model


def wait_for_server(url: str, keys: tsclient.Keys, retries: int) -> None:
    """Check /ping, retrying with backoff; Fatal when it never answers or refuses the key."""
    why = None
    for attempt in range(retries + 1):
        why = tsclient.ping(url, keys)
        if why is None:
            return
        if "InvalidKeyException" in why:
            if not keys.key_file.exists():
                raise Fatal(f"the server at {url} wants a key and there is no {keys.key_file}; "
                            f"pass the server's key_file.json with --token-file")
            raise Fatal(f"the server at {url} refused the inference key from {keys.key_file}; "
                        f"pass the server's key_file.json with --token-file")
        if attempt < retries:
            time.sleep(min(MAX_BACKOFF_S, 0.25 * 2 ** attempt))
    raise Fatal(f"server unreachable: {why}")


def get_args_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", metavar="DIR", help="folder of images to classify")
    parser.add_argument("--model", default=None, help="model name (default: the only registered model)")
    parser.add_argument("--version", default=None,
                        help="model version (default: the server's default version)")
    parser.add_argument("--url", default=tsclient.DEFAULT_INFERENCE_URL,
                        help="TorchServe inference URL (default: %(default)s)")
    parser.add_argument("--management-url", default=None,
                        help="management URL (default: the inference URL's host, port + 1)")
    parser.add_argument("--output", default="results.jsonl",
                        help="result rows: JSONL, or CSV when the name ends in .csv (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="requests in flight; at least batchSize x workers so batches fill "
                             "(default: %(default)s)")
    parser.add_argument("--topk", type=int, default=5,
                        help="answers kept per image, at most what the handler sends (default: %(default)s)")
    parser.add_argument("--no-recursive", action="store_true", help="only the files directly in DIR")
    parser.add_argument("--extensions", default=DEFAULT_EXTENSIONS,
                        help="comma-separated file extensions to classify, any case (default: %(default)s)")
    parser.add_argument("--retries", type=int, default=3,
                        help="retries of a transient failure (refused/reset connection, timeout, "
                             "502/503/504/507), with exponential backoff (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for one answer (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the output's ok rows, classify only the other files")
    parser.add_argument("--token-file", default=None,
                        help="the server's key_file.json (default: the one at the repository root)")
    parser.add_argument("--class-folders", action="store_true",
                        help="DIR/<label>/...: report accuracy, precision/recall and a confusion matrix")
    return parser


def main(args: argparse.Namespace) -> int:
    """Classify DIR; return the exit code (0 all ok, 1 some files failed)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    root = Path(args.dir)
    if not root.is_dir():
        raise UserError(f"not a folder: {args.dir}")
    if args.concurrency < 1 or args.topk < 1 or args.retries < 0 or args.timeout <= 0:
        raise UserError("--concurrency and --topk must be >= 1, --retries >= 0, --timeout > 0")
    extensions = {("." + e.strip().lstrip(".")).lower() for e in args.extensions.split(",") if e.strip()}
    if not extensions:
        raise UserError("--extensions names no extension")
    if args.token_file and not Path(args.token_file).is_file():
        raise UserError(f"--token-file not found: {args.token_file}")
    output = Path(args.output)
    if not output.parent.is_dir():
        raise UserError(f"output folder not found: {output.parent}")
    url = args.url.rstrip("/")
    management_url = (args.management_url or tsclient.management_url_for(url)).rstrip("/")
    keys = tsclient.Keys(args.token_file, management_url)
    fields = FIELDS + (("true_label",) if args.class_folders else ())
    png = output.with_name(output.stem + ".confusion.png")

    wait_for_server(url, keys, args.retries)
    model = resolve_model(args, management_url, keys)
    versions = VersionTracker(management_url, keys, model, args.version)
    classifier = Classifier(url, model, args.version, keys, versions,
                            topk=args.topk, retries=args.retries, timeout=args.timeout)
    stats = Stats()
    done = keep_finished_rows(output, fields, stats) if args.resume else set()
    writer = RowWriter(output, fields, append=args.resume)
    skip = frozenset({output.resolve(), png.resolve()})
    started = time.perf_counter()
    fatal = None
    bar = tqdm(unit="file", disable=not sys.stderr.isatty(), dynamic_ncols=True)
    pool = ThreadPoolExecutor(args.concurrency, thread_name_prefix="classify")
    pending: set = set()

    def collect() -> None:
        nonlocal pending, fatal
        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in finished:
            try:
                result = future.result()
            except Fatal as e:
                fatal = fatal or str(e)
                classifier.abort.set()
                continue
            if result is None:
                continue
            row, reason = result
            if args.class_folders:
                row["true_label"] = true_label_of(row["path"])
            writer.write(row)
            stats.add(row, reason)
            bar.update(1)
            bar.set_postfix(ok=stats.ok, failed=sum(stats.failed.values()), refresh=False)

    try:
        for path in iter_files(root, extensions, not args.no_recursive, skip):
            rel = path.relative_to(root).as_posix()
            if rel in done:
                continue
            while len(pending) >= args.concurrency and fatal is None:
                collect()
            if fatal is not None:
                break
            pending.add(pool.submit(classifier.classify, path, rel))
        while pending:
            collect()
    except KeyboardInterrupt:
        classifier.abort.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        writer.close()
        bar.close()
    elapsed = time.perf_counter() - started
    if stats.files == 0 and fatal is None:
        raise UserError(f"no files with extensions {','.join(sorted(extensions))} under {root}")

    failed = sum(stats.failed.values())
    reasons = ", ".join(f"{r}: {n}" for r, n in stats.failed.most_common())
    run_files = stats.files - stats.resumed
    print(f"files {stats.files}" + (f" ({stats.resumed} already done, resumed)" if stats.resumed else "")
          + f", ok {stats.ok}, failed {failed}" + (f" ({reasons})" if reasons else "")
          + f"; {run_files / max(elapsed, 1e-9):.1f} images/s over {elapsed:.1f}s; latency ms "
          f"p50 {stats.percentile(50):.1f} p95 {stats.percentile(95):.1f} p99 {stats.percentile(99):.1f}")
    if args.class_folders and fatal is None:
        print(report_class_metrics(stats, png))
    if fatal is not None:
        raise UserError(f"{fatal}; {stats.files} rows kept in {output}: rerun with --resume to finish")
    print(f"classify_dir: {stats.ok}/{stats.files} ok with {model} -> {output}")
    return 1 if failed else 0


if __name__ == "__main__":
    def _main(args: argparse.Namespace) -> None:
        sys.exit(main(args))

    run_main(_main, get_args_parser().parse_args())
