"""scripts/serve.sh's helper: wait for a server to be ready, or print its state.

    python -m core.readiness wait|status --url URL --management-url URL --key-file PATH
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import Counter
from typing import Callable

from core.errors import KeyRefused, Refused, ServerUnavailable, command
from core.keys import DEFAULT_KEY_FILE, Keys, find_key_file
from core.torchserve import DEFAULT_INFERENCE_URL, DEFAULT_MANAGEMENT_URL, TorchServe, unready_models


LOAD_FAILED = re.compile(r"Load model failed: (\S+), error: Worker died")
LOAD_FAILURES_TO_GIVE_UP = 3  # TorchServe retries a dying worker for ever; the third death of a model's
                              # workers at load says each retry fails alike (a missing module, a bad file)


def load_failures(log: str | os.PathLike, offset: int = 0) -> Callable[[], str | None]:
    """A check for wait_ready: why to give up, once TorchServe's log (ts_log.log), from `offset` on,
    shows LOAD_FAILURES_TO_GIVE_UP deaths at load of one model's workers; None before that."""
    def failing() -> str | None:
        try:
            with open(log, "rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return None
        deaths = Counter(LOAD_FAILED.findall(text))
        for model, count in deaths.items():
            if count >= LOAD_FAILURES_TO_GIVE_UP:
                return f"the workers of {model} died {count} times while loading it (TorchServe retries for ever)"
        return None
    return failing


def wait_ready(server: TorchServe, timeout: float, alive=lambda: True,
               failing: Callable[[], str | None] = lambda: None) -> str | None:
    """Poll until /ping is healthy and every model has a READY worker: None, or why not (the server
    exited, `failing` gave a reason, or `timeout` seconds passed)."""
    deadline = time.monotonic() + timeout
    why = "no answer on /ping"
    while time.monotonic() < deadline:
        if not alive():
            return "the server process exited"
        given_up = failing()
        if given_up:
            return given_up
        try:
            why = server.ping()
        except KeyRefused as e:
            return str(e)
        except ServerUnavailable as e:  # the key file unreadable: perhaps half written, so read it again
            why = str(e)
        if why is None:
            try:
                waiting = unready_models(server)
                if not waiting:
                    return None
                why = "waiting for a READY worker: " + "; ".join(waiting)
            except (ServerUnavailable, Refused, ValueError) as e:
                why = f"management API: {e}"
        time.sleep(0.5)
    return why


def format_status(server: TorchServe) -> str:
    """Models, versions, the default version and workers, one line per version."""
    lines = []
    for name in server.model_names():
        default = server.default_version(name)
        for entry in server.versions(name):
            workers = ", ".join(f"{w.get('id')}:{w.get('status')} pid {w.get('pid')}"
                                for w in entry.get("workers", [])) or "none"
            mark = " (default)" if entry["modelVersion"] == default else ""
            lines.append(f"{name} {entry['modelVersion']}{mark}: batch {entry.get('batchSize')}, "
                         f"workers {workers}")
    return "\n".join(lines) or "no models registered"


def get_args_parser() -> argparse.ArgumentParser:
    """The serve.sh helper's command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("wait", "status"), help="wait for readiness, or print status")
    parser.add_argument("--url", default=DEFAULT_INFERENCE_URL, help="inference URL")
    parser.add_argument("--management-url", default=DEFAULT_MANAGEMENT_URL, help="management URL")
    parser.add_argument("--key-file", default=str(DEFAULT_KEY_FILE), help="the server's key_file.json")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds `wait` waits")
    parser.add_argument("--pid", type=int, default=0, help="`wait` gives up when this process exits")
    parser.add_argument("--log", default=None, help="`wait` gives up when this ts_log.log shows a model's "
                                                    "workers dying at load again and again")
    parser.add_argument("--log-offset", type=int, default=0, help="where this start's lines begin in --log")
    return parser


def pid_alive(pid: int) -> bool:
    """Whether a process of that pid exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def main(args: argparse.Namespace) -> int:
    """Run `wait` or `status`; the exit code says whether it worked."""
    if args.command == "status":
        server = TorchServe(args.url, args.management_url, Keys(args.key_file, args.management_url))
        try:
            why = server.ping()
        except KeyRefused as e:
            why = str(e)
        if why:
            print(f"error: {why}", file=sys.stderr)
            return 1
        try:
            print(format_status(server))
        except (ServerUnavailable, Refused) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    key_file = find_key_file(args.key_file)
    deadline = time.monotonic() + args.timeout
    while not key_file.exists() and time.monotonic() < deadline:  # written at startup
        if args.pid and not pid_alive(args.pid):
            break
        time.sleep(0.2)
    server = TorchServe(args.url, args.management_url, Keys(key_file, args.management_url))
    why = wait_ready(server, max(0.0, deadline - time.monotonic()),
                     alive=lambda: not args.pid or pid_alive(args.pid),
                     failing=load_failures(args.log, args.log_offset) if args.log else lambda: None)
    if why:
        print(why, file=sys.stderr)
        return 1
    return 0


cli = command(main, get_args_parser)  # scripts/serve.sh's helper: a known error is one line, never a traceback


if __name__ == "__main__":
    cli()
