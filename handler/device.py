"""Where a worker runs and how: its device, the precision it serves, fp32 kept fp32, CPU threads.

Every check here runs at worker start, so a worker that cannot serve as asked fails there,
naming its device and what the device lacks, instead of serving something else.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import psutil
import torch

from handler.aot import PT2_PRECISIONS, file_sha256

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What `auto` tries, fastest first; fp32 needs no report and always runs.
AUTO_ORDER = {"cuda": ("bf16", "fp16", "fp32"), "cpu": ("bf16", "fp32")}
# The agreement reports training.export --check-precision writes and scripts/archive.sh packages.
REPORT_PATTERN = "precision-{}.json"
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86; aarch64 lists "bf16" among its Features


class DeviceError(RuntimeError):
    """The worker's device cannot serve as configured: the worker must not start."""


def select_device(system_properties: dict) -> torch.device:
    """cuda:<gpu_id> when TorchServe gave a GPU (which must then be usable), else the CPU."""
    gpu_id = system_properties.get("gpu_id")
    if gpu_id is None:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"TorchServe assigned GPU {gpu_id} but CUDA is unusable here: {cuda_failure()}; "
                          "fix the driver/CUDA build or run TorchServe with number_of_gpu=0")
    count = torch.cuda.device_count()
    if not 0 <= int(gpu_id) < count:
        raise DeviceError(f"TorchServe assigned GPU {gpu_id} but this process sees {count} CUDA device(s)")
    return torch.device(f"cuda:{int(gpu_id)}")


def cuda_failure() -> str:
    """Why torch.cuda.is_available() is false, in words."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a build without CUDA"
    try:
        torch.cuda.init()
    except Exception as e:  # noqa: BLE001 - the message is the cause (driver too old, no device)
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    return f"torch (CUDA {torch.version.cuda}) finds no usable device"


def cpu_has_native_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX on x86, bf16 on Arm).

    Tests pretend the capability is absent or present by replacing this function.
    """
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            return bool(flags & {*CPU_BF16_FLAGS, "bf16"})
    return False


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{device} ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor})"
    return "the CPU"


def missing_capability(device: torch.device, precision: str) -> str | None:
    """What `device` lacks to run `precision` (None: it can)."""
    if precision == "fp32":
        return None
    if device.type == "cpu":
        if precision == "fp16":
            return "fp16 is served on CUDA only (CPU half kernels are slow or missing)"
        if not cpu_has_native_bf16():
            return f"no native bf16 (none of the flags {', '.join(CPU_BF16_FLAGS)} in /proc/cpuinfo)"
        return None
    if precision == "bf16" and torch.cuda.get_device_capability(device) < (8, 0):
        return "no native bf16 (needs compute capability 8.0 or newer)"
    return None


def read_reports(model_dir: str | os.PathLike) -> dict[str, dict]:
    """The agreement reports packaged in the archive, by precision; unreadable ones are left out."""
    reports = {}
    for precision in [*DTYPES, *(f"pt2-{p}" for p in PT2_PRECISIONS)]:
        path = Path(model_dir) / REPORT_PATTERN.format(precision)
        if path.is_file():
            try:
                reports[precision] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                logger.warning("%s: unreadable agreement report (%s)", path, e)
    return reports


def check_report_models(reports: dict[str, dict], model_file: str | os.PathLike) -> None:
    """DeviceError when an agreement report of model.pt's precisions names another model.pt: a report
    is a claim about one file (its sha256), and a swapped model must not inherit it."""
    actual = None
    for precision in DTYPES:
        report = reports.get(precision)
        if report is None:
            continue
        actual = actual or file_sha256(model_file)
        if report.get("model_sha256") != actual:
            raise DeviceError(f"the archive's agreement report for {precision} is about another model.pt "
                              f"(sha256 {str(report.get('model_sha256'))[:12]}..., this one {actual[:12]}...): "
                              "refused; export and check the model again (scripts/export.py --check-precision)")


def passed(report: dict | None) -> bool:
    return isinstance(report, dict) and report.get("passed") is True


