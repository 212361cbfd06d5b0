"""The TorchServe pod's exec probe: /ping with the pod's own inference key, renewed when it expires.

TorchServe 0.12 answers /ping only with the inference key, which lives in the key_file.json it
wrote at start and expires after 60 minutes. An HTTP probe cannot send it; this one reads the
file, and on a refused key asks the management API for a fresh one with the API key (as every
client of the project does), so the pod's keys never go stale and authorization stays on.

    live:  the frontend answers /ping and accepts the key (any status: a model still loading
           or a worker restarting is no reason to kill the server)
    ready: /ping answers 200 "Healthy" (every model has its minimum of workers)

    python deploy/kubernetes/probe.py ready|live [--key-file PATH]

The key file defaults to $TS_KEY_ROOT/$POD_NAME/key_file.json, where start-torchserve.sh runs
TorchServe (exec probes get the container's environment but no $(VAR) expansion).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import requests

from core.torchserve import Keys, is_auth_error, new_session, request_with_key


def probe(mode: str, inference_url: str, management_url: str, key_file: str, timeout: float) -> str | None:
    """None when the server passes the `mode` check, else why it fails."""
    if not Path(key_file).is_file():
        return f"no key file {key_file} yet (TorchServe writes it at start)"
    keys = Keys(key_file, management_url)
    try:
        response = request_with_key(new_session(1), "GET", f"{inference_url}/ping", keys, "inference",
                                    timeout=timeout)
    except requests.RequestException as e:
        return f"no answer on {inference_url}/ping ({type(e).__name__})"
    if is_auth_error(response):
        return f"/ping refused the keys of {key_file} and the API key could not renew them"
    if mode == "live":
        return None
    try:
        healthy = response.status_code == 200 and response.json().get("status") == "Healthy"
    except (ValueError, AttributeError):
        healthy = False
    return None if healthy else f"/ping answered {response.status_code}: {response.text.strip()[:200]}"


def default_key_file() -> str:
    """This pod's key file: $TS_KEY_ROOT/$POD_NAME/key_file.json, else key_file.json here."""
    pod = os.environ.get("POD_NAME")
    if not pod:
        return "key_file.json"
    return os.path.join(os.environ.get("TS_KEY_ROOT") or "/keys", pod, "key_file.json")


def get_args_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("live", "ready"), help="which check")
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="inference URL (default: %(default)s)")
    parser.add_argument("--management-url", default="http://127.0.0.1:8081",
                        help="management URL, for renewing keys (default: %(default)s)")
    parser.add_argument("--key-file", default=default_key_file(),
                        help="the server's key file (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="seconds per request (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> int:
    """Exit 0 when the check passes, 1 with the reason on stderr (the pod's events show it)."""
    why = probe(args.mode, args.url.rstrip("/"), args.management_url.rstrip("/"), args.key_file, args.timeout)
    if why:
        print(f"probe {args.mode}: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
