"""The worker's device, precision, fp32 settings and CPU threads; CUDA is mocked where named, no server."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from handler import device
from handler.device import (
    DeviceError,
    available_cores,
    cgroup_cpu_quota,
    count_cpu_threads,
    count_running_workers,
    resolve_precision,
    select_device,
)
from tests.conftest import wait_for

CPU = torch.device("cpu")
PASSED = {"passed": True, "agreement": 1.0, "accuracy_fp32": 0.98, "accuracy": 0.98}


@pytest.fixture
def bf16_cpu(monkeypatch):
    """Pretend the CPU has native bf16 (or not): the capability comes from one function."""
    def pretend(present: bool) -> None:
        monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: present)
    return pretend


def test_cpu_bf16_is_read_from_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_vnni\n")
    assert not device.cpu_has_native_bf16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n")
    assert device.cpu_has_native_bf16(info)
    info.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert device.cpu_has_native_bf16(info)
    assert not device.cpu_has_native_bf16(tmp_path / "absent")


def test_named_precision_the_cpu_lacks_is_an_error_naming_device_and_lack(bf16_cpu):
    bf16_cpu(False)
    with pytest.raises(DeviceError, match="precision bf16: the CPU cannot run it: no native bf16 "
                                          r"\(none of the flags avx512_bf16, amx_bf16"):
        resolve_precision("bf16", CPU, {"bf16": PASSED})
    with pytest.raises(DeviceError, match="precision fp16: the CPU cannot run it: fp16 is served on CUDA only"):
        resolve_precision("fp16", CPU, {})
    assert resolve_precision("fp32", CPU, {})[0] == "fp32"


def test_named_bf16_runs_with_or_without_a_report_and_says_which(bf16_cpu):
    bf16_cpu(True)
    assert resolve_precision("bf16", CPU, {"bf16": PASSED}) == ("bf16", "set in model-config.yaml")
    precision, why = resolve_precision("bf16", CPU, {})
    assert precision == "bf16" and "WITHOUT a passing agreement report" in why


def test_auto_needs_both_the_capability_and_a_passing_report(bf16_cpu):
    bf16_cpu(True)
    precision, why = resolve_precision("auto", CPU, {"bf16": PASSED})
    assert precision == "bf16" and "agreement 1.0" in why
    precision, why = resolve_precision("auto", CPU, {"bf16": {**PASSED, "passed": False}})
    assert precision == "fp32" and "bf16: no passing agreement report" in why
    bf16_cpu(False)  # a CPU without bf16: auto falls back to fp32 and says why
    precision, why = resolve_precision("auto", CPU, {"bf16": PASSED})
    assert precision == "fp32" and "bf16: the CPU has no native bf16" in why


def test_auto_on_cuda_prefers_bf16_then_fp16(monkeypatch):
    # CUDA mocked: a compute capability 7.5 device has fp16 but no native bf16.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    gpu = torch.device("cuda:1")
    reports = {"bf16": PASSED, "fp16": PASSED}
    precision, why = resolve_precision("auto", gpu, reports)
    assert precision == "fp16" and "auto" in why
    with pytest.raises(DeviceError, match=r"cuda:1 \(Tesla T4, compute capability 7.5\) cannot run it: "
                                          "no native bf16"):
        resolve_precision("bf16", gpu, reports)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert resolve_precision("auto", gpu, reports)[0] == "bf16"
    assert resolve_precision("auto", gpu, {"fp16": PASSED})[0] == "fp16"


def test_reports_are_read_from_the_model_folder(tmp_path):
    (tmp_path / "precision-bf16.json").write_text('{"passed": true}')
    (tmp_path / "precision-fp16.json").write_text("{not json")
    assert device.read_reports(tmp_path) == {"bf16": {"passed": True}}


def test_gpu_id_without_usable_cuda_fails_naming_the_cause(monkeypatch):
    assert select_device({"gpu_id": None}) == CPU and select_device({}) == CPU
    # CUDA mocked: a driver too old for the build makes is_available() false and init() raise.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.2")

    def too_old():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 12040).")
    monkeypatch.setattr(torch.cuda, "init", too_old)
    with pytest.raises(DeviceError, match="assigned GPU 1 but CUDA is unusable here: RuntimeError: "
                                          "The NVIDIA driver on your system is too old"):
        select_device({"gpu_id": 1})
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceError, match="is a build without CUDA"):
        select_device({"gpu_id": 0})


def test_gpu_id_is_used_as_given_and_checked_against_the_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # CUDA mocked: two devices
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert select_device({"gpu_id": 1}) == torch.device("cuda:1")
    with pytest.raises(DeviceError, match="assigned GPU 2 but this process sees 2 CUDA device"):
        select_device({"gpu_id": 2})


def test_fp32_means_fp32_even_after_torchserve_asked_for_tf32():
    # In a process of its own: base_handler's import and the settings below are the process's own.
    check = """
