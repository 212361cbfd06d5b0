"""The handler's settings, model loading, batched forward pass and top-k answers."""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import jsonschema
import torch

from handler import preprocessing
from handler.device import DTYPES, PRECISIONS
from handler.labels import load_labels  # noqa: F401 - the handler reads index_to_name.json with it

BadImage = preprocessing.BadImage
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HandlerSettings:
    """The `handler:` section of model-config.yaml, with its defaults."""

    topk: int = 5  # capped at the number of classes when answering
    max_pixels: int = preprocessing.DEFAULT_MAX_PIXELS
    max_decoded_bytes: int = preprocessing.DEFAULT_MAX_DECODED_BYTES  # pixels x bytes of the mode
    precision: str = "fp32"  # fp32 | bf16 | fp16 (CUDA only) | auto: see handler/device.py
    cpu_threads: int | str = "auto"  # auto: cores // running workers, so workers x threads <= cores
    metrics: bool = True  # send handler/metrics.py's metrics to TorchServe (false: HandlerTime only)


# The `handler:` section as a JSON Schema (jsonschema checks it); each setting's rule in words, for the
# one-line error. Integers are Python ints: JSON Schema's "integer" takes 1.5e9 and 3.0 too.
SETTINGS_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "topk": {"type": "integer", "minimum": 1, "description": "an integer >= 1"},
        "max_pixels": {"type": "integer", "minimum": 1, "description": "an integer >= 1"},
        "max_decoded_bytes": {"type": "integer", "minimum": 1, "description": "an integer >= 1"},
        "precision": {"enum": list(PRECISIONS), "description": f"one of {PRECISIONS}"},
        "cpu_threads": {"anyOf": [{"const": "auto"}, {"type": "integer", "minimum": 1}],
                        "description": "'auto' or an integer >= 1"},
        "metrics": {"type": "boolean", "description": "true or false"},
    },
}
_DRAFT = jsonschema.Draft202012Validator
_STRICT = jsonschema.validators.extend(
    _DRAFT, type_checker=_DRAFT.TYPE_CHECKER.redefine("integer", lambda _, value: type(value) is int))
SETTINGS_VALIDATOR = _STRICT(SETTINGS_SCHEMA)


def parse_settings(model_yaml: dict | None) -> HandlerSettings:
    """Read and check the `handler:` section of TorchServe's parsed model-config.yaml."""
    section = (model_yaml or {}).get("handler") or {}
    error = jsonschema.exceptions.best_match(SETTINGS_VALIDATOR.iter_errors(section))
    if error is None:
        return HandlerSettings(**section)
    if error.absolute_path:  # absolute: an anyOf's own errors have paths relative to it
        name = error.absolute_path[0]
        rule = SETTINGS_SCHEMA["properties"][name]["description"]
        raise ValueError(f"model-config.yaml handler.{name} must be {rule}, got {section[name]!r}")
    if error.validator == "additionalProperties":
        unknown = sorted(map(str, set(section) - set(SETTINGS_SCHEMA["properties"])))
        raise ValueError(f"model-config.yaml handler: unknown setting(s) {unknown}")
    raise ValueError(f"model-config.yaml handler: expected a mapping of settings, got {section!r}")


def load_model(path: str | os.PathLike, device: torch.device, precision: str = "fp32") -> torch.jit.ScriptModule:
    """Load the TorchScript model onto `device` and prepare it to serve at `precision`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still the format
        model = torch.jit.load(str(path), map_location=device)
    return prepare_model(model, DTYPES[precision], channels_last=device.type == "cuda",
                         optimize=device.type == "cpu", name=str(path))


def prepare_model(model: torch.jit.ScriptModule, dtype: torch.dtype, *, channels_last: bool, optimize: bool,
                  name: str = "model.pt") -> torch.jit.ScriptModule:
    """Eval mode, weights in `dtype` (and channels_last), then frozen; oneDNN-optimised on the CPU.

    The order matters: converting after freezing leaves the folded constants in fp32, and a
    half input against them failed (a segfault, once). channels_last weights match the
    channels_last input, so cuDNN does not convert every weight on every call. On the CPU
    optimize_for_inference moves the convolutions to oneDNN (docs/benchmark.md has the gain).
    """
    model.eval()
    if dtype != torch.float32:
        model = model.to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            frozen = torch.jit.freeze(model)
            return torch.jit.optimize_for_inference(frozen) if optimize else frozen
    except Exception as e:  # noqa: BLE001 - an unusual model still serves, unoptimised
        logger.warning("serving %s unfrozen: freezing it failed (%s: %s)", name, type(e).__name__, e)
    return model


def check_model_outputs(model: torch.nn.Module, cfg: preprocessing.PreprocessConfig, num_labels: int,
                        device: torch.device, dtype: torch.dtype = torch.float32) -> None:
    """Run one blank image through the model; its class count must match the labels."""
    blank = torch.zeros(3, *cfg.image_size)
    classes = forward_batch(model, [blank], device, dtype).shape[1]
    if classes != num_labels:
        raise ValueError(f"model.pt outputs {classes} classes but index_to_name.json names {num_labels}")


def forward_batch(model: torch.nn.Module, tensors: list[torch.Tensor], device: torch.device,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One batched forward pass at `dtype` -> float32 softmax probabilities N x C on the CPU."""
    batch = torch.stack(tensors)
    if device.type == "cuda":
        # Pinned host memory lets the copy run asynchronously with the host's work.
        batch = batch.pin_memory().to(device, non_blocking=True)
    batch = batch.to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        logits = model(batch)
        probabilities = torch.softmax(logits.float(), dim=1)  # fp32 softmax: half sums lose digits
    return probabilities.cpu()


