"""Classify every image under a directory with a model served by TorchServe.

One POST per image to /predictions/MODEL[/VERSION] with many requests in flight, so
the server fills its batches; one result row per file (JSONL, or CSV by the output's
extension) written and flushed as the answers arrive, so a kill loses only the files
in flight and `--resume` finishes the run. One server (--url) is a fleet of one: the
same code spreads the files over a fleet file's replicas.

Exit codes (the README's "Exit codes"): 0 the run finished and at most --max-failed-share of
the files failed (bad images are error rows); 1 more failed; 2 usage or configuration
error, never worth retrying as it is; 3 no replica could be used, or the disk (or quota) of the
outputs is full ("no space left", the rows written kept whole), worth retrying later (--resume keeps
the rows); 130 interrupted (SIGINT or SIGTERM), rows kept.

Every run that sent files leaves `<output stem>.summary.json` beside its rows, also one stopped with
exit 3: the printed summary as data (its fields: client/summary.py); --report HTML adds the run's
report (client/report.py). Both are made from the rows written.

    .venv/bin/python scripts/classify_dir.py DIR --model NAME [--class-folders]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from client import pixels
from client.dispatch import (
    DEFAULT_GRACE_S,
    Dispatcher,
    ReplicaState,
    healthy_servers,
    ping_state,
    probe_replicas,
)
from client.fleet import replicas_from_args
from client.report import DEFAULT_LEAST_CONFIDENT, check_output, make_report
from client.results import FIELDS, RowWriter, Stats, keep_finished_rows, report_class_metrics
from client.policy import Retry
from client.sending import Classifier, RunCheck, look_up, resolve_model
from client.shards import parse_shard, shard_of
from client.summary import Results, summary_of, summary_path, write_summary
from core.errors import EXIT_FAILED, EXIT_OK, BadAnswer, NoSpace, Refused, ServerUnavailable, UserError, command
from core.files import DEFAULT_EXTENSIONS, DEFAULT_MAX_BYTES, iter_files, parse_extensions, true_label_of
from core.torchserve import TorchServe, add_server_flags


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
                             "own URLs and credentials, instead of --url")
    parser.add_argument("--allow-mixed-versions", action="store_true",
                        help="without --version: accept replicas (and --resume rows) of different default "
                             "versions; by default they must all serve one")
    parser.add_argument("--max-failed-share", type=float, default=0.05, metavar="SHARE",
                        help="exit 1 when more than this share (0-1) of the files failed; bad images are "
                             "error rows, not a failed run (default: %(default)s)")
    parser.add_argument("--give-up-after", type=float, default=DEFAULT_GRACE_S, metavar="SECONDS",
                        help="stop (exit 3, rows kept) when no replica has answered for this long "
                             "(default: %(default)s)")
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
                        help="retries of a file after a transient failure (502/503/504/507 with exponential "
                             "backoff; a timeout or cut connection, on another replica) (default: %(default)s)")
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
    parser.add_argument("--report", default=None, metavar="HTML",
                        help="after the run, write a self-contained HTML report of the output's rows "
                             "(as scripts/report.py does)")
    parser.add_argument("--least-confident", type=int, default=DEFAULT_LEAST_CONFIDENT, metavar="N",
                        help="--report: the N least confident images shown as thumbnails, each about 3 KB "
                             "of the report (6 KB at most) (default: %(default)s)")
    return parser


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run covers and where its rows go, from the flags, checked before any request."""

    root: Path
    extensions: set[str]
    recursive: bool
    shard: tuple[int, int] | None
    output: Path
    fields: tuple[str, ...]
    png: Path  # the confusion matrix, with class folders
    summary: Path  # <output stem>.summary.json, written at the end of every run
    report: Path | None  # --report


