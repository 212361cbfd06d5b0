"""Publish a .mar into the model store atomically: a temporary name, its sha256 checked, then a rename.

Replicas read the store while archives arrive; a half-copied file under its final name would be
registered as a corrupt model. The copy goes to `.NAME.PID.tmp` in the store (the same file
system, so the rename is atomic), is read back and hashed, and replaces NAME only when the hash
is the expected one (--sha256, else the source's). An archive already in the store with that
hash is left alone, so a rerun is a no-op even when the source is gone. One with other bytes is
refused (exit 2): a replica restarting later would load another model under the same name and
version; --replace overrides that, for a store no replica serves from yet. Standard library only.

    python deploy/kubernetes/publish_mar.py /data/incoming/digits-2.0.mar /app/model_store [--sha256 HEX]

Exit codes (as the classifier's): 0 published or already there, 2 bad input (never retry).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def publish(source: Path, store: Path, expected: str | None = None, replace: bool = False) -> str:
    """Put `source` into `store` under its own name; what was done, or ValueError why not."""
    if not source.name.endswith(".mar") or source.name.startswith("."):
        raise ValueError(f"{source}: not a .mar file name")
    if expected is not None and not SHA256.fullmatch(expected):
        raise ValueError(f"--sha256 '{expected}' is not 64 lowercase hex digits")
    if not store.is_dir():
        raise ValueError(f"model store not found: {store}")
    target = store / source.name
    if not source.is_file():
        if target.is_file() and expected is not None and sha256_of(target) == expected:
            return f"{target} already published (sha256 {expected})"
        raise ValueError(f"{source}: no such file")
    want = expected or sha256_of(source)
    if target.is_file():
        have = sha256_of(target)
        if have == want:
            return f"{target} already published (sha256 {want})"
        if not replace:
            raise ValueError(f"{target} is already published with other bytes (sha256 {have}, this one {want}): "
                             f"a new model needs a new version in its name; --replace overwrites it")
    temporary = store / f".{source.name}.{os.getpid()}.tmp"
    try:
        with source.open("rb") as src, temporary.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        got = sha256_of(temporary)
        if got != want:
            raise ValueError(f"{source}: the copy's sha256 is {got}, expected {want}; nothing published")
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return f"published {target} (sha256 {want})"


def get_args_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the archive to publish")
    parser.add_argument("store", type=Path, help="the model store folder")
    parser.add_argument("--sha256", default=None, help="the archive's expected sha256 (default: the source's)")
    parser.add_argument("--replace", action="store_true",
                        help="overwrite an archive of the same name with other bytes (default: refuse, exit 2)")
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        print(publish(args.source, args.store, args.sha256, args.replace))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
