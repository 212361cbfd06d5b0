"""AOTInductor packages (.pt2): compiled once, loaded without a compiler, refused when they must be,
and served by a real TorchServe with the answers of model.pt (the tiny model of fixed weights)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import zipfile

import pytest
import torch
from torch import nn

from handler import aot, device
from tests.conftest import ARCHIVE, LABELS, MODEL, REPO, make_server, write_images
from tests.tiny_model import TinyNet, make_tiny_run
from training import aot as export_aot
from training import agreement

IMAGE_SIZE = (8, 8)
BATCH = 8


@pytest.fixture(scope="module")
def pt2_run(tmp_path_factory):
    """A run folder (model.pt of TinyNet) with model-fp32.pt2 compiled beside it, and a val list."""
    run = make_tiny_run(tmp_path_factory.mktemp("pt2-run"), labels=LABELS, image_size=IMAGE_SIZE)
    export_aot.export_pt2(TinyNet(3), export_aot.package_path(run, "fp32"), "fp32", IMAGE_SIZE, BATCH,
                          agreement.file_sha256(run / "model.pt"))
    images = tmp_path_factory.mktemp("pt2-images")
    paths = write_images(images, 24)
    (images / "val.list").write_text("".join(f"{p}\t{p.split('/')[0]}\n" for p in paths))
    return run, images


def test_the_package_records_what_it_needs_and_runs_every_batch_size_as_the_model(pt2_run):
    run, _ = pt2_run
    package = export_aot.package_path(run, "fp32")
    meta = json.loads(aot.meta_path(package).read_text())
    assert meta["precision"] == "fp32" and meta["device"] == "cpu" and meta["torch"] == torch.__version__
    assert meta["march"] in aot.MARCH_FLAGS
    assert meta["cpu_flags"] == aot.MARCH_FLAGS[meta["march"]] + export_aot.isa_extension_flags()
    assert meta["package_sha256"] == aot.file_sha256(package)
    assert meta["model_sha256"] == agreement.file_sha256(run / "model.pt")
    compiled, _ = aot.load_package(package, torch.device("cpu"))
    eager = TinyNet(3).eval()
    x = torch.randn(BATCH, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        singles = torch.cat([compiled(x[i:i + 1]) for i in range(BATCH)])
        for n in (1, 3, 8):  # no padding: the batch dimension is dynamic
            out = compiled(x[:n])
            assert out.shape == (n, 3)
            # tolerance: fp32 sums in another order (batched kernels), far below any top-1 change
            assert torch.allclose(out, singles[:n], atol=1e-5) and torch.allclose(out, eager(x[:n]), atol=1e-5)


def test_a_cpu_lacking_a_recorded_feature_is_refused_naming_it(pt2_run, tmp_path):
    package = export_aot.package_path(pt2_run[0], "fp32")
    needed = json.loads(aot.meta_path(package).read_text())["cpu_flags"]
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: " + " ".join(f for f in needed if f != "avx2") + "\n")
    with pytest.raises(aot.PackageRefused, match="this CPU lacks avx2: serve model.pt"):
        aot.load_package(package, torch.device("cpu"), cpuinfo)


def test_a_changed_package_or_one_for_another_device_or_torch_is_refused(pt2_run, tmp_path):
    package = export_aot.package_path(pt2_run[0], "fp32")
    copy = tmp_path / package.name
    shutil.copy(package, copy)
    shutil.copy(aot.meta_path(package), aot.meta_path(copy))
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(aot.PackageRefused, match="changed after it was made"):
        aot.check_package(copy, torch.device("cpu"))
    with pytest.raises(aot.PackageRefused, match="compiled for cpu, this worker runs on cuda:0"):
        aot.check_package(package, torch.device("cuda:0"))
    meta = json.loads(aot.meta_path(package).read_text())
    shutil.copy(package, copy)
    aot.meta_path(copy).write_text(json.dumps({**meta, "torch": "2.0.0"}))
    with pytest.raises(aot.PackageRefused, match="compiled with torch 2.0.0"):
        aot.check_package(copy, torch.device("cpu"))


def test_the_handler_takes_only_a_passing_report_about_this_very_package():
    package = {"precision": "int8", "package_sha256": "a" * 64}
    good = {"pt2-int8": {"passed": True, "package_sha256": "a" * 64, "agreement": 100.0}}
    assert device.resolve_package_precision("auto", package, good)[0] == "int8"
    with pytest.raises(device.DeviceError, match="about another package"):
        device.resolve_package_precision("auto", package, {"pt2-int8": {**good["pt2-int8"], "package_sha256": "b" * 64}})
    with pytest.raises(device.DeviceError, match="did not pass"):
        device.resolve_package_precision("int8", package, {"pt2-int8": {**good["pt2-int8"], "passed": False}})
    with pytest.raises(device.DeviceError, match="compiled at int8"):
        device.resolve_package_precision("bf16", package, good)


def test_the_gate_archives_and_a_real_torchserve_serves_the_package_as_model_pt(pt2_run, tmp_path, server):
    run, images = pt2_run
    store = tmp_path / "store"
    store.mkdir()
    env = {"MODEL_STORE": str(store), "PATH": f"{REPO / '.venv' / 'bin'}:/usr/bin:/bin"}
    refused = subprocess.run(["bash", str(ARCHIVE), str(run), MODEL, "2.0", "--pt2", "fp32"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "needs a passing agreement report on this package" in refused.stderr
    figures = agreement.measure(run, "fp32", images / "val.list", torch.device("cpu"),
                                export_aot.package_path(run, "fp32"))
    report = agreement.write_report(run, figures, agreement.MIN_AGREEMENT, agreement.MAX_ACCURACY_DROP)
    assert report["passed"] and report["agreement"] == 100.0 and report["precision"] == "pt2-fp32", report
    bigger = tmp_path / "model-config.yaml"  # batches larger than the package takes: refused up front
    bigger.write_text((REPO / "handler" / "model-config.yaml").read_text().replace("batchSize: 8", "batchSize: 16"))
    too_big = subprocess.run(["bash", str(ARCHIVE), str(run), MODEL, "2.0", "--pt2", "fp32"],
                             env={**env, "MODEL_CONFIG": str(bigger)}, capture_output=True, text=True, timeout=300)
    assert too_big.returncode == 2 and "takes batches up to 8, the archive's batchSize is 16" in too_big.stderr
    done = subprocess.run(["bash", str(ARCHIVE), str(run), MODEL, "2.0", "--pt2", "fp32"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    served = make_server(tmp_path, store, run, [f"{MODEL}-2.0.mar"])
    with served.running() as pt2_server:
        api, reference = pt2_server.api(), server.api()
        described = api.describe(MODEL, "2.0", customized="true")[0]["customizedMetadata"]
        described = json.loads(described) if isinstance(described, str) else described
        assert described["format"] == "pt2" and described["package"]["precision"] == "fp32"
        for path in sorted(images.rglob("*.png")):
            ours = api.predict(MODEL, "2.0", path.read_bytes()).json()
            theirs = reference.predict(MODEL, None, path.read_bytes()).json()
            assert ours[0]["label"] == theirs[0]["label"] == path.parent.name
            assert abs(ours[0]["probability"] - theirs[0]["probability"]) <= 1e-5


class ConvNet(nn.Module):
    """A convolution, BatchNorm and a linear head: what freezing packs (TinyNet has no convolution)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def kernels_called(package) -> set[str]:
    """The CPU kernels the package's generated C++ calls (AOTInductor keeps the source in the package)."""
    with zipfile.ZipFile(package) as archive:
        source = "".join(archive.read(n).decode("utf-8", "replace") for n in archive.namelist()
                         if n.endswith("wrapper.cpp"))
    return set(re.findall(r"aoti_torch_cpu_\w+", source))