def resolve_precision(requested: str, device: torch.device, reports: dict[str, dict]) -> tuple[str, str]:
    """The precision to serve and why; a named precision the device cannot run is a DeviceError."""
    if requested != "auto":
        lack = missing_capability(device, requested)
        if lack:
            raise DeviceError(f"model-config.yaml handler.precision {requested}: {describe_device(device)} "
                              f"cannot run it: {lack}")
        if requested == "fp32" or passed(reports.get(requested)):
            return requested, "set in model-config.yaml"
        return requested, ("set in model-config.yaml, WITHOUT a passing agreement report in the archive "
                           "(packaged with --no-precision-check)")
    skipped = []
    for precision in AUTO_ORDER[device.type]:
        lack = missing_capability(device, precision)
        if precision == "fp32":
            return "fp32", "auto: " + ("; ".join(skipped) if skipped else "fp32 is the only candidate")
        if lack:
            skipped.append(f"{precision}: {describe_device(device)} has {lack}")
        elif not passed(reports.get(precision)):
            skipped.append(f"{precision}: no passing agreement report in the archive")
        else:
            report = reports[precision]
            return precision, (f"auto: the fastest this device runs whose agreement report passed "
                               f"(top-1 agreement {report.get('agreement')} %, "
                               f"accuracy {report.get('accuracy_fp32')} -> {report.get('accuracy')} %)")
    raise AssertionError("AUTO_ORDER ends with fp32")


def resolve_package_precision(requested: str, package: dict, reports: dict[str, dict]) -> tuple[str, str]:
    """A .pt2 archive serves its package's precision; the reason, or DeviceError when the setting
    asks for another or the packaged report is about another package or did not pass."""
    precision = package["precision"]
    if requested not in ("auto", precision):
        raise DeviceError(f"model-config.yaml handler.precision {requested}, but the archive's package was "
                          f"compiled at {precision}: set auto or {precision}")
    report = reports.get(f"pt2-{precision}")
    if report is None:
        return precision, ("the package's precision, WITHOUT an agreement report in the archive "
                           "(packaged with --no-precision-check)")
    if report.get("package_sha256") != package.get("package_sha256"):
        raise DeviceError(f"the archive's agreement report for pt2-{precision} is about another package "
                          f"(sha256 {str(report.get('package_sha256'))[:12]}..., this one "
                          f"{str(package.get('package_sha256'))[:12]}...): refused")
    if not passed(report):
        raise DeviceError(f"the archive's agreement report for pt2-{precision} did not pass: refused")
    return precision, (f"the package's precision; agreement report passed (top-1 agreement "
                       f"{report.get('agreement')} %, accuracy {report.get('accuracy_fp32')} -> "
                       f"{report.get('accuracy')} %)")


def use_full_fp32() -> None:
    """fp32 means fp32: no TF32 (cuDNN convolutions default to it, TorchServe's base_handler turns
    it on for matmuls on compute capability 8.0+) and no reduced-precision oneDNN fp32 math.

    torch's own code still reads cuDNN's legacy allow_tf32 (torch.export through cudnn.flags), which
    raises once it disagrees with the per-operator settings: it is cleared first, so both say "no
    TF32" and an export later in the same process (a test, the agreement gate) still works."""
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    for backend in (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn,
                    torch.backends.mkldnn.matmul, torch.backends.mkldnn.conv, torch.backends.mkldnn.rnn):
        backend.fp32_precision = "ieee"


def available_cores(cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> int:
    """Cores this process may use: its CPU affinity, capped by the container's cgroup CPU quota.

    Read by hand: neither the standard library nor psutil (its cpu_affinity is sched_getaffinity
    again) knows the cgroup quota a container's CPU limit sets."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    return max(1, min(cores, math.floor(quota))) if quota else cores


def cgroup_cpu_quota(root: str | os.PathLike) -> float | None:
    """CPUs the cgroup allows (quota / period), or None without a limit (cgroup v2, then v1)."""
    root = Path(root)
    try:
        fields = (root / "cpu.max").read_text().split()
        if fields and fields[0] != "max":
            return int(fields[0]) / int(fields[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    for folder in ("cpu", "cpu,cpuacct"):
        try:
            quota = int((root / folder / "cpu.cfs_quota_us").read_text())
            period = int((root / folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None


def count_running_workers(parent: int | None = None) -> int:
    """TorchServe Python workers now running under this worker's frontend, this one included.

    Workers of every model on the server share the cores, and `manage.py scale` or a rollout
    changes their number after the archive was built: count them, don't read maxWorkers.
    """
    try:
        children = psutil.Process(os.getppid() if parent is None else parent).children()
    except psutil.Error:  # the frontend is gone (or not ours to read): the caller falls back
        return 0
    count = 0
    for child in children:
        try:
            count += any("model_service_worker" in part for part in child.cmdline())
        except psutil.Error:  # a process that ended while we looked
            continue
    return count


def count_cpu_threads(setting: int | str, workers: int, cores: int | None = None) -> int:
    """Torch threads for one worker: the setting, or cores // workers (at least 1) for 'auto'."""
    if setting != "auto":
        return int(setting)
    if cores is None:
        cores = available_cores()
    return max(1, cores // max(1, int(workers)))
