"""Classify every image under a directory with a model served by TorchServe.

One POST per image to /predictions/MODEL[/VERSION] with many requests in flight, so
the server fills its batches; one result row per file (JSONL, or CSV by the output's
extension) written and flushed as the answers arrive, so a kill loses only the files
in flight and `--resume` finishes the run.

    .venv/bin/python scripts/classify_dir.py DIR --model NAME [--class-folders]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `scripts` and `training` importable
    sys.path.insert(0, str(REPO_ROOT))

from scripts import tsclient  # noqa: E402
from scripts.predict import (Classifier, Fatal, VersionTracker, check_workers, resolve_model,  # noqa: E402
                             wait_for_server)
from scripts.results import FIELDS, RowWriter, Stats, keep_finished_rows, report_class_metrics  # noqa: E402
from scripts.walk import DEFAULT_EXTENSIONS, DEFAULT_MAX_BYTES, iter_files, true_label_of  # noqa: E402
from training.errors import UserError, run_main  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", metavar="DIR", help="folder of images to classify")
    parser.add_argument("--model", default=None, help="model name (default: the only registered model)")
    parser.add_argument("--version", default=None,
                        help="model version (default: the server's default version)")
    tsclient.add_server_flags(parser)
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
    parser.add_argument("--max-request-size", type=int, default=DEFAULT_MAX_BYTES, metavar="BYTES",
                        help="larger files get an error row without being read: the server's "
                             "max_request_size, 64 MiB in config.properties (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the output's ok rows, classify only the other files")
    parser.add_argument("--class-folders", action="store_true",
                        help="DIR/<label>/...: report accuracy, precision/recall and a confusion matrix")
    return parser


def main(args: argparse.Namespace) -> int:
    """Classify DIR; return the exit code (0 all ok, 1 some files failed)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    root = Path(args.dir)
    if not root.is_dir():
        raise UserError(f"not a folder: {args.dir}")
    if (args.concurrency < 1 or args.topk < 1 or args.retries < 0 or args.timeout <= 0
            or args.max_request_size < 1):
        raise UserError("--concurrency, --topk and --max-request-size must be >= 1, --retries >= 0, "
                        "--timeout > 0")
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
    check_workers(management_url, keys, model, args.version)
    versions = VersionTracker(management_url, keys, model, args.version)
    classifier = Classifier(url, model, args.version, keys, versions, topk=args.topk, retries=args.retries,
                            timeout=args.timeout, max_bytes=args.max_request_size)
    stats = Stats()
    done = keep_finished_rows(output, fields, stats) if args.resume else set()
    writer = RowWriter(output, fields, append=args.resume)
    skip = frozenset({output, png})  # matched by file identity: DIR may be relative, or reach them by a link
    started = time.perf_counter()
    fatal, interrupted = None, False
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
        interrupted = True
        classifier.abort.set()
        raise KeyboardInterrupt(f"{stats.files} rows kept in {output}; "
                                f"rerun with --resume to finish") from None
    finally:
        # interrupted: no waiting for the requests in flight (up to --timeout); the rows written stay
        pool.shutdown(wait=not interrupted, cancel_futures=True)
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
        try:
            code = main(args)
        except KeyboardInterrupt as e:
            # the pool's threads may sit in a socket read until --timeout and the interpreter
            # joins them at exit: leave now, the rows are already flushed
            print(f"interrupted: {e}" if e.args else "interrupted", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        sys.exit(code)

    run_main(_main, get_args_parser().parse_args())
