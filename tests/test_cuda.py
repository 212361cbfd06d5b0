"""The GPU path on a real CUDA device: `make test-gpu` runs these (and every other `cuda` test).

They skip with a reason on machines without CUDA; the CPU-side checks of the same code (mocked
CUDA calls) live in test_device.py, test_batch_inference.py and test_handler.py.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torchvision

from handler import device as devices
from tests.image_zoo import BLUE, GREEN, RED, png_bytes
from tests.test_batch_inference import frozen_weight_constants
from tests.test_handler import MODEL_YAML, call_handle, handler_factory  # noqa: F401 - a fixture
from tests.tiny_model import make_tiny_run

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
COLOURS = [RED, GREEN, BLUE, (128, 64, 200), (10, 200, 30), (250, 250, 250), (0, 0, 0), (90, 90, 160)]
# Max |probability - CPU fp32 reference|. fp32 on cuDNN differs from the CPU only by summation
# order (~1e-6; TF32 would move it by ~3e-4, which the fp32 bound must catch); fp16 keeps 11
# significant bits, bf16 8, over resnet18's ~20 layers.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory) -> Path:
    """resnet18 (convolutions + BatchNorm, with non-trivial running statistics) at 32x32, 3 classes."""
    run = make_tiny_run(tmp_path_factory.mktemp("resnet"), image_size=(32, 32))
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(model).save(str(run / "model.pt"))
    return run


def with_precision(precision: str) -> dict:
    return {**MODEL_YAML, "handler": {**MODEL_YAML["handler"], "precision": precision}}


def served(handler_factory, run: Path, precision: str, gpu_id: int | None) -> list[list[float]]:
    handler, context = handler_factory(run, with_precision(precision), gpu_id)
    bodies, statuses = call_handle(handler, context, [{"body": png_bytes(c)} for c in COLOURS])
    assert statuses == [200] * len(COLOURS)
    return [sorted((a["index"], a["probability"]) for a in body) for body in bodies]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_conv_bn_model_on_cuda_matches_cpu_fp32(handler_factory, resnet_run, precision):
    if precision == "bf16" and devices.missing_capability(torch.device("cuda:0"), "bf16"):
        pytest.skip(f"cuda:0 has {devices.missing_capability(torch.device('cuda:0'), 'bf16')}")
    reference = served(handler_factory, resnet_run, "fp32", None)  # the CPU
    result = served(handler_factory, resnet_run, precision, 0)
    worst = max(abs(p - q) for row, ref in zip(result, reference) for (_, p), (_, q) in zip(row, ref))
    assert worst <= TOLERANCE[precision], f"{precision} on cuda:0 moved a probability by {worst:.2e}"


def test_fp32_on_cuda_is_not_tf32(handler_factory, resnet_run):
    handler, _ = handler_factory(resnet_run, with_precision("fp32"), 0)
    assert handler.precision == "fp32" and torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"


def test_cuda_model_is_frozen_with_channels_last_weights_in_its_dtype(handler_factory, resnet_run):
    handler, _ = handler_factory(resnet_run, with_precision("fp16"), 0)
    weights = frozen_weight_constants(handler.model)
    assert weights and all(w.is_cuda and w.dtype == torch.float16 for w in weights)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)


def test_the_gpu_torchserve_names_is_the_one_used(handler_factory, resnet_run):
    last = torch.cuda.device_count() - 1
    if last == 0:
        pytest.skip("one CUDA device: a gpu_id other than 0 needs two")
    handler, context = handler_factory(resnet_run, with_precision("fp32"), last)
    assert handler.device == torch.device(f"cuda:{last}")
    assert all(w.device == handler.device for w in frozen_weight_constants(handler.model))
    assert call_handle(handler, context, [{"body": png_bytes(RED)}])[1] == [200]


def test_auto_on_cuda_needs_a_report(handler_factory, resnet_run):
    handler, _ = handler_factory(resnet_run, with_precision("auto"), 0)
    assert handler.precision == "fp32" and "no passing agreement report" in handler.precision_reason