def top_k(probabilities: torch.Tensor, k: int, labels: list[str]) -> list[list[dict]]:
    """N x C probabilities -> per image the k best {"label", "index", "probability"}, highest first."""
    k = min(k, probabilities.shape[1])
    values, indices = torch.topk(probabilities, k, dim=1)
    return [[{"label": labels[i], "index": i, "probability": p}
             for p, i in zip(row_values.tolist(), row_indices.tolist())]
            for row_values, row_indices in zip(values, indices)]


class AcceleratorFailure(RuntimeError):
    """The accelerator failed in a way that leaves its context unusable: the worker must end."""


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError)


def is_fatal_accelerator_error(error: BaseException) -> bool:
    """An accelerator error other than out-of-memory (illegal address, device-side assert, ECC):
    after one, every later CUDA call fails, so answering 500s forever would keep a dead worker READY."""
    if is_out_of_memory(error):
        return False
    if isinstance(error, getattr(torch, "AcceleratorError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        mark in text for mark in ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error"))


def release_accelerator_memory() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def predict_in_pieces(tensors: list[torch.Tensor],
                      predict: Callable[[list[torch.Tensor]], list[list[dict]]]) -> list:
    """predict(tensors); out of memory, the cache is released and each half tried alone, down to
    one image, so every image gets its own answer (a 500 only for one that does not fit alone)."""
    try:
        predictions = predict(tensors)
    except Exception as e:  # noqa: BLE001 - only out-of-memory is handled here
        if not is_out_of_memory(e):
            raise
        release_accelerator_memory()
        if len(tensors) == 1:
            logger.error("out of memory on a single image: %s", e)
            return [BadImage(500, "inference failed: out of accelerator memory for this image alone",
                             "out_of_memory")]
        logger.warning("out of memory on a batch of %d images; retrying it in halves", len(tensors))
        half = len(tensors) // 2
        return predict_in_pieces(tensors[:half], predict) + predict_in_pieces(tensors[half:], predict)
    if len(predictions) != len(tensors):
        raise RuntimeError(f"{len(predictions)} predictions for {len(tensors)} images")
    return predictions


def answer_batch(items: list[torch.Tensor | BadImage],
                 predict: Callable[[list[torch.Tensor]], list[list[dict]]]) -> list[list[dict] | BadImage]:
    """Predict the decoded items in one call; refused items and a failed forward become BadImage.

    An accelerator failure other than out-of-memory is raised as AcceleratorFailure: the caller
    must end the worker rather than answer from a broken CUDA context.
    """
    good = [i for i, item in enumerate(items) if isinstance(item, torch.Tensor)]
    answers: list = list(items)
    if not good:
        return answers
    try:
        predictions = predict_in_pieces([items[i] for i in good], predict)
    except Exception as e:  # noqa: BLE001 - the worker must answer every request, not die
        if is_fatal_accelerator_error(e):
            raise AcceleratorFailure(f"{type(e).__name__}: {e}") from e
        logger.exception("forward pass failed for a batch of %d images", len(good))
        failure = BadImage(500, f"inference failed: {type(e).__name__}: {e}", "inference_failed")
        predictions = [failure] * len(good)
    for i, prediction in zip(good, predictions):
        answers[i] = prediction
    return answers
