"""The images' lock files and .venv's constraints, written from the tested environment (.venv).

Each image installs exactly what the tests ran: its packages and every package they pull in, at
the versions .venv holds, each with the sha256 of the wheel pip would fetch for this platform
(so `pip install --require-hashes` refuses anything else). constraints.txt pins every package of
.venv, so `make install` on a fresh clone installs exactly these versions (without it, a package
released upstream since would make a new .venv differ from the images). tests/test_lock.py fails
when a lock, constraints.txt and .venv differ. After changing a pin in requirements.txt, change
(or delete) its line in constraints.txt too, `make install`, then rerun this:

    .venv/bin/python deploy/lock.py            # rewrite both locks
    .venv/bin/python deploy/lock.py --check    # exit 1 naming what differs
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# What each image's commands import (the Dockerfile installs the lock, nothing else).
IMAGES = {
    # TorchServe, the workers' packages (handler/ imports torch, torchvision, PIL, numpy, yaml,
    # psutil, jsonschema) and the probe's requests.
    "server": ["torch", "torchvision", "torchserve", "PyYAML", "pillow", "numpy", "psutil", "jsonschema",
               "requests"],
    # core/, client/ and handler/preprocessing.py: no torch; matplotlib draws the confusion matrix,
    # jinja2 and scikit-learn's metrics make the batch report, jsonschema checks the fleet file.
    "client": ["requests", "PyYAML", "numpy", "pillow", "tqdm", "matplotlib", "jinja2", "scikit-learn",
               "jsonschema"],
}


NOT_PINNED = {"pip", "setuptools", "wheel", "ts-batch-classify"}  # the installer's own tools; this project


def lock_path(image: str) -> Path:
    return ROOT / f"requirements-{image}.lock"


def constraints_path() -> Path:
    return ROOT / "constraints.txt"


def venv_pins() -> dict[str, str]:
    """Every distribution installed in this environment but the installer's own and this project."""
    # the venv's own folders only: setuptools puts its vendored packages on sys.path when imported
    folders = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    found = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions(path=folders)}
    return dict(sorted((n, v) for n, v in found.items() if n not in NOT_PINNED))


def closure(roots: list[str]) -> dict[str, str]:
    """Every distribution the roots need in this environment, name -> installed version."""
    env = default_environment()
    found: dict[str, str] = {}
    todo = [(Requirement(r), "") for r in roots]
    while todo:
        req, extra = todo.pop()
        name = canonicalize_name(req.name)
        if req.marker and not req.marker.evaluate({**env, "extra": extra}):
            continue
        dist = metadata.distribution(req.name)
        new = name not in found
        found[name] = dist.version
        for sub in (dist.requires or []) if new else []:
            todo.append((Requirement(sub), ""))
        for ext in req.extras:  # an extra's requirements, marked `extra == "..."`
            todo.extend((Requirement(sub), ext) for sub in dist.requires or [] if "extra ==" in sub)
    return dict(sorted(found.items()))


def wheel_hashes(pins: dict[str, str]) -> dict[str, str]:
    """sha256 of the file pip picks for each pin on this platform, from pip's resolver report."""
    with tempfile.TemporaryDirectory() as tmp:
        reqs, report = Path(tmp, "pins.txt"), Path(tmp, "report.json")
        reqs.write_text("".join(f"{n}=={v}\n" for n, v in pins.items()))
        env = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"}
        env["PIP_CONFIG_FILE"] = os.devnull  # a machine-wide pip config may cap versions
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                        "--no-deps", "--only-binary", ":all:", "--report", str(report), "-r", str(reqs)],
                       check=True, env=env)
        out = {}
        for item in json.loads(report.read_text())["install"]:
            name = canonicalize_name(item["metadata"]["name"])
            out[name] = item["download_info"]["archive_info"]["hashes"]["sha256"]
    return out


def render(image: str, pins: dict[str, str], hashes: dict[str, str]) -> str:
    head = (f"# The {image} image's packages, written by deploy/lock.py from the tested .venv: every\n"
            f"# package pinned, transitive ones included, with the sha256 of this platform's wheel.\n"
            f"# Roots: {', '.join(IMAGES[image])}. Do not edit by hand.\n")
    return head + "".join(f"{n}=={v} --hash=sha256:{hashes[n]}\n" for n, v in pins.items())


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            spec = line.split()[0]
            name, version = spec.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def differences(image: str | None) -> list[str]:
    """What differs between an image's lock (None: constraints.txt) and this environment."""
    path = lock_path(image) if image else constraints_path()
    if not path.exists():
        return [f"{path.name}: missing"]
    locked, venv = read_lock(path), closure(IMAGES[image]) if image else venv_pins()
    return [f"{path.name}: {n} locked {locked.get(n, 'absent')}, .venv has {venv.get(n, 'absent')}"
            for n in sorted(set(locked) | set(venv)) if locked.get(n) != venv.get(n)]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write (or check) the images' lock files and constraints.txt from .venv.")
    parser.add_argument("--check", action="store_true", help="only compare the locks with .venv; exit 1 on a difference")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.check:
        diffs = [d for image in [*IMAGES, None] for d in differences(image)]
        print("\n".join(diffs) or "lock: both locks and constraints.txt match .venv")
        return 1 if diffs else 0
    for image, roots in IMAGES.items():
        pins = closure(roots)
        lock_path(image).write_text(render(image, pins, wheel_hashes(pins)))
        print(f"lock: {lock_path(image).name}: {len(pins)} packages")
    pins = venv_pins()
    constraints_path().write_text(
        "# Every package of the tested .venv (written by deploy/lock.py): `make install` installs these\n"
        "# versions, so a fresh clone's .venv equals the one the images' locks were written from.\n"
        + "".join(f"{n}=={v}\n" for n, v in pins.items()))
    print(f"lock: {constraints_path().name}: {len(pins)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
