"""The replica's exec probe: TorchServe on loopback, asked whether it is alive or its models READY.

TorchServe binds 127.0.0.1 in the pod (nginx is what listens on the pod IP), so a kubelet HTTP
probe cannot reach it, and nginx would want a token the probe spec cannot hold. This probe runs
in the TorchServe container, where loopback needs no token (TorchServe's own authorization is
off behind nginx), and reads nothing from shared storage: a stalled volume never fails it.

    live:  the frontend answers /ping, whatever its status (a model still loading or a worker
           restarting is no reason to kill the server)
    ready: /ping answers 200 "Healthy", at least one model is registered, and every model's
           default version has a READY worker (an empty server is "Healthy" too: not ready)

    python deploy/kubernetes/probe.py live|ready [--url URL] [--management-url URL]
"""
from __future__ import annotations

import argparse
import sys

import requests


def get(session: requests.Session, url: str, timeout: float) -> requests.Response:
    return session.get(url, timeout=timeout)


def not_ready_models(session: requests.Session, management_url: str, timeout: float) -> str | None:
    """None when every registered model's default version has a READY worker, else why not."""
    listing = get(session, f"{management_url}/models", timeout)
    if listing.status_code != 200:
        return f"/models answered {listing.status_code}"
    names = [m.get("modelName") for m in listing.json().get("models", [])]
    if not names:
        return "no model registered"
    for name in names:
        answer = get(session, f"{management_url}/models/{name}", timeout)
        if answer.status_code != 200:
            return f"/models/{name} answered {answer.status_code}"
        versions = answer.json()
        default = next((v for v in versions if v.get("isDefault")), versions[0] if versions else {})
        ready = [w for w in default.get("workers", []) if w.get("status") == "READY"]
        if not ready:
            return f"{name} {default.get('modelVersion', '?')}: no READY worker yet"
    return None


def probe(mode: str, inference_url: str, management_url: str, timeout: float) -> str | None:
    """None when the server passes the `mode` check, else why it fails."""
    session = requests.Session()
    session.trust_env = False  # loopback only: never a proxy from the environment
    try:
        ping = get(session, f"{inference_url}/ping", timeout)
        if mode == "live":
            return None
        try:
            healthy = ping.status_code == 200 and ping.json().get("status") == "Healthy"
        except (ValueError, AttributeError):
            healthy = False
        if not healthy:
            return f"/ping answered {ping.status_code}: {ping.text.strip()[:200]}"
        return not_ready_models(session, management_url, timeout)
    except requests.RequestException as e:
        return f"no answer from {inference_url} or {management_url} ({type(e).__name__})"
    except (ValueError, AttributeError, TypeError) as e:
        return f"unexpected answer ({type(e).__name__}: {e})"


def get_args_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("live", "ready"), help="which check")
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="inference URL (default: %(default)s)")
    parser.add_argument("--management-url", default="http://127.0.0.1:8081",
                        help="management URL, for the models' workers (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> int:
    """Exit 0 when the check passes, 1 with the reason on stderr (the pod's events show it)."""
    why = probe(args.mode, args.url.rstrip("/"), args.management_url.rstrip("/"), args.timeout)
    if why:
        print(f"probe {args.mode}: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
