"""Serving equals training's validation path: same model.pt, same preprocessing, real digit images."""
from __future__ import annotations

import json
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from ts.context import Context, RequestProcessor
from ts.metrics.metrics_store import MetricsStore

from handler.classifier_handler import ClassifierHandler
from handler.preprocessing import PreprocessConfig, load_tensor
from training.dataset import ImageListDataset

ROOT = Path(__file__).resolve().parents[1]
DIGITS = [str(d) for d in range(10)]


def build_position_sensitive_net() -> nn.Module:
    """A small conv net of seeded weights whose output depends on where pixels are, not only their mean."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 7 * 7, 10)]  # 16x16 input
    return nn.Sequential(*layers).eval()


@pytest.fixture(scope="module")
def digit_run(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A run folder around the conv net, and 16 real handwritten digits as upscaled PNG/JPEG files."""
    from sklearn.datasets import load_digits

    base = tmp_path_factory.mktemp("parity")
    run = base / "run"
    run.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(build_position_sensitive_net()).save(str(run / "model.pt"))
    (run / "index_to_name.json").write_text(json.dumps(dict(enumerate(DIGITS))))
    PreprocessConfig(image_size=(16, 16), interpolation="bilinear").save(run / "preprocess.json")
    digits = load_digits()
    paths = []
    for i in range(16):
        pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)
        img = Image.fromarray(pixels, "L").resize((40, 40), Image.Resampling.BICUBIC)
        path = base / f"digit_{i:02d}.{'jpg' if i % 4 == 3 else 'png'}"  # JPEGs take the draft path
        img.save(path, quality=90) if path.suffix == ".jpg" else img.save(path)
        paths.append(path)
    return run, paths


def serve_probabilities(run: Path, paths: list[Path]) -> torch.Tensor:
    """The handler's answers for the files as one batch, as a probability matrix N x 10."""
    model_yaml = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())
    model_yaml["handler"]["topk"] = 10
    context = Context("digits", str(run), {"model": {"serializedFile": "model.pt"}}, len(paths), None,
                      "0.12.0", True, MetricsStore(uuid.uuid4(), "digits"), model_yaml)
    handler = ClassifierHandler()
    handler.initialize(context)
    context.request_processor = [RequestProcessor({}) for _ in paths]
    bodies = handler.handle([{"body": p.read_bytes()} for p in paths], context)
    assert [context.get_response_status(i)[0] for i in range(len(paths))] == [200] * len(paths)
    probabilities = torch.zeros(len(paths), 10)
    for row, body in enumerate(bodies):
        for answer in body:
            probabilities[row, answer["index"]] = answer["probability"]
            assert answer["label"] == DIGITS[answer["index"]]
    return probabilities


def validation_probabilities(run: Path, paths: list[Path]) -> torch.Tensor:
    """Training's validation path: load_tensor from the file path, then model.pt one image at a time."""
    cfg = PreprocessConfig.load(run / "preprocess.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(str(run / "model.pt")).eval()
    with torch.no_grad():
        return torch.cat([torch.softmax(model(load_tensor(p, cfg).unsqueeze(0)), dim=1) for p in paths])


def test_handler_probabilities_equal_the_validation_path(digit_run):
    threads = torch.get_num_threads()
    run, paths = digit_run
    served = serve_probabilities(run, paths)
    torch.set_num_threads(threads)
    expected = validation_probabilities(run, paths)
    # The handler runs model.pt frozen on one batch of 16, the validation path unfrozen one image at a
    # time: other kernels, so float32 rounding differs (5e-8 measured); 1e-5 still catches preprocessing
    # drift (bilinear read as bicubic moves these probabilities by 1e-2).
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-5)
    assert served.argmax(1).unique().numel() > 1  # the images really differ for this model


def test_training_dataset_gives_the_same_tensors(digit_run, tmp_path):
    """training.dataset (the validation loader) decodes exactly as load_tensor does."""
    run, paths = digit_run
    (tmp_path / "labels.json").write_text(json.dumps(dict(enumerate(DIGITS))))
    (tmp_path / "val.list").write_text("".join(f"{p}\t{DIGITS[i % 10]}\n" for i, p in enumerate(paths)))
    cfg = PreprocessConfig.load(run / "preprocess.json")
    dataset = ImageListDataset(tmp_path / "val.list", tmp_path / "labels.json", cfg)
    for i, path in enumerate(paths):
        tensor, _ = dataset[i]
        assert torch.equal(tensor, load_tensor(path, cfg))
