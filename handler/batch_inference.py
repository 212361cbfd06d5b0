"""The handler's settings, model loading, batched forward pass and top-k answers."""
from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from handler import preprocessing
from handler.labels import load_labels  # noqa: F401 - the handler reads index_to_name.json with it

BadImage = preprocessing.BadImage
logger = logging.getLogger(__name__)
PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class HandlerSettings:
    """The `handler:` section of model-config.yaml, with its defaults."""

    topk: int = 5  # capped at the number of classes when answering
    max_pixels: int = preprocessing.DEFAULT_MAX_PIXELS
    max_decoded_bytes: int = preprocessing.DEFAULT_MAX_DECODED_BYTES  # pixels x bytes of the mode
    precision: str = "fp32"  # fp16 applies on CUDA only: CPU half kernels are slow or missing
    cpu_threads: int | str = "auto"  # auto: cores // maxWorkers, so workers x threads <= cores


def parse_settings(model_yaml: dict | None) -> HandlerSettings:
    """Read and check the `handler:` section of TorchServe's parsed model-config.yaml."""
    section = dict((model_yaml or {}).get("handler") or {})
    unknown = sorted(set(section) - set(HandlerSettings.__dataclass_fields__))
    if unknown:
        raise ValueError(f"model-config.yaml handler: unknown setting(s) {unknown}")
    settings = HandlerSettings(**section)
    if type(settings.topk) is not int or settings.topk < 1:
        raise ValueError(f"model-config.yaml handler.topk must be an integer >= 1, got {settings.topk!r}")
    for name in ("max_pixels", "max_decoded_bytes"):
        value = getattr(settings, name)
        if type(value) is not int or value < 1:
            raise ValueError(f"model-config.yaml handler.{name} must be an integer >= 1, got {value!r}")
    if settings.precision not in PRECISIONS:
        raise ValueError(f"model-config.yaml handler.precision must be one of {PRECISIONS}, "
                         f"got {settings.precision!r}")
    threads = settings.cpu_threads
    if threads != "auto" and (type(threads) is not int or threads < 1):
        raise ValueError(f"model-config.yaml handler.cpu_threads must be 'auto' or an integer >= 1, "
                         f"got {threads!r}")
    return settings


def count_cpu_threads(setting: int | str, workers: int, cores: int | None = None) -> int:
    """Torch threads for one worker: the setting, or cores // workers (at least 1) for 'auto'."""
    if setting != "auto":
        return int(setting)
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, int(workers)))


def select_device(system_properties: dict) -> torch.device:
    """cuda:<gpu_id> when CUDA is available and TorchServe gave a GPU, else the CPU."""
    gpu_id = system_properties.get("gpu_id")
    if torch.cuda.is_available() and gpu_id is not None:
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


def load_model(path: str | os.PathLike, device: torch.device, half: bool) -> torch.jit.ScriptModule:
    """Load the TorchScript model onto `device`, in eval mode and optionally in fp16.

    On the CPU it is also frozen and optimised for inference (batch norm folded into the
    convolutions, oneDNN kernels); docs/benchmark.md's tuning log has what that gains.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still the format
        model = torch.jit.load(str(path), map_location=device)
        model.eval()
        if half:
            return model.half()
        if device.type == "cpu":
            try:
                return torch.jit.optimize_for_inference(torch.jit.freeze(model))
            except Exception as e:  # noqa: BLE001 - an unusual model still serves, unoptimised
                logger.warning("serving %s unoptimised: freezing it failed (%s: %s)", path,
                               type(e).__name__, e)
    return model


def check_model_outputs(model: torch.nn.Module, cfg: preprocessing.PreprocessConfig, num_labels: int,
                        device: torch.device, half: bool) -> None:
    """Run one blank image through the model; its class count must match the labels."""
    blank = torch.zeros(3, *cfg.image_size)
    classes = forward_batch(model, [blank], device, half).shape[1]
    if classes != num_labels:
        raise ValueError(f"model.pt outputs {classes} classes but index_to_name.json names {num_labels}")


def forward_batch(model: torch.nn.Module, tensors: list[torch.Tensor], device: torch.device,
                  half: bool) -> torch.Tensor:
    """One batched forward pass -> float32 softmax probabilities N x C on the CPU."""
    batch = torch.stack(tensors)
    if device.type == "cuda":
        # Pinned host memory lets the copy run asynchronously with the host's work.
        batch = batch.pin_memory().to(device, non_blocking=True)
    batch = batch.contiguous(memory_format=torch.channels_last)
    if half:
        batch = batch.half()
    with torch.inference_mode():
        logits = model(batch)
        probabilities = torch.softmax(logits.float(), dim=1)  # fp32 softmax: fp16 sums lose digits
    return probabilities.cpu()


def top_k(probabilities: torch.Tensor, k: int, labels: list[str]) -> list[list[dict]]:
    """N x C probabilities -> per image the k best {"label", "index", "probability"}, highest first."""
    k = min(k, probabilities.shape[1])
    values, indices = torch.topk(probabilities, k, dim=1)
    return [[{"label": labels[i], "index": i, "probability": p}
             for p, i in zip(row_values.tolist(), row_indices.tolist())]
            for row_values, row_indices in zip(values, indices)]


def answer_batch(items: list[torch.Tensor | BadImage],
                 predict: Callable[[list[torch.Tensor]], list[list[dict]]]) -> list[list[dict] | BadImage]:
    """Predict the decoded items in one call; refused items and a failed forward become BadImage."""
    good = [i for i, item in enumerate(items) if isinstance(item, torch.Tensor)]
    answers: list = list(items)
    if not good:
        return answers
    try:
        predictions = predict([items[i] for i in good])
        if len(predictions) != len(good):
            raise RuntimeError(f"{len(predictions)} predictions for {len(good)} images")
    except Exception as e:  # noqa: BLE001 - the worker must answer every request, not die
        logger.exception("forward pass failed for a batch of %d images", len(good))
        failure = BadImage(500, f"inference failed: {type(e).__name__}: {e}")
        predictions = [failure] * len(good)
    for i, prediction in zip(good, predictions):
        answers[i] = prediction
    return answers