def plan_run(args: argparse.Namespace) -> Plan:
    """The run's plan; UserError for every usage mistake, before anything is sent."""
    root = Path(args.dir)
    if not root.is_dir():
        raise UserError(f"not a folder: {args.dir}")
    if (args.concurrency < 1 or args.topk < 1 or args.retries < 0 or args.timeout <= 0
            or args.max_request_size < 1 or args.give_up_after <= 0):
        raise UserError("--concurrency, --topk and --max-request-size must be >= 1, --retries >= 0, "
                        "--timeout and --give-up-after > 0")
    if not 0 <= args.max_failed_share <= 1:
        raise UserError(f"--max-failed-share must be between 0 and 1, not {args.max_failed_share}")
    if args.least_confident < 0:
        raise UserError(f"--least-confident must be >= 0, not {args.least_confident}")
    output = Path(args.output)
    if not output.parent.is_dir():
        raise UserError(f"output folder not found: {output.parent}")
    if output.is_dir():
        raise UserError(f"--output {output} is a folder: name a file (results.jsonl, or .csv)")
    report = Path(args.report) if args.report else None
    if report is not None:
        check_output(report, [output])
    return Plan(root, parse_extensions(args.extensions), not args.no_recursive,
                parse_shard(args.shard) if args.shard else None, output,
                FIELDS + (("true_label",) if args.class_folders else ()),
                output.with_name(output.stem + ".confusion.png"), summary_path(output), report)


def look(states: list[ReplicaState], model: str, version: str | None, settings: bool) -> dict[str, object]:
    """One describe of each replica that is in -> what it serves (Served, None: not registered, False:
    not known, its management API did not answer, said); a replica answering nonsense is put out."""
    served: dict[str, object] = {}
    for state in (s for s in states if s.healthy):
        try:
            served[state.replica.name] = look_up(state.server, model, version, settings)
        except BadAnswer as e:
            state.healthy, state.why = False, str(e)
    return served


def run_check(args: argparse.Namespace, states: list[ReplicaState], model: str, served: dict) -> RunCheck:
    """The checks every replica must pass, from what the healthy ones serve now: one default version
    (unless --version or --allow-mixed-versions) and, for client-side pixels, one preprocessing."""
    known = {s.replica.name: served[s.replica.name] for s in states
             if s.healthy and served.get(s.replica.name) is not False}
    default = None
    if args.version is None and not args.allow_mixed_versions:
        versions = {name: found and found.version for name, found in known.items()}
        if len(set(versions.values())) > 1:
            named = "; ".join(f"{name}: {v or 'not registered'}" for name, v in versions.items())
            raise UserError(f"the replicas serve different default versions of '{model}' ({named}); pass "
                            f"--version, or --allow-mixed-versions to accept rows of each")
        default = next(iter(versions.values()), None)
    settings = None
    if args.preprocess != "server":
        for name, found in known.items():
            if found and found.unread:  # a worker still loading, say: it is checked again when it comes in
                logging.getLogger("classify_dir").warning("preprocessing settings of replica %s not compared: "
                                                          "%s", name, found.unread)
        found = {name: found and found.settings for name, found in known.items() if not (found and found.unread)}
        distinct = list(dict.fromkeys(found.values()))
        if len(distinct) > 1:
            (a, sa), (b, sb) = [next((n, v) for n, v in found.items() if v == d) for d in distinct[:2]]
            raise UserError(f"replicas {a} and {b} serve '{model}' with different preprocessing settings "
                            f"({a}: {sa}; {b}: {sb}); deploy the same version everywhere or use "
                            f"--preprocess server")
        settings = distinct[0] if distinct else None
    return RunCheck(model, args.version, default, settings)


def _default_version(state: ReplicaState, model: str) -> str | None:
    """The replica's default version of `model`; None (any version) when its management API cannot be read."""
    try:
        return state.server.default_version(model)
    except (ServerUnavailable, Refused) as e:
        logging.getLogger("classify_dir").warning("%s: default version not read (%s)", state.replica.name, e)
        return None


def keep_out_failing(states: list[ReplicaState], check: RunCheck, served: dict, source: str) -> list[TorchServe]:
    """Put out, with its reason, each healthy replica that fails `check`; the servers left in."""
    for state in states:
        if state.healthy:
            why = check.problem(state.server, ready=False, served=served[state.replica.name])
            state.healthy, state.why = why is None, why
    return healthy_servers(states, source)


