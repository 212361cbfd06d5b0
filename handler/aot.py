"""Ahead-of-time compiled models: a `.pt2` package (torch.export + AOTInductor) and what it needs.

A package is compiled once (training/aot.py, at export time) and loaded by a worker as a shared
library: no compiler, no Python model code, no compile cache at load. Beside each package,
`<package>.json` records what it was made from and for: the torch version, the device (cpu), the
instruction-set level the C++ was compiled for and the CPU flags that level needs, the precision,
the batch sizes it takes, the sha256 of the package and of the model.pt it came from. A worker
checks all of it before loading, so a CPU without an instruction the code uses gets one line
naming the flag, never a SIGILL or a wrong answer.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

# The x86-64 micro-architecture levels a package is compiled for (gcc's -march=x86-64-vN) and the
# /proc/cpuinfo flags each needs: https://gitlab.com/x86-psABIs/x86-64-ABI, "Micro-architecture levels".
MARCH_FLAGS = {
    "x86-64-v2": ["cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"],
    "x86-64-v3": ["cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3",
                  "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"],
}
MARCH_FLAGS["x86-64-v4"] = MARCH_FLAGS["x86-64-v3"] + ["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"]
PT2_PRECISIONS = ("fp32", "bf16", "int8")


class PackageRefused(RuntimeError):
    """A .pt2 package this worker must not load (tampered, another torch, a CPU lacking a feature)."""


def meta_path(package: str | os.PathLike) -> Path:
    return Path(f"{package}.json")


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> set[str]:
    """The flags of this machine's CPU (the first processor's `flags` line)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def read_meta(package: str | os.PathLike) -> dict:
    path = meta_path(package)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PackageRefused(f"{path}: cannot read the package's record ({e})") from None
    if not isinstance(meta, dict) or meta.get("precision") not in PT2_PRECISIONS:
        raise PackageRefused(f"{path}: not a package record of this project")
    return meta


def check_package(package: str | os.PathLike, device: torch.device, cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> dict:
    """Everything a worker checks before loading `package`; its record, or PackageRefused (one line)."""
    package = Path(package)
    meta = read_meta(package)
    if device.type != meta.get("device", "cpu"):
        raise PackageRefused(f"{package.name} was compiled for {meta.get('device', 'cpu')}, this worker runs on "
                             f"{device}: export a package for {device.type} or serve model.pt")
    if meta.get("torch") != torch.__version__:
        raise PackageRefused(f"{package.name} was compiled with torch {meta.get('torch')}, this worker has "
                             f"{torch.__version__}: compile it again")
    missing = [f for f in meta.get("cpu_flags", []) if f not in cpu_flags(cpuinfo)]
    if missing:
        raise PackageRefused(f"{package.name} was compiled for {meta.get('march')}; this CPU lacks "
                             f"{', '.join(missing)}: serve model.pt, or compile the package on this kind of CPU")
    if file_sha256(package) != meta.get("package_sha256"):
        raise PackageRefused(f"{package.name}: its sha256 is not the one recorded at export; "
                             f"the package was changed after it was made")
    return meta


def load_package(package: str | os.PathLike, device: torch.device, cpuinfo: str | os.PathLike = "/proc/cpuinfo"):
    """Check, then load the compiled model (a callable: float32 N x 3 x H x W -> float32 logits)."""
    meta = check_package(package, device, cpuinfo)
    return CompiledModel(torch._inductor.aoti_load_package(str(package))), meta


class CompiledModel:
    """The loaded package, fed as it was compiled: float32, contiguous (NCHW). The compiled code
    assumes the strides it was exported with and does not check them: a channels_last batch (what
    the handler gives TorchScript) gave wrong answers, silently."""

    def __init__(self, runner):
        self.runner = runner

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.runner(batch.float().contiguous())
