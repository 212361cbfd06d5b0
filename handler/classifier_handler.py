"""TorchServe handler: decode, preprocess, one batched forward pass, softmax top-k.

A thin class over plain functions (request_decoding, preprocessing, batch_inference):
every image of a batch gets its own answer, a bad image its own 4xx, and nothing
escapes handle(), so one corrupt upload never costs the batch or the worker.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from ts.service import Service
from ts.torch_handler.base_handler import BaseHandler

from handler import aot, batch_inference, device, metrics, pixel_payload, preprocessing, request_decoding

logger = logging.getLogger(__name__)
THREADS_RECHECK_S = 10.0  # how often `cpu_threads: auto` recounts the workers running
WORKER_EXIT_CODE = 70  # a worker ended on an accelerator failure (EX_SOFTWARE)


class ClassifierHandler(BaseHandler):
    """Image classifier over model.pt, index_to_name.json and preprocess.json from the .mar."""

    def initialize(self, context) -> None:
        """Load settings, labels, preprocessing and the model onto the worker's device."""
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        model_yaml = getattr(context, "model_yaml_config", None) or {}
        self.settings = batch_inference.parse_settings(model_yaml)
        preprocessing.configure_pillow(self.settings.max_pixels)
        request_decoding.watch_repeated_fields(Service)  # two `data` parts must not merge unseen
        device.use_full_fp32()  # before any model runs: fp32 must not silently be TF32
        self.device = device.select_device(properties)
        self.reports = device.read_reports(model_dir)
        serialized = ((context.manifest or {}).get("model") or {}).get("serializedFile", "model.pt")
        self.package = None
        if serialized.endswith(".pt2"):  # an AOTInductor package: its precision is the package's
            self.model, self.package = aot.load_package(model_dir / serialized, self.device)
            self.precision, reason = device.resolve_package_precision(self.settings.precision, self.package,
                                                                      self.reports)
            self.dtype = torch.float32  # the package takes float32 and converts inside its graph
        else:
            device.check_report_models(self.reports, model_dir / serialized)
            self.precision, reason = device.resolve_precision(self.settings.precision, self.device, self.reports)
            self.dtype = device.DTYPES[self.precision]
        self.precision_reason = reason
        self.model_format = "pt2" if self.package else "torchscript"
        # auto: cores // workers of this server now running; rechecked as workers come and go.
        self.configured_workers = int(model_yaml.get("minWorkers") or 1)
        self.decode_pool = None
        self.threads_checked = 0.0
        self.adjust_threads()
        self.preprocess_config = preprocessing.PreprocessConfig.load(model_dir / "preprocess.json")
        self.labels = batch_inference.load_labels(model_dir / "index_to_name.json")
        if self.package is None:
            self.model = batch_inference.load_model(model_dir / serialized, self.device, self.precision)
        batch_inference.check_model_outputs(self.model, self.preprocess_config, len(self.labels),
                                            self.device, self.dtype)
        self.manifest = context.manifest
        self.model_version = str(((context.manifest or {}).get("model") or {}).get("modelVersion") or "")
        cache = getattr(context, "metrics", None)
        self.metrics = metrics.HandlerMetrics(
            cache, str(getattr(context, "model_name", "") or ""), self.model_version, self.labels, self.precision,
            self.model_format) if cache is not None and self.settings.metrics else None
        self.context = context
        self.initialized = True
        logger.info("classifier ready: %d classes, input %s, device %s, precision %s (%s), %d torch threads",
                    len(self.labels), list(self.preprocess_config.image_size), self.device,
                    self.precision, reason, torch.get_num_threads())

    def adjust_threads(self) -> None:
        """Torch and decode threads for the workers now running (CPU and GPU workers alike)."""
        now = time.monotonic()
        if self.threads_checked and (self.settings.cpu_threads != "auto"
                                     or now - self.threads_checked < THREADS_RECHECK_S):
            return
        self.threads_checked = now
        workers = device.count_running_workers() or self.configured_workers
        threads = device.count_cpu_threads(self.settings.cpu_threads, workers)
        if threads == torch.get_num_threads() and self.decode_pool is not None:
            return
        if threads != torch.get_num_threads():
            logger.info("%d worker(s) running: %d torch threads", workers, threads)
        torch.set_num_threads(threads)
        # The batch's images decode in as many threads (Pillow releases the GIL): 12 MP JPEGs
        # otherwise keep one core busy while the other waits for the forward pass.
        old, self.decode_pool = self.decode_pool, (
            ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None)
        if old is not None:
            old.shutdown(wait=True)  # idle: handle() calls this before decoding

    def preprocess(self, data: list) -> list:
        """Request rows -> per row a 3 x H x W tensor or the BadImage that refused it."""
        return request_decoding.decode_batch(data, self.preprocess_config, self.settings.max_pixels,
                                             getattr(self, "decode_pool", None),
                                             self.settings.max_decoded_bytes)

    def inference(self, data: list[torch.Tensor], *args, **kwargs) -> torch.Tensor:
        """Decoded images -> softmax probabilities N x C from one batched forward pass."""
        return batch_inference.forward_batch(self.model, data, self.device, self.dtype)

    def postprocess(self, data: torch.Tensor) -> list[list[dict]]:
        """Probabilities -> per image the top-k labels, highest first."""
        return batch_inference.top_k(data, self.settings.topk, self.labels)

    def describe_handle(self) -> dict:
        """What a client needs to preprocess for this model (describe with customized=true)."""
        return {
            "pixel_payload": {"content_type": pixel_payload.CONTENT_TYPE, "dtype": "uint8",
                              "shape": list(pixel_payload.expected_shape(self.preprocess_config.image_size))},
            "preprocess": self.preprocess_config.to_dict(),
            "max_pixels": self.settings.max_pixels,
            "max_decoded_bytes": self.settings.max_decoded_bytes,
            "topk": self.settings.topk,
            "precision": {"served": self.precision, "configured": self.settings.precision,
                          "why": self.precision_reason, "device": str(self.device),
                          "agreement_reports": self.reports},
            "format": self.model_format,
            "metrics": getattr(self, "metrics", None) is not None,  # handler/metrics.py's, to Prometheus
            "package": self.package,  # the .pt2's record: precision, march and the CPU flags it needs
        }

    def handle(self, data: list, context) -> list:
        """Answer a batch: one JSON body and one HTTP status per request (describe requests too)."""
        started = time.perf_counter()
        self.context = context
        data = data or []
        # TorchServe's describe?customized=true arrives as a request with header describe: True;
        # BaseHandler.handle routes it to describe_handle, and this override must too.
        describe = [i for i in range(len(data)) if is_describe(context, i)]
        rows = [row for i, row in enumerate(data) if i not in describe]
        self.adjust_threads()
        times = metrics.BatchTimes()

        def predict(tensors: list) -> list:
            forward_started = time.perf_counter()
            answers = self.postprocess(self.inference(tensors))
            times.forward.append((time.perf_counter() - forward_started, len(tensors)))
            return answers

        try:
            decode_started = time.perf_counter()
            decoded = self.preprocess(rows)
            times.decode_s = time.perf_counter() - decode_started
            answers = batch_inference.answer_batch(decoded, predict)
        except batch_inference.AcceleratorFailure as e:
            # The CUDA context is broken for good: end the worker, so that TorchServe answers this
            # batch with errors, the model stops counting as READY and a fresh worker replaces it.
            logger.critical("accelerator failure, ending the worker: %s", e)
            end_worker()
            raise
        if getattr(self, "metrics", None) is not None and answers:
            try:
                times.total_s = time.perf_counter() - started
                self.metrics.record(answers, times)
            except Exception:  # noqa: BLE001 - a metric must never cost an answer
                logger.exception("sending the batch's metrics failed")
        for i in describe:
            answers.insert(i, self.describe_handle())
        bodies = request_decoding.format_responses(answers, context, self.model_version)
        if getattr(context, "metrics", None) is not None:
            context.metrics.add_time("HandlerTime", round((time.perf_counter() - started) * 1000, 2),
                                     None, "ms")
        return bodies


def is_describe(context, idx: int) -> bool:
    """Whether request `idx` is TorchServe's describe call (header describe: True), as BaseHandler checks."""
    try:
        return context.get_request_header(idx, "describe") == "True"
    except (AttributeError, IndexError, KeyError, TypeError):  # a context without request headers
        return False


def end_worker() -> None:
    """Exit the worker process now (logs flushed); TorchServe starts a replacement."""
    logging.shutdown()
    os._exit(WORKER_EXIT_CODE)
