"""Wait until a TorchServe is ready, or print its models and workers: the helper serve.sh runs.

scripts/serve.sh runs it as `python scripts/tsclient.py wait|status`; tsclient.py hands over to main here.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import requests

from scripts.tsclient import (
    DEFAULT_INFERENCE_URL,
    DEFAULT_KEY_FILE,
    DEFAULT_MANAGEMENT_URL,
    KeyRejected,
    Keys,
    default_version,
    describe,
    list_models,
    new_session,
    ping,
)


def unready_models(management_url: str, keys: Keys) -> list[str]:
    """Model versions that have no READY worker yet, as "name/version (worker states)"."""
    session = new_session()
    waiting = []
    for name in list_models(management_url, keys, session):
        for entry in describe(management_url, keys, name, session=session):
            states = [w.get("status", "?") for w in entry.get("workers", [])]
            if "READY" not in states:
                waiting.append(f"{name}/{entry['modelVersion']} ({', '.join(states) or 'no workers'})")
    return waiting


def wait_ready(inference_url: str, management_url: str, keys: Keys, timeout: float,
               alive=lambda: True) -> str | None:
    """Poll until /ping is healthy and every model has a READY worker: None, or why not."""
    deadline = time.monotonic() + timeout
    why = "no answer on /ping"
    while time.monotonic() < deadline:
        if not alive():
            return "the server process exited"
        why = ping(inference_url, keys)
        if why is None:
            try:
                waiting = unready_models(management_url, keys)
                if not waiting:
                    return None
                why = "waiting for a READY worker: " + "; ".join(waiting)
            except KeyRejected as e:
                why = str(e)
            except (requests.RequestException, ValueError) as e:
                why = f"management API: {e}"
        time.sleep(0.5)
    return why


def format_status(management_url: str, keys: Keys) -> str:
    """Models, versions, the default version and workers, one line per version."""
    session = new_session()
    lines = []
    for name in list_models(management_url, keys, session):
        default = default_version(management_url, keys, name, session)
        for entry in describe(management_url, keys, name, session=session):
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
    return parser


def _pid_alive(pid: int) -> bool:
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
        keys = Keys(args.key_file, args.management_url)
        why = ping(args.url, keys)
        if why:
            print(f"error: {why}", file=sys.stderr)
            return 1
        try:
            print(format_status(args.management_url, keys))
        except (KeyRejected, requests.RequestException) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    keys = Keys(args.key_file, args.management_url, keys={})
    deadline = time.monotonic() + args.timeout
    while not keys.key_file.exists() and time.monotonic() < deadline:  # written at startup
        if args.pid and not _pid_alive(args.pid):
            break
        time.sleep(0.2)
    keys = Keys(args.key_file, args.management_url)
    why = wait_ready(args.url, args.management_url, keys, max(0.0, deadline - time.monotonic()),
                     alive=lambda: not args.pid or _pid_alive(args.pid))
    if why:
        print(why, file=sys.stderr)
        return 1
    return 0
