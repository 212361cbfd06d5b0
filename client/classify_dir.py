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
from urllib.parse import urlsplit

from tqdm import tqdm

from client import pixels
from client.errors import Refused, ServerUnavailable, UserError, run_main
from client.fleet import ReplicaState, first_healthy, load_fleet, probe_replicas, start_fleet
from client.results import FIELDS, RowWriter, Stats, keep_finished_rows, report_class_metrics
from client.sending import (Classifier, VersionTracker, check_ready, check_workers, resolve_model,
                            wait_for_server)
from client.shards import parse_shard, shard_of
from client.torchserve import DEFAULT_INFERENCE_URL, TorchServe, add_server_flags
from client.walk import DEFAULT_EXTENSIONS, DEFAULT_MAX_BYTES, iter_files, true_label_of


def get_args_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", metavar="DIR", help="folder of images to classify")
    parser.add_argument("--model", default=None, help="model name (default: the only registered model)")
    parser.add_argument("--version", default=None,
                        help="model version (default: the server's default version)")
    add_server_flags(parser)
    parser.add_argument("--fleet", default=None, metavar="FILE",
                        help="fleet file (YAML or JSON): spread the files over its replicas, each with its "
                             "own URLs and key file, instead of --url")
    parser.add_argument("--shard", default=None, metavar="K/N",
                        help="classify only shard K of N (K from 0) of DIR's files, chosen by a hash of "
                             "each relative path; merge the outputs with scripts/merge_shards.py")
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
    parser.add_argument("--preprocess", choices=pixels.MODES, default=pixels.DEFAULT_MODE,
                        help="who decodes and resizes: client (here, with the served model's own settings; "
                             "sends small uint8 pixels), server (sends the files), auto (client when the "
                             "model exposes its settings) (default: %(default)s)")
    parser.add_argument("--class-folders", action="store_true",
                        help="DIR/<label>/...: report accuracy, precision/recall and a confusion matrix")
    return parser


