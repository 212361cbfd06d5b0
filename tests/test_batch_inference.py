"""Settings, device, labels, the batched forward pass, top-k and batch answers; no server."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from handler import batch_inference
from handler.batch_inference import (HandlerSettings, answer_batch, count_cpu_threads, forward_batch,
                                     load_labels, parse_settings, select_device, top_k)
from handler.preprocessing import BadImage


def test_settings_defaults_and_values():
    assert parse_settings(None) == HandlerSettings()
    assert parse_settings({"batchSize": 8}) == HandlerSettings(topk=5, precision="fp32", cpu_threads="auto")
    section = {"topk": 2, "max_pixels": 1000, "max_decoded_bytes": 4000, "precision": "fp16",
               "cpu_threads": 3}
    settings = parse_settings({"handler": section})
    assert settings == HandlerSettings(topk=2, max_pixels=1000, max_decoded_bytes=4000, precision="fp16",
                                       cpu_threads=3)
    assert HandlerSettings().max_decoded_bytes == 64 * 2**20


@pytest.mark.parametrize("section, message", [
    ({"topk": 0}, "topk must be an integer >= 1"),
    ({"topk": "5"}, "topk must be an integer >= 1"),
    ({"topk": True}, "topk must be an integer >= 1"),
    ({"max_pixels": -1}, "max_pixels must be an integer >= 1"),
    ({"max_decoded_bytes": 0}, "max_decoded_bytes must be an integer >= 1"),
    ({"max_decoded_bytes": 1.5e9}, "max_decoded_bytes must be an integer >= 1"),
    ({"precision": "int8"}, "precision must be one of"),
    ({"cpu_threads": 0}, "cpu_threads must be 'auto' or an integer >= 1"),
    ({"cpu_threads": "many"}, "cpu_threads must be 'auto' or an integer >= 1"),
    ({"top_k": 3}, "unknown setting(s) ['top_k']"),
])
def test_bad_settings_are_refused_by_name(section, message):
    with pytest.raises(ValueError) as info:
        parse_settings({"handler": section})
    assert message in str(info.value)


@pytest.mark.parametrize("setting, workers, cores, threads", [
    ("auto", 1, 16, 16), ("auto", 4, 16, 4), ("auto", 3, 16, 5), ("auto", 4, 2, 1), ("auto", 0, 8, 8),
    (2, 4, 16, 2),
])
def test_cpu_threads_keep_workers_times_threads_within_cores(setting, workers, cores, threads):
    assert count_cpu_threads(setting, workers, cores) == threads


def test_device_is_cpu_without_cuda_or_gpu_id(monkeypatch):
    assert select_device({"gpu_id": None}) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device({"gpu_id": 1}) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device({"gpu_id": 1}) == torch.device("cuda:1")
    assert select_device({}) == torch.device("cpu")


def test_labels_must_be_contiguous(tmp_path):
    path = tmp_path / "index_to_name.json"
    path.write_text(json.dumps({"1": "b", "0": "a"}))
    assert load_labels(path) == ["a", "b"]
    for bad in ({"0": "a", "2": "c"}, {}, ["a"]):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=str(path)):
            load_labels(path)


class Recorder(nn.Module):
    """Records what the forward pass received; answers fixed logits."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.seen: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = {"shape": tuple(x.shape), "dtype": x.dtype, "device": x.device,
                     "channels_last": x.is_contiguous(memory_format=torch.channels_last),
                     "inference_mode": torch.is_inference_mode_enabled()}
        return self.logits.to(x.device, x.dtype)


def test_forward_batch_is_one_channels_last_pass_in_inference_mode():
    model = Recorder(torch.tensor([[0.0, 1.0], [2.0, 2.0]]))
    tensors = [torch.zeros(3, 4, 5), torch.ones(3, 4, 5)]
    probabilities = forward_batch(model, tensors, torch.device("cpu"), False)
    assert model.seen == {"shape": (2, 3, 4, 5), "dtype": torch.float32, "device": torch.device("cpu"),
                          "channels_last": True, "inference_mode": True}
    expected = torch.tensor([[1 / (1 + torch.e), torch.e / (1 + torch.e)], [0.5, 0.5]])
    torch.testing.assert_close(probabilities, expected, rtol=0, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pinned copies, fp16)")
def test_forward_batch_on_cuda_pins_copies_and_runs_half(monkeypatch):
    pinned = []
    real_pin = torch.Tensor.pin_memory
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append(1) or real_pin(self, *a))
    model = Recorder(torch.tensor([[0.0, 1.0]]))
    probabilities = forward_batch(model, [torch.zeros(3, 4, 4)], torch.device("cuda:0"), True)
    assert pinned and model.seen["device"].type == "cuda" and model.seen["dtype"] == torch.float16
    assert model.seen["channels_last"]
    assert probabilities.dtype == torch.float32 and probabilities.device.type == "cpu"


def test_top_k_orders_and_caps_at_the_class_count():
    probabilities = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    answers = top_k(probabilities, 5, ["a", "b", "c"])
    assert [[(a["label"], a["index"]) for a in row] for row in answers] == [
        [("b", 1), ("c", 2), ("a", 0)], [("a", 0), ("c", 2), ("b", 1)]]
    assert answers[0][0]["probability"] == pytest.approx(0.6) and type(answers[0][0]["probability"]) is float
    assert [len(row) for row in top_k(probabilities, 1, ["a", "b", "c"])] == [1, 1]


def test_answer_batch_predicts_only_decoded_items_in_one_call():
    calls = []

    def predict(tensors):
        calls.append(len(tensors))
        return [[{"index": int(t.sum())}] for t in tensors]

    items = [torch.ones(2), BadImage(400, "bad"), torch.zeros(3) + 2]
    answers = answer_batch(items, predict)
    assert calls == [2]
    assert answers[0] == [{"index": 2}] and answers[1] is items[1] and answers[2] == [{"index": 6}]
    assert answer_batch([BadImage(413, "big")], predict)[0].code == 413 and calls == [2]


def test_answer_batch_turns_a_short_prediction_list_into_500s():
    answers = answer_batch([torch.ones(1), torch.ones(1)], lambda tensors: [[]])
    assert [a.code for a in answers] == [500, 500] and "1 predictions for 2 images" in answers[0].message


def test_check_model_outputs_counts_classes():
    model = Recorder(torch.zeros(1, 3))
    cfg = batch_inference.preprocessing.PreprocessConfig(image_size=(4, 4))
    batch_inference.check_model_outputs(model, cfg, 3, torch.device("cpu"), False)
    with pytest.raises(ValueError, match="outputs 3 classes but index_to_name.json names 2"):
        batch_inference.check_model_outputs(model, cfg, 2, torch.device("cpu"), False)
