"""What the handler tells Prometheus about the images it sees, through TorchServe's metrics API.

Every metric is declared in handler/metrics.yaml (the `metrics_config` TorchServe is started with):
TorchServe 0.12.0 exposes only declared metrics. The worker writes one log line per update, which
the frontend turns into a Prometheus series, so a batch costs a few lines: counters are added per
batch (one line per outcome and per label seen), histograms observed per batch, except the top-1
shortfall, one line per answered image. Dimension values are bounded: the model's name and version,
an outcome from handler.preprocessing.REFUSALS, a label of a model of at most MAX_LABELED_CLASSES
classes, the precision and format served. No file name and nothing a client sent reaches a metric.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field

from ts.metrics.metric_type_enum import MetricTypes

from handler.preprocessing import BadImage

logger = logging.getLogger(__name__)
MAX_LABELED_CLASSES = 100  # above, classifier_answers_total is not sent: one series per class is too many
# TorchServe's metric line separates dimensions with "," and ":", and fields with "|" and "#".
_UNSAFE = re.compile(r"[^\w .+/-]")

IMAGES, ANSWERS, PRECISION = "classifier_images_total", "classifier_answers_total", "classifier_precision"
BATCH, DECODE, FORWARD = "classifier_batch_seconds", "classifier_decode_seconds", "classifier_forward_seconds"
BATCH_IMAGES, SHORTFALL = "classifier_batch_images", "classifier_top1_shortfall"
_TYPES = {IMAGES: MetricTypes.COUNTER, ANSWERS: MetricTypes.COUNTER, PRECISION: MetricTypes.GAUGE,
          **dict.fromkeys((BATCH, DECODE, FORWARD, BATCH_IMAGES, SHORTFALL), MetricTypes.HISTOGRAM)}


def dimension_value(value: str) -> str:
    """A value TorchServe's metric line can carry: its separators replaced, at most 64 characters."""
    return _UNSAFE.sub("_", str(value))[:64] or "_"


@dataclass
class BatchTimes:
    """What one handle() measured: seconds in all, decoding, and per forward pass (seconds, images)."""

    total_s: float = 0.0
    decode_s: float = 0.0
    forward: list[tuple[float, int]] = field(default_factory=list)


class HandlerMetrics:
    """The declared metrics of one worker, sent with the model's name and version as dimensions."""

    def __init__(self, cache, model_name: str, model_version: str, labels: list[str], precision: str,
                 model_format: str):
        self.metrics, missing = {}, []
        for name, kind in _TYPES.items():
            try:
                self.metrics[name] = cache.get_metric(name, kind)
            except Exception:  # noqa: BLE001 - not declared (or an older metrics object): serve, say so
                missing.append(name)
        if missing:
            logger.warning("not sent, as TorchServe's metrics_config does not declare them (handler/metrics.yaml "
                           "does): %s", ", ".join(missing))
        self.base = [dimension_value(model_name), "Model", dimension_value(model_version or "none")]
        self.labels = [dimension_value(label) for label in labels] if len(labels) <= MAX_LABELED_CLASSES else None
        self.served = [dimension_value(precision), dimension_value(model_format)]
        if self.labels is None:
            logger.info("%d classes: answers by label are not sent to Prometheus (at most %d)",
                        len(labels), MAX_LABELED_CLASSES)

    def _send(self, name: str, value: float, extra: list[str] = ()) -> None:
        metric = self.metrics.get(name)
        if metric is not None:
            metric.add_or_update(value, self.base + list(extra), "")

    def record(self, answers: list, times: BatchTimes) -> None:
        """Send one batch's numbers: `answers` as answer_batch returns them (top-k lists or BadImage)."""
        outcomes = Counter(a.reason if isinstance(a, BadImage) else "ok" for a in answers)
        for outcome, count in sorted(outcomes.items()):
            self._send(IMAGES, count, [outcome])
        self._send(PRECISION, 1, self.served)
        self._send(BATCH, round(times.total_s, 6))
        self._send(DECODE, round(times.decode_s, 6))
        for seconds, images in times.forward:
            self._send(FORWARD, round(seconds, 6))
            self._send(BATCH_IMAGES, images)
        answered = [a for a in answers if isinstance(a, list) and a]
        for answer in answered:
            self._send(SHORTFALL, round(max(0.0, 1.0 - float(answer[0]["probability"])), 6))
        if self.labels is not None:
            for index, count in sorted(Counter(a[0]["index"] for a in answered).items()):
                self._send(ANSWERS, count, [self.labels[index]])