@pytest.mark.parametrize("precision, packed", [("fp32", "mkldnn__convolution_pointwise"), ("int8", "_qconv")])
def test_packages_are_compiled_frozen_with_packed_convolutions(tmp_path, precision, packed):
    """Inductor freezes (constant weights, packed for oneDNN; int8's quantized convolutions) only
    with grad off, and says nothing otherwise: compiled with grad on, int8 ran dequantize + an fp32
    convolution at fp32's speed. The generated C++ names the kernels: this test reads no clock."""
    generator = torch.Generator().manual_seed(0)
    calibration = list(torch.randn(16, 3, *IMAGE_SIZE, generator=generator)) if precision == "int8" else None
    package = tmp_path / f"model-{precision}.pt2"
    meta = export_aot.export_pt2(ConvNet().eval(), package, precision, IMAGE_SIZE, 4, "0" * 64, calibration)
    calls = kernels_called(package)
    assert any(packed in call for call in calls), sorted(calls)
    assert "aoti_torch_cpu_convolution" not in calls, sorted(calls)
    assert meta["recipe"] == export_aot.RECIPE


@pytest.mark.parametrize("calibration, passes", [("images", True), ("noise", False)])
def test_int8_calibrated_on_images_passes_the_gate_and_on_noise_is_refused(pt2_run, tmp_path, calibration, passes):
    """Static int8 (PT2E, x86): calibrated on the run's images it agrees with fp32; calibrated on
    noise its activation ranges are wrong and the gate says so."""
    from handler.preprocessing import PreprocessConfig, load_tensor
    source, images = pt2_run
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.pt", "index_to_name.json", "preprocess.json"):
        shutil.copy(source / name, run / name)
    cfg = PreprocessConfig.load(run / "preprocess.json")
    if calibration == "images":
        samples = [load_tensor(p, cfg) for p in sorted(images.rglob("*.png"))]
    else:  # seeded noise, a tenth of the images' spread
        samples = list(0.1 * torch.randn(24, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(0)))
    package = export_aot.package_path(run, "int8")
    meta = export_aot.export_pt2(TinyNet(3), package, "int8", IMAGE_SIZE, BATCH,
                                 agreement.file_sha256(run / "model.pt"), samples)
    assert meta["precision"] == "int8" and meta["calibration_images"] == 24
    figures = agreement.measure(run, "int8", images / "val.list", torch.device("cpu"), package)
    report = agreement.write_report(run, figures, agreement.MIN_AGREEMENT, agreement.MAX_ACCURACY_DROP)
    assert report["precision"] == "pt2-int8" and report["package_sha256"] == meta["package_sha256"]
    assert report["passed"] is passes, report