def check_same_settings(states: list[ReplicaState], model: str, version: str | None) -> None:
    """UserError when two healthy replicas preprocess differently: client-side pixels suit only one."""
    seen: tuple[str, object] | None = None
    for state in states:
        if not state.healthy:
            continue
        try:
            settings = pixels.fetch_settings(state.server, model, version)
        except (Refused, ServerUnavailable) as e:  # a passing failure must not block the run: said, not fatal
            logging.getLogger("classify_dir").warning("preprocessing settings of replica %s not compared: %s",
                                                      state.replica.name, e)
            continue
        if seen is None:
            seen = (state.replica.name, settings)
        elif settings != seen[1]:
            name = state.replica.name
            raise UserError(f"replicas {seen[0]} and {name} serve '{model}' with different preprocessing "
                            f"settings ({seen[0]}: {seen[1]}; {name}: {settings}); deploy the same version "
                            f"everywhere or use --preprocess server")


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
    shard = parse_shard(args.shard) if args.shard else None
    if args.fleet and (args.url != DEFAULT_INFERENCE_URL or args.management_url or args.token_file):
        raise UserError("--fleet names each replica's URLs and key file: drop --url, --management-url "
                        "and --token-file")
    output = Path(args.output)
    replicas = load_fleet(args.fleet) if args.fleet else None
    server = TorchServe.from_args(args, timeout=args.timeout) if replicas is None else None
    if not output.parent.is_dir():
        raise UserError(f"output folder not found: {output.parent}")
    fields = FIELDS + (("true_label",) if args.class_folders else ())
    png = output.with_name(output.stem + ".confusion.png")

    if replicas is None:
        wait_for_server(server, args.retries)
    else:
        states = probe_replicas(replicas, args.timeout)
        server = first_healthy(states, args.fleet)  # every replica serves the same model
    model = resolve_model(args, server)
    check_workers(server, model, args.version)
    if replicas is not None and args.preprocess != "server":
        check_same_settings(states, model, args.version)
    preprocess_mode, prepare = pixels.choose(args.preprocess, server, model, args.version)

    def make_classifier(server: TorchServe) -> Classifier:
        versions = VersionTracker(server, model, args.version)
        return Classifier(server, model, args.version, versions, topk=args.topk, retries=args.retries,
                          timeout=args.timeout, max_bytes=args.max_request_size, prepare=prepare)

    if replicas is None:
        classifier, capacity = make_classifier(server), args.concurrency
        replica = urlsplit(server.url).netloc  # rows of a single --url name its HOST:PORT
    else:  # --concurrency in flight per replica; a replica failing the model checks starts out
        classifier = start_fleet(states, args.concurrency, make_classifier,
                                 lambda s: check_workers(s, model, args.version), args.fleet,
                                 ready=lambda s: check_ready(s, model, args.version))
        capacity, replica = args.concurrency * len(replicas), None
    stats = Stats()
    done = keep_finished_rows(output, fields, stats) if args.resume else set()
    outside = sorted(p for p in done if shard and shard_of(p, shard[1]) != shard[0])
    if outside:
        raise UserError(f"{output} has rows of files outside shard {args.shard} (e.g. {outside[0]}): "
                        f"written with another --shard? give each shard its own --output")
    writer = RowWriter(output, fields, append=args.resume)
    skip = frozenset({output, png})  # matched by file identity: DIR may be relative, or reach them by a link
    started = time.perf_counter()
    fatal, interrupted = None, False
    bar = tqdm(unit="file", disable=not sys.stderr.isatty(), dynamic_ncols=True)
    pool = ThreadPoolExecutor(capacity, thread_name_prefix="classify")
    pending: set = set()
    walked = 0

    def collect() -> None:
        nonlocal pending, fatal
        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in finished:
            try:
                result = future.result()
            except ServerUnavailable as e:
                fatal = fatal or str(e)
                classifier.abort.set()
                continue
            except Exception as e:  # noqa: BLE001 - a bug or an unforeseen failure: stop, the rows kept
                fatal = fatal or f"unexpected {type(e).__name__} while sending {future.rel}: {e}"
                classifier.abort.set()
                continue
            if result is None:
                continue
            row, reason = result
            row.setdefault("replica", replica)
            if args.class_folders:
                row["true_label"] = true_label_of(row["path"])
            writer.write(row)
            stats.add(row, reason)
            bar.update(1)
            bar.set_postfix(ok=stats.ok, failed=sum(stats.failed.values()), refresh=False)

    try:
        for path in iter_files(root, extensions, not args.no_recursive, skip):
            rel = path.relative_to(root).as_posix()
            walked += 1
            if rel in done or (shard and shard_of(rel, shard[1]) != shard[0]):
                continue
            while len(pending) >= capacity and fatal is None:
                collect()
            if fatal is not None:
                break
            future = pool.submit(classifier.classify, path, rel)
            future.rel = rel  # named if it fails unexpectedly
            pending.add(future)
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
    if walked == 0 and fatal is None:
        raise UserError(f"no files with extensions {','.join(sorted(extensions))} under {root}")

    failed = sum(stats.failed.values())
    reasons = ", ".join(f"{r}: {n}" for r, n in stats.failed.most_common())
    run_files = stats.files - stats.resumed
    print(f"files {stats.files}" + (f" ({stats.resumed} already done, resumed)" if stats.resumed else "")
          + f", ok {stats.ok}, failed {failed}" + (f" ({reasons})" if reasons else "")
          + f"; {run_files / max(elapsed, 1e-9):.1f} images/s over {elapsed:.1f}s; latency ms "
          f"p50 {stats.percentile(50):.1f} p95 {stats.percentile(95):.1f} p99 {stats.percentile(99):.1f}")
    if replicas is not None:
        print("\n".join(classifier.summary(elapsed)))
    if args.class_folders and fatal is None:
        print(report_class_metrics(stats, png))
    if fatal is not None:
        raise ServerUnavailable(f"{fatal}; {stats.files} rows kept in {output}: rerun with --resume to finish")
    print(f"classify_dir: {stats.ok}/{stats.files} ok with {model}"
          + (f", shard {args.shard} of {walked} files" if shard else "") + f" -> {output} "
          f"(preprocess {preprocess_mode})")
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    """main, except that Ctrl-C leaves at once with exit code 130, the rows written kept."""
    try:
        return main(args)
    except KeyboardInterrupt as e:
        # the pool's threads may sit in a socket read until --timeout and the interpreter
        # joins them at exit: leave now, the rows are already flushed
        print(f"interrupted: {e}" if e.args else "interrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


def cli() -> None:
    """The `classify-dir` command (scripts/classify_dir.py)."""
    run_main(run, get_args_parser().parse_args())


if __name__ == "__main__":
    cli()