import torch
import ts.torch_handler.base_handler  # sets "high" at import on capability 8.0+
from handler import device
torch.set_float32_matmul_precision("high")  # what base_handler does on an A100 or newer
torch.backends.cudnn.conv.fp32_precision = "tf32"  # cuDNN's own default
device.use_full_fp32()
assert torch.get_float32_matmul_precision() == "highest", torch.get_float32_matmul_precision()
for backend in (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn,
                torch.backends.mkldnn.matmul, torch.backends.mkldnn.conv):
    assert backend.fp32_precision == "ieee", backend
# torch.export reads cuDNN's legacy flag (cudnn.set_flags), which raises where it disagrees with the
# per-operator settings: an export after a handler started in this process must still work
torch.export.export(torch.nn.Conv2d(3, 4, 3), (torch.zeros(1, 3, 8, 8),))
"""
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("files, quota", [
    ({"cpu.max": "400000 100000\n"}, 4.0),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
    ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cgroup_cpu_quota_v2_and_v1(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == quota


def test_cores_are_capped_by_the_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert available_cores(tmp_path) == affinity  # no quota file: the affinity
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert available_cores(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU still gets one thread
    assert available_cores(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{400 * 100000} 100000\n")  # a quota above the affinity
    assert available_cores(tmp_path) == affinity


@pytest.mark.parametrize("setting, workers, cores, threads", [
    ("auto", 1, 16, 16), ("auto", 4, 16, 4), ("auto", 3, 16, 5), ("auto", 4, 2, 1), ("auto", 0, 8, 8),
    (2, 4, 16, 2),
])
def test_cpu_threads_keep_workers_times_threads_within_cores(setting, workers, cores, threads):
    assert count_cpu_threads(setting, workers, cores) == threads


def test_running_workers_are_counted_among_real_processes(tmp_path):
    # Real processes: three children of this test whose command line names the TorchServe worker
    # script, one that does not; only the first three are this "frontend's" workers.
    script = tmp_path / "model_service_worker.py"
    script.write_text("import time\ntime.sleep(60)\n")
    other = tmp_path / "other.py"
    other.write_text("import time\ntime.sleep(60)\n")
    children = [subprocess.Popen([sys.executable, str(script), "--sock-name", f"/tmp/x.{i}"]) for i in range(3)]
    children.append(subprocess.Popen([sys.executable, str(other)]))
    try:
        for child, name in zip(children, [script.name] * 3 + [other.name]):
            assert exec_finished(child, name)
        assert count_running_workers(parent=os.getpid()) == 3
        assert count_running_workers(parent=children[-1].pid) == 0
    finally:
        for child in children:
            child.kill()
            child.wait()
    assert count_running_workers(parent=os.getpid()) == 0


def exec_finished(child: subprocess.Popen, argument: str) -> bool:
    """Whether `child`'s exec got as far as its new command line. A child just started may still show
    the parent's, or (between exec's new name and its new arguments) an empty one: counting it then
    tests the race, not the count. 600 s bounds a hung exec; no machine has to be faster."""
    return wait_for(lambda: argument in " ".join(psutil.Process(child.pid).cmdline()), 600)


def test_workers_with_odd_process_names_are_counted(tmp_path):
    # A process name (comm) may hold spaces and parentheses, which broke a hand-written /proc/PID/stat
    # parser: a worker started through a link so named is still one of this frontend's workers.
    odd = tmp_path / "a ) b"
    odd.symlink_to(sys.executable)
    script = tmp_path / "model_service_worker.py"
    script.write_text("import time\ntime.sleep(60)\n")
    child = subprocess.Popen([str(odd), str(script)])
    try:
        assert exec_finished(child, script.name)
        assert psutil.Process(child.pid).name() == "a ) b"
        assert count_running_workers(parent=os.getpid()) == 1
    finally:
        child.kill()
        child.wait()


def test_a_vanished_frontend_counts_no_workers():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert count_running_workers(parent=dead.pid) == 0