"""Settings, device, labels, the batched forward pass, top-k and batch answers; no server."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from handler import batch_inference
from handler.batch_inference import (
    SETTINGS_SCHEMA,
    AcceleratorFailure,
    HandlerSettings,
    answer_batch,
    forward_batch,
    load_labels,
    parse_settings,
    prepare_model,
    top_k,
)
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
    ({"precision": "tf32"}, "precision must be one of"),
    ({"cpu_threads": 0}, "cpu_threads must be 'auto' or an integer >= 1"),
    ({"cpu_threads": "many"}, "cpu_threads must be 'auto' or an integer >= 1"),
    ({"cpu_threads": 2.0}, "cpu_threads must be 'auto' or an integer >= 1, got 2.0"),
    ({"metrics": "yes"}, "metrics must be true or false, got 'yes'"),
    ({"top_k": 3}, "unknown setting(s) ['top_k']"),
    (["topk"], "handler: expected a mapping of settings, got ['topk']"),
])
def test_bad_settings_are_refused_by_name(section, message):
    with pytest.raises(ValueError) as info:
        parse_settings({"handler": section})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_settings_schema_names_every_setting():
    assert set(SETTINGS_SCHEMA["properties"]) == set(HandlerSettings.__dataclass_fields__)


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
    probabilities = forward_batch(model, tensors, torch.device("cpu"))
    assert model.seen == {"shape": (2, 3, 4, 5), "dtype": torch.float32, "device": torch.device("cpu"),
                          "channels_last": True, "inference_mode": True}
    expected = torch.tensor([[1 / (1 + torch.e), torch.e / (1 + torch.e)], [0.5, 0.5]])
    torch.testing.assert_close(probabilities, expected, rtol=0, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pinned copies, fp16)")
def test_forward_batch_on_cuda_pins_copies_and_runs_half(monkeypatch):
    pinned = []
    real_pin = torch.Tensor.pin_memory
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append(1) or real_pin(self, *a))
    model = Recorder(torch.tensor([[0.0, 1.0]]))
    probabilities = forward_batch(model, [torch.zeros(3, 4, 4)], torch.device("cuda:0"), torch.float16)
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
    batch_inference.check_model_outputs(model, cfg, 3, torch.device("cpu"))
    with pytest.raises(ValueError, match="outputs 3 classes but index_to_name.json names 2"):
        batch_inference.check_model_outputs(model, cfg, 2, torch.device("cpu"))


def test_forward_batch_casts_the_input_to_the_served_dtype():
    model = Recorder(torch.tensor([[0.0, 1.0]]))
    probabilities = forward_batch(model, [torch.zeros(3, 4, 4)], torch.device("cpu"), torch.bfloat16)
    assert model.seen["dtype"] == torch.bfloat16 and model.seen["channels_last"]
    assert probabilities.dtype == torch.float32  # softmax in fp32 whatever the model's dtype


class ConvBN(nn.Module):
    """A convolution followed by BatchNorm: what freezing folds, unlike the tiny test model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).mean(dim=(2, 3))


def frozen_weight_constants(model: torch.jit.ScriptModule) -> list[torch.Tensor]:
    """The 4-D tensors (conv weights) held as constants in a frozen model's graph."""
    values = [node.output().toIValue() for node in model.graph.nodes() if node.kind() == "prim::Constant"
              and node.output().type().kind() == "TensorType"]
    return [v for v in values if isinstance(v, torch.Tensor) and v.dim() == 4]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prepare_model_converts_then_freezes(dtype):
    # The CUDA path (channels_last weights, frozen, no oneDNN pass), checked on the CPU:
    # freezing converts the weights into constants, so they must already be in `dtype`.
    torch.manual_seed(0)
    eager = ConvBN().eval()
    with torch.no_grad():
        eager.bn.running_mean.uniform_(-1, 1)
        eager.bn.running_var.uniform_(0.5, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(copy.deepcopy(eager))  # script shares the weights: keep eager fp32
    frozen = prepare_model(scripted, dtype, channels_last=True, optimize=False)
    weights = frozen_weight_constants(frozen)
    assert weights and all(w.dtype == dtype for w in weights)  # folded conv+BN weight, in dtype
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert not [n for n in frozen.graph.nodes() if "batch_norm" in n.kind()]  # BN folded away
    x = torch.randn(2, 3, 6, 6)
    with torch.inference_mode():
        served = frozen(x.to(dtype).contiguous(memory_format=torch.channels_last)).float()
        # bf16 keeps 8 bits of mantissa (rounding 2^-9 relative), fp16 11: a few roundings of
        # values of order 1 stay within 5e-2 and 5e-3.
        torch.testing.assert_close(served, eager(x), rtol=0, atol=5e-2 if dtype == torch.bfloat16 else 5e-3)


def oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_retries_in_halves_down_to_one_image(monkeypatch):
    # No GPU here: the predict function raises torch.OutOfMemoryError as CUDA would, for
    # batches over 2 images and for the image whose value is 5 even alone.
    calls, released = [], []
    monkeypatch.setattr(batch_inference, "release_accelerator_memory", lambda: released.append(1))

    def predict(tensors):
        calls.append(len(tensors))
        if len(tensors) > 2 or any(int(t.item()) == 5 for t in tensors):
            raise oom()
        return [[{"index": int(t.item())}] for t in tensors]

    items = [torch.tensor(float(i)) for i in range(6)] + [BadImage(400, "bad")]
    answers = answer_batch(items, predict)
    assert [a if isinstance(a, BadImage) else a[0]["index"] for a in answers[:5]] == [0, 1, 2, 3, 4]
    assert isinstance(answers[5], BadImage) and answers[5].code == 500 and "memory" in answers[5].message
    assert answers[6] is items[6]
    assert calls == [6, 3, 1, 2, 3, 1, 2, 1, 1] and len(released) == 5  # once per out-of-memory


@pytest.mark.parametrize("error", [
    torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: device-side assert triggered"),
    RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
])
def test_accelerator_failure_is_raised_not_answered(error):
    # Raised as CUDA raises them (no GPU here): the worker must end, not answer 500s forever.
    def predict(tensors):
        raise error

    with pytest.raises(AcceleratorFailure, match="illegal memory|device-side|EXECUTION_FAILED"):
        answer_batch([torch.ones(1), torch.ones(1)], predict)


def test_other_forward_errors_still_answer_500s():
    def predict(tensors):
        raise ValueError("shape mismatch")

    assert [a.code for a in answer_batch([torch.ones(1), torch.ones(1)], predict)] == [500, 500]