def connect(args: argparse.Namespace) -> tuple[Dispatcher, str, str, RunCheck]:
    """Replicas -> probed, model resolved and checked on each -> the run's dispatcher, its model, the
    preprocessing mode used and the run's checks. A replica failing a check starts out, with its reason."""
    replicas, source = replicas_from_args(args)
    states = probe_replicas(replicas, args.timeout)
    model = resolve_model(args, healthy_servers(states, source))
    served = look(states, model, args.version, settings=args.preprocess != "server")  # one describe each
    keep_out_failing(states, RunCheck(model, args.version), served, source)  # the model is there, with a worker
    check = run_check(args, states, model, served)  # then: one version and one preprocessing among those left
    keep_out_failing(states, check, served, source)
    first = served.get(next(s.replica.name for s in states if s.healthy))
    unread = "the management API did not answer" if first is False else first and first.unread
    why = f"its settings could not be read ({unread})" if unread else pixels.NO_SETTINGS
    mode, prepare = pixels.choose(args.preprocess, model, check.settings, why)
    for state in states:
        state.sender = Classifier(state.server, model, args.version, topk=args.topk, timeout=args.timeout)

    def admit(state: ReplicaState) -> str | None:
        """The start's checks again, before a replica comes back in. The version to match is what the
        replicas that are in serve now (a rollout during the run moves them all); none in: any."""
        now = check
        if check.default_version is not None:
            serving = next((s for s in states if s.healthy), None)
            now = dataclasses.replace(check, default_version=serving and _default_version(serving, model))
        return ping_state(state) or now.problem(state.server, ready=True)

    dispatcher = Dispatcher(states, args.concurrency, Retry(total=args.retries), prepare=prepare,
                            max_bytes=args.max_request_size, model=model, admit=admit,
                            grace=args.give_up_after)
    return dispatcher, model, mode, check


class Walk:
    """(path, relative path) of every file of the run still to do; `seen` counts every file walked."""

    def __init__(self, plan: Plan, done: set[str]):
        self.plan, self.done, self.seen = plan, done, 0

    def __iter__(self) -> Iterator[tuple[Path, str]]:
        plan = self.plan
        # matched by identity: DIR may reach them by a link
        skip = frozenset(p for p in (plan.output, plan.png, plan.summary, plan.report) if p is not None)
        for path in iter_files(plan.root, plan.extensions, plan.recursive, skip):
            rel = path.relative_to(plan.root).as_posix()
            self.seen += 1
            if rel not in self.done and not (plan.shard and shard_of(rel, plan.shard[1]) != plan.shard[0]):
                yield path, rel


class Run:
    """Sends the files with `capacity` in flight and writes each row as its answer arrives."""

    def __init__(self, dispatcher: Dispatcher, writer: RowWriter, stats: Stats, capacity: int,
                 class_folders: bool):
        self.dispatcher, self.writer, self.stats = dispatcher, writer, stats
        self.capacity, self.class_folders = capacity, class_folders
        self.pending: set[Future] = set()
        self.fatal: str | None = None
        self.fatal_error: type[ServerUnavailable] = ServerUnavailable  # KeyRefused: a configuration error
        self.bar = tqdm(unit="file", disable=not sys.stderr.isatty(), dynamic_ncols=True)

    def send_all(self, files: Iterator[tuple[Path, str]]) -> None:
        """Every file through the dispatcher; stops sending at the first fatal error."""
        pool = ThreadPoolExecutor(self.capacity, thread_name_prefix="classify")
        interrupted = False
        try:
            for path, rel in files:
                while len(self.pending) >= self.capacity and self.fatal is None:
                    self.collect()
                if self.fatal is not None:
                    break
                future = pool.submit(self.dispatcher.classify, path, rel)
                future.rel = rel  # named if it fails unexpectedly
                self.pending.add(future)
            while self.pending:
                self.collect()
        except KeyboardInterrupt:
            interrupted = True  # nothing more here: the process leaves at once (run), the rows stay
            raise
        finally:
            # interrupted: no waiting for the requests in flight (up to --timeout), and no shutdown of the
            # pool at all: the interrupt may have come inside pool.submit, which holds the lock that
            # shutdown takes (a deadlock); the process leaves with os._exit, the rows written stay
            if not interrupted:
                pool.shutdown(wait=True)
            self.bar.close()

    def collect(self) -> None:
        """Write the rows of the requests that finished; a fatal error stops the run."""
        finished, self.pending = wait(self.pending, return_when=FIRST_COMPLETED)
        for future in finished:
            try:
                result = future.result()
            except ServerUnavailable as e:  # KeyRefused too: its exit code (2) is kept for the end
                self.stop(str(e), type(e))
                continue
            except Exception as e:  # noqa: BLE001 - a bug or an unforeseen failure: stop, the rows kept
                self.stop(f"unexpected {type(e).__name__} while sending {future.rel}: {e}")
                continue
            if result is not None:
                self.write(*result)

    def stop(self, why: str, error: type[ServerUnavailable] = ServerUnavailable) -> None:
        if self.fatal is None:
            self.fatal, self.fatal_error = why, error
        self.dispatcher.abort.set()

    def write(self, row: dict, reason: str | None) -> None:
        if self.class_folders:
            row["true_label"] = true_label_of(row["path"])
        try:
            self.writer.write(row)
        except NoSpace as e:  # the file still ends on its last whole row; --resume sends this file again
            self.stop(str(e), NoSpace)
            return
        self.stats.add(row, reason)
        self.bar.update(1)
        self.bar.set_postfix(ok=self.stats.ok, failed=sum(self.stats.failed.values()), refresh=False)


