"""Manage the models TorchServe serves: list, register, scale, switch versions, roll out safely.

Every command goes through the management API with the management key from key_file.json
(renewed with the API key when it has expired). `rollout` swaps versions with no failed request:
the new version gets its own workers and answers a smoke set before it becomes the default,
and the old version is unregistered only once its queue has drained.

    .venv/bin/python scripts/manage.py list
    .venv/bin/python scripts/manage.py rollout model_store/digits-2.0.mar --smoke-dir demo/val
    .venv/bin/python scripts/manage.py list --fleet fleet.yaml    # every replica, version skew flagged

One server (--url) is a fleet of one: every command, the rollout included, runs the same code on
one replica or on all the replicas of --fleet.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from client.fleet import replicas_from_args
from client.rollout import rollout
from client.versions import Member, locate_mar, register, snapshots, unregister, version_skew
from core.errors import Refused, ServerUnavailable, UserError, command
from core.keys import REPO_ROOT
from core.torchserve import TorchServe, add_server_flags, format_version

DEFAULT_STORE = Path(os.environ.get("MODEL_STORE") or REPO_ROOT / "model_store")  # as serve.sh
DEFAULT_LOG_DIR = Path(os.environ.get("TS_LOG_DIR") or REPO_ROOT / "logs")  # as serve.sh


def run_command(members: list[Member], args: argparse.Namespace) -> str:
    """Do the subcommand on every replica (one server: a fleet of one); return its summary. list and
    describe read every replica at once and flag version skew; the writes go replica by replica."""
    if args.command in ("list", "describe"):
        return read_replicas(members, args)
    readers = [m.name for m in members if m.server.keys.token_file and not m.server.keys.management_token_file]
    if readers:  # the front proxy lets the inference token read, never write: say so before any change
        raise UserError(f"{args.command} changes the server, and behind the front proxy that needs the "
                        f"management token: give {', '.join(readers)} a management_token_file "
                        f"(--management-token-file for one server)")
    if args.command == "rollout":
        return rollout(members, args)
    if len(members) == 1:
        return change(members[0], args)
    done: list[str] = []
    for index, m in enumerate(members):  # one replica after the other, each line as it is done
        try:
            print(f"{m.name}: {change(m, args)}", flush=True)
        except (Refused, ServerUnavailable, UserError) as e:
            untried = [other.name for other in members[index + 1:]]
            raise type(e)(f"{m.name}: {e}; {args.command} was done on: {', '.join(done) or 'none'}; not "
                          f"tried on: {', '.join(untried) or 'none'} (manage.py list --fleet shows each)") from None
        done.append(m.name)
    return f"{args.command}: done on every replica ({', '.join(done)})"


def change(m: Member, args: argparse.Namespace) -> str:
    """register, set-default, scale or unregister on one replica; its one-line summary."""
    client = m.server
    if args.command == "register":
        name, version = register(client, locate_mar(args.mar, args.model_store), args.workers,
                                 args.batch_size, args.max_batch_delay, m.log_dir)
        entry = client.describe(name, version)[0]
        return "register: " + format_version(entry, client.default_version(name))
    if args.command == "set-default":
        client.call("PUT", f"/models/{args.name}/{args.version}/set-default",
                    f"set-default {args.name} {args.version}")
        return f"set-default: /predictions/{args.name} now answers with version {args.version}"
    if args.command == "scale":
        path = f"/models/{args.name}" + (f"/{args.version}" if args.version else "")
        client.call("PUT", path, f"scale {args.name} {args.version or '(default)'}", min_worker=args.min,
                    max_worker=args.max, synchronous="true")
        entry = client.describe(args.name, args.version)[0]
        return "scale: " + format_version(entry, client.default_version(args.name))
    unregister(client, args.name, args.version, args.drain_seconds, args.drain_timeout, m.log_dir)
    left = [v["modelVersion"] for v in client.versions(args.name)]
    return f"unregister: {args.name} {args.version} removed; versions left: {', '.join(left) or 'none'}"


def precision_line(server: TorchServe, name: str, version: str) -> str | None:
    """What precision a version serves and why, with its agreement report (the handler's describe)."""
    try:
        entry = next(iter(server.describe(name, version, customized="true")), {})
        metadata = entry.get("customizedMetadata")
        metadata = json.loads(metadata) if isinstance(metadata, str) else metadata
        info = metadata["precision"]
    except (ServerUnavailable, Refused, ValueError, TypeError, KeyError, AttributeError):
        return None  # another handler, no worker to answer, or an older archive: nothing to say
    line = f"precision {info.get('served')} on {info.get('device')} ({info.get('why')})"
    report = (info.get("agreement_reports") or {}).get(info.get("served"))
    if isinstance(report, dict):
        line += (f"; agreement with fp32 {report.get('agreement')} % on {report.get('images')} images, "
                 f"report {'passed' if report.get('passed') else 'FAILED'}")
    return line


def describe_lines(entries: list[dict], default: str | None, prefix: str = "",
                   server: TorchServe | None = None) -> list[str]:
    """Each version's line, its precision (asked of the handler when `server` is given), then one line
    per worker."""
    lines = []
    for entry in entries:
        lines.append(prefix + format_version(entry, default))
        precision = server and precision_line(server, entry["modelName"], entry["modelVersion"])
        if precision:
            lines.append(f"{prefix}  {precision}")
        for w in entry.get("workers", []):
            memory = int(w.get("memoryUsage") or 0)  # 0 until TorchServe first measures it
            lines.append(f"{prefix}  worker {w.get('id')}: {w.get('status')}, pid {w.get('pid')}, "
                         + (f"{memory / 2**20:.0f} MiB, " if memory else "")
                         + f"started {w.get('startTime')}")
    return lines


def read_replicas(members: list[Member], args: argparse.Namespace) -> str:
    """list or describe: every replica read at once; with several, each line names its replica and
    version skew is flagged. A replica that cannot be read is named, the others still printed."""
    snaps = snapshots(members, [args.name] if args.command == "describe" else None)
    several = len(members) > 1
    if not several and snaps[0].failure is not None:
        raise snaps[0].failure
    if args.command == "describe" and args.json:
        answers = {s.replica: {"error": s.error} if s.error else s.models.get(args.name, (None, []))[1]
                   for s in snaps}
        print(json.dumps(answers if several else next(iter(answers.values())), indent=2))
    else:
        lines = []
        for s in snaps:
            prefix = f"{s.replica}: " if several else ""
            if s.error:
                lines.append(f"{prefix}error: {s.error}")
            elif not s.models:
                lines.append(prefix + (f"{args.name} is not registered" if args.command == "describe"
                                       else "no models registered"))
            for name, (default, entries) in s.models.items():
                entries = [e for e in entries if getattr(args, "version", None) in (None, e["modelVersion"])]
                if args.command == "describe":
                    server = next(m.server for m in members if m.name == s.replica)
                    lines += describe_lines(entries, default, prefix, server)
                else:
                    lines += [prefix + format_version(entry, default) for entry in entries]
        readable = [s for s in snaps if not s.error]
        if several:
            lines += version_skew(snaps) or [f"fleet: {len(readable)} of {len(snaps)} replicas read, "
                                             f"no version skew"]
        print("\n".join(lines))
    unreadable = [s for s in snaps if s.error]
    if unreadable:  # several replicas (one server raised its own error above)
        raise ServerUnavailable(f"{len(unreadable)} of {len(snaps)} replicas could not be read "
                                f"({', '.join(s.replica for s in unreadable)}); the lines above show the rest")
    if args.command == "describe" and not any(s.models for s in snaps):
        raise Refused(f"describe {args.name}: not registered" + (" on any replica" if several else ""))
    return ""


def check_args(args: argparse.Namespace) -> None:
    """Usage errors found before any request is sent."""
    for flag, least in (("workers", 1), ("batch_size", 1), ("max_batch_delay", 0)):
        value = getattr(args, flag, None)  # None: the archive's model-config.yaml decides
        if value is not None and value < least:
            raise UserError(f"--{flag.replace('_', '-')} must be >= {least}, not {value}")
    if args.command == "scale" and (args.min < 0 or (args.max is not None and args.max < args.min)):
        raise UserError("scale needs 0 <= --min <= --max")
    if args.command == "rollout" and args.min_accuracy is not None:
        if not 0 <= args.min_accuracy <= 1:
            raise UserError("--min-accuracy must be between 0 and 1")
        if not args.smoke_dir:
            raise UserError("--min-accuracy needs --smoke-dir")
    if args.command == "rollout" and not 0 <= args.max_accuracy_drop <= 1:
        raise UserError("--max-accuracy-drop must be between 0 and 1")
    if args.timeout <= 0:
        raise UserError("--timeout must be > 0")
    if args.command == "rollout" and args.rollback_deadline <= 0:
        raise UserError("--rollback-deadline must be > 0")
    if args.fleet and getattr(args, "log_dir", None) is not None:
        raise UserError("--log-dir names one server's log folder; with --fleet pass "
                        "--replica-log-dir NAME=DIR for each replica whose logs this machine can read")


def get_args_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per operation, the server flags on each."""
    server = argparse.ArgumentParser(add_help=False)
    add_server_flags(server)
    server.add_argument("--fleet", type=Path, default=None,
                        help="a fleet file (docs/fleet.md): act on every replica it names instead of one "
                             "server (--url)")
    server.add_argument("--replica-log-dir", action="append", default=[], metavar="NAME=DIR",
                        help="with --fleet: replica NAME's log folder, when this machine can read it (a "
                             "worker's reason, the drain's batches); without it that replica's drain waits "
                             "the old version's responseTimeout; repeat for each replica")
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
    logs = argparse.ArgumentParser(add_help=False)
    logs.add_argument("--log-dir", type=Path, default=None,
                      help="the local server's log folder: a failed worker's reason, and the batches "
                           "workers hold while draining (default: $TS_LOG_DIR, else logs/, as serve.sh)")
    drain_ = argparse.ArgumentParser(add_help=False)
    drain_.add_argument("--drain-seconds", type=float, default=2.0,
                        help="seconds a version must stay idle (empty queue, no batch in a worker) "
                             "before it is removed (default: %(default)s)")
    drain_.add_argument("--drain-timeout", type=float, default=60.0,
                        help="seconds, beyond the quiet period, after which a busy version is kept, "
                             "not removed (default: %(default)s)")

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", parents=[server], help="models, versions, the default, workers")
    p = sub.add_parser("describe", parents=[server], help="one model's versions and their workers")
    p.add_argument("name", metavar="NAME", help="model name")
    p.add_argument("version", metavar="VERSION", nargs="?", default=None, help="one version (default: all)")
    p.add_argument("--json", action="store_true", help="print TorchServe's describe answer as JSON")
    p = sub.add_parser("register", parents=[server, store, workers, logs],
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
    p = sub.add_parser("unregister", parents=[server, drain_, logs],
                       help="remove a version once its queue has drained and its workers are idle")
    p.add_argument("name", metavar="NAME", help="model name")
    p.add_argument("version", metavar="VERSION", help="the version to remove")
    p = sub.add_parser("rollout", parents=[server, store, workers, drain_, logs],
                       help="register, smoke-test, set default, retire the old default; roll back on failure")
    p.add_argument("mar", metavar="MAR", help="the new version's archive (path or file name in the store)")
    p.add_argument("--smoke-dir", default=None,
                   help="images that must all succeed on the new version (class folders: accuracy too)")
    p.add_argument("--min-accuracy", type=float, default=None,
                   help="with class folders in --smoke-dir: the least accuracy (0-1) the new version needs")
    p.add_argument("--max-accuracy-drop", type=float, default=0.01,
                   help="with class folders in --smoke-dir: the old default is measured on the same "
                        "images and the new version may be at most this much (0-1) less accurate; "
                        "1 allows any drop (default: %(default)s)")
    p.add_argument("--new-model", action="store_true",
                   help="allow a MAR whose model name the server does not serve yet, beside other models")
    p.add_argument("--keep-old", action="store_true", help="keep the old default version registered")
    p.add_argument("--rollback-deadline", type=float, default=60.0, metavar="SECONDS",
                   help="after a failure, how long switching a replica back is retried (each switch is "
                        "read back) before the rollback is reported incomplete (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> int:
    """Run one subcommand: 0 done; a refusal or a rollback raises (exit 1), a usage error too (2)."""
    check_args(args)
    if getattr(args, "log_dir", "") is None and not args.fleet:
        args.log_dir = DEFAULT_LOG_DIR  # one server: the local one's logs, as serve.sh writes them
    replicas, _ = replicas_from_args(args)
    members = [Member.of(r, args.timeout) for r in replicas]
    try:
        summary = run_command(members, args)
    finally:
        for m in members:
            m.server.close()
    if summary:
        print(summary)
    return 0


cli = command(main, get_args_parser)
