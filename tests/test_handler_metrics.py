"""handler/metrics.py through the handler with TorchServe's own worker-side metrics cache, read from
handler/metrics.yaml as a worker reads it: the metric lines a batch sends (tests/test_metrics.py
follows them through a real TorchServe into a real Prometheus)."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handler import metrics
from tests.image_zoo import BLUE, GREEN, RED, png_bytes
from tests.test_handler import MODEL_YAML, call_handle, handler_factory, make_context, run_dir  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"\[METRICS\](\w+)\.(\w+):([0-9.e-]+)\|#([^|]*)\|#type:(\w+)")


def worker_cache(config: Path = ROOT / "handler" / "metrics.yaml") -> MetricsCacheYamlImpl:
    cache = MetricsCacheYamlImpl(config_file_path=str(config))
    cache.initialize_cache()
    return cache


def sent(caplog) -> list[tuple[str, float, dict]]:
    """(name, value, dimensions) of every metric line logged."""
    found = []
    for record in caplog.records:
        match = LINE.search(record.getMessage())
        if match:
            dims = dict(pair.split(":", 1) for pair in match.group(4).split(",") if pair)
            found.append((match.group(1), float(match.group(3)), dims))
    return found




@pytest.fixture
def with_cache(handler_factory, run_dir, monkeypatch):
    """A handler whose context carries the worker's metrics cache (make_context's is the old store)."""
    def make(model_yaml=None, config=ROOT / "handler" / "metrics.yaml"):
        cache = worker_cache(config)
        monkeypatch.setattr("tests.test_handler.MetricsStore", lambda *args: cache)
        return handler_factory(run_dir, model_yaml)
    return make


def test_a_batch_sends_outcomes_times_fill_confidence_and_labels(with_cache, caplog):
    handler, context = with_cache()
    caplog.set_level(logging.INFO)
    rows = [{"body": png_bytes(RED)}, {"body": png_bytes(GREEN)}, {"body": png_bytes(BLUE)},
            {"body": b"hello, not an image"}, {"body": b""}]
    bodies, statuses = call_handle(handler, context, rows)
    assert statuses == [200, 200, 200, 400, 400]
    lines = sent(caplog)
    by_name = {}
    for name, value, dims in lines:
        by_name.setdefault(name, []).append((value, dims))
        assert dims["ModelName"] == "tiny" and dims["ModelVersion"] == "1.0" and dims["Level"] == "Model"
    assert sorted((d["Outcome"], v) for v, d in by_name[metrics.IMAGES]) == [
        ("empty", 1), ("not_an_image", 1), ("ok", 3)]
    assert [v for v, _ in by_name[metrics.BATCH_IMAGES]] == [3]  # the refused two are not forwarded
    assert len(by_name[metrics.FORWARD]) == 1 and len(by_name[metrics.DECODE]) == 1
    assert len(by_name[metrics.BATCH]) == 1 and by_name[metrics.BATCH][0][0] >= by_name[metrics.FORWARD][0][0]
    shortfalls = sorted(v for v, _ in by_name[metrics.SHORTFALL])
    assert shortfalls == pytest.approx(sorted(1 - body[0]["probability"] for body in bodies[:3]), abs=1e-6)
    assert sorted((d["Label"], v) for v, d in by_name[metrics.ANSWERS]) == sorted(
        (body[0]["label"], 1) for body in bodies[:3])
    assert [(d["Precision"], d["Format"], v) for v, d in by_name[metrics.PRECISION]] == [("fp32", "torchscript", 1)]


def test_metrics_false_sends_none_of_the_handlers_metrics(with_cache, caplog):
    handler, context = with_cache({**MODEL_YAML, "handler": {**MODEL_YAML.get("handler", {}), "metrics": False}})
    caplog.set_level(logging.INFO)
    call_handle(handler, context, [{"body": png_bytes(RED)}])
    assert not [name for name, _, _ in sent(caplog) if name.startswith("classifier_")]
    assert handler.describe_handle()["metrics"] is False


def test_a_metrics_config_without_them_serves_and_says_so(with_cache, caplog, tmp_path):
    torchserve_default = Path(__import__("ts").__file__).parent / "configs" / "metrics.yaml"
    caplog.set_level(logging.INFO)
    handler, context = with_cache(config=torchserve_default)
    assert "not sent, as TorchServe's metrics_config does not declare them" in caplog.text
    assert "classifier_images_total" in caplog.text
    bodies, statuses = call_handle(handler, context, [{"body": png_bytes(RED)}])
    assert statuses == [200] and bodies[0][0]["index"] == 0


def test_labels_are_made_safe_for_the_metric_line_and_dropped_above_100_classes(caplog):
    cache = worker_cache()
    caplog.set_level(logging.INFO)
    answer = [{"label": "x", "index": 0, "probability": 0.9}]
    hostile = metrics.HandlerMetrics(cache, "m", "1.0", ["a,b:c|#d", "ok"], "fp32", "torchscript")
    hostile.record([answer], metrics.BatchTimes())
    labels = [d["Label"] for name, _, d in sent(caplog) if name == metrics.ANSWERS]
    assert labels == ["a_b_c__d"]
    caplog.clear()
    many = metrics.HandlerMetrics(cache, "m", "1.0", [f"class{i}" for i in range(101)], "fp32", "torchscript")
    many.record([answer], metrics.BatchTimes())
    names = [name for name, _, _ in sent(caplog)]
    assert metrics.ANSWERS not in names and metrics.IMAGES in names
    assert "101 classes: answers by label are not sent" in caplog.text


def test_every_refusal_reason_is_declared_and_a_bad_one_is_refused():
    from handler.preprocessing import REFUSALS, BadImage
    assert BadImage(400, "x").reason == "bad_request" and BadImage(500, "x").reason == "internal_error"
    with pytest.raises(ValueError, match="unknown refusal reason"):
        BadImage(400, "x", "some_file_name.png")
    assert "ok" not in REFUSALS and len(set(REFUSALS)) == len(REFUSALS)