def served_precision(state: ReplicaState, model: str, version: str | None) -> str | None:
    """The precision the replica serves, from its handler's describe; None when it does not say."""
    try:
        metadata = state.server.describe(model, version, customized="true")[0].get("customizedMetadata")
        metadata = json.loads(metadata) if isinstance(metadata, str) else metadata
        return str(metadata["precision"]["served"])
    except (ServerUnavailable, Refused, ValueError, LookupError, TypeError, AttributeError):
        return None


def run_facts(run: Run, mode: str, elapsed: float, precisions: dict[str, str | None]) -> dict:
    """summary.json's `run`: what only the run itself saw (its time, each replica's rate and outages)."""
    stats, seconds = run.stats, max(elapsed, 1e-9)
    return {"elapsed_s": round(elapsed, 3), "images_per_s": round((stats.files - stats.resumed) / seconds, 2),
            "resumed": stats.resumed, "preprocess": mode, "stopped": run.fatal,
            "replicas": {s.replica.name: {"files": s.files, "images_per_s": round(s.files / seconds, 2),
                                          "errors": s.errors, "taken_out": s.taken_out, "out_why": s.out_why,
                                          "served_precision": precisions.get(s.replica.name)}
                         for s in run.dispatcher.states}}


def write_outputs(args: argparse.Namespace, plan: Plan, run: Run, mode: str, elapsed: float,
                  precisions: dict[str, str | None]) -> None:
    """The summary.json beside the rows (every run), and with --report the HTML report, both from the rows."""
    summary = summary_of(Results([plan.output], strict=False))
    summary["run"] = run_facts(run, mode, elapsed, precisions)
    write_summary(summary, plan.summary)
    if plan.report is not None:
        make_report([plan.output], plan.report, root=plan.root, least_confident=args.least_confident,
                    strict=False)
        print(f"report: {plan.report} ({plan.report.stat().st_size:,} bytes)")


def summarise(args: argparse.Namespace, plan: Plan, run: Run, walked: int, model: str, mode: str,
              elapsed: float, precisions: dict[str, str | None]) -> int:
    """Print the summary lines, write summary.json (and the report); the exit code (0, or 1 when more
    than --max-failed-share failed)."""
    stats = run.stats
    failed = sum(stats.failed.values())
    reasons = ", ".join(f"{r}: {n}" for r, n in stats.failed.most_common())
    run_files = stats.files - stats.resumed
    print(f"files {stats.files}" + (f" ({stats.resumed} already done, resumed)" if stats.resumed else "")
          + f", ok {stats.ok}, failed {failed}" + (f" ({reasons})" if reasons else "")
          + f"; {run_files / max(elapsed, 1e-9):.1f} images/s over {elapsed:.1f}s; latency ms "
          f"p50 {stats.percentile(50):.1f} p95 {stats.percentile(95):.1f} p99 {stats.percentile(99):.1f}")
    print("\n".join(run.dispatcher.summary(elapsed)))
    if len(stats.versions) > 1:
        print("versions: " + ", ".join(f"{v}: {n} rows" for v, n in sorted(stats.versions.items())))
    try:
        if args.class_folders and run.fatal is None:
            print(report_class_metrics(stats, plan.png))
        write_outputs(args, plan, run, mode, elapsed, precisions)
    except NoSpace as e:  # the rows written stay whole: retried as a run stopped for space
        if run.fatal is None:
            run.fatal, run.fatal_error = str(e), NoSpace
        else:
            run.fatal += f"; {e}"
    if run.fatal is not None:  # exit 3, worth retrying; a refused key or token is 2, as at the start
        raise run.fatal_error(f"{run.fatal}; {stats.files} rows kept in {plan.output}: rerun with --resume "
                               f"to finish")
    versions = "/".join(sorted(stats.versions)) or "?"
    print(f"classify_dir: {stats.ok}/{stats.files} ok with {model} {versions}"
          + (f", shard {args.shard} of {walked} files" if plan.shard else "")
          + f" -> {plan.output}, {plan.summary.name} (preprocess {mode})")
    share = failed / max(1, stats.files)
    if share > args.max_failed_share:
        print(f"classify_dir: {failed} of {stats.files} files failed ({share:.1%}), more than "
              f"--max-failed-share {args.max_failed_share:g}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(args: argparse.Namespace) -> int:
    """Classify DIR: walk -> prepare and send (the dispatcher) -> write -> summarise; the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    plan = plan_run(args)
    dispatcher, model, mode, check = connect(args)
    interrupted = False
    try:
        stats = Stats()
        done = set()
        if args.resume:
            done = keep_finished_rows(plan.output, plan.fields, stats, model,
                                      None if args.allow_mixed_versions else (check.version or check.default_version))
        outside = sorted(p for p in done if plan.shard and shard_of(p, plan.shard[1]) != plan.shard[0])
        if outside:
            raise UserError(f"{plan.output} has rows of files outside shard {args.shard} (e.g. {outside[0]}): "
                            f"written with another --shard? give each shard its own --output")
        files = Walk(plan, done)
        walk = iter(files)
        first = next(walk, None)  # before the output is opened: a run with no file must not truncate it
        if first is None and files.seen == 0:
            raise UserError(f"no files with extensions {','.join(sorted(plan.extensions))} under {plan.root}"
                            + (f"; {plan.output} left as it was" if plan.output.exists() else ""))
        writer = RowWriter(plan.output, plan.fields, append=args.resume)
        run = Run(dispatcher, writer, stats, args.concurrency * len(dispatcher.states), args.class_folders)
        started = time.perf_counter()
        try:
            run.send_all(itertools.chain([first] if first is not None else [], walk))
        except KeyboardInterrupt:
            interrupted = True
            raise KeyboardInterrupt(f"{stats.files} rows kept in {plan.output}; "
                                    f"rerun with --resume to finish") from None
        finally:
            writer.close()
        elapsed = time.perf_counter() - started
        precisions = {s.replica.name: served_precision(s, model, args.version)
                      for s in dispatcher.states if s.healthy}
    finally:
        if not interrupted:  # interrupted: no lock or join on the way out, the process ends at once
            dispatcher.close()
    return summarise(args, plan, run, files.seen, model, mode, elapsed, precisions)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt()


def run(args: argparse.Namespace) -> int:
    """main, except that Ctrl-C or SIGTERM (a pod's stop) leaves at once with exit code 130, rows kept."""
    signal.signal(signal.SIGTERM, _interrupt)
    # Python leaves SIGINT ignored when it starts ignored (a shell's `cmd &` without job control):
    # the run's own Ctrl-C must stop it all the same
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return main(args)
    except KeyboardInterrupt as e:
        # the pool's threads may sit in a socket read until --timeout and the interpreter
        # joins them at exit: leave now, the rows are already flushed
        print(f"interrupted: {e}" if e.args else "interrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


cli = command(run, get_args_parser)
