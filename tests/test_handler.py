"""The handler through a mock TorchServe context (no server): stages, the zoo, mixed batches, errors."""
from __future__ import annotations

import base64
import json
import logging
import math
import os
import threading
import uuid
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from ts.context import Context, RequestProcessor
from ts.metrics.metrics_store import MetricsStore

from handler import batch_inference, classifier_handler, device, preprocessing
from handler.aot import file_sha256
from handler.classifier_handler import ClassifierHandler
from handler.device import available_cores
from tests.image_zoo import (
    BLUE,
    DOMINANT_CHANNEL,
    GREEN,
    RED,
    encode,
    exif_rotated_jpeg_bytes,
    png_bytes,
    zoo_files,
)
from tests.tiny_model import make_tiny_run

ROOT = Path(__file__).resolve().parents[1]
MODEL_YAML = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())


def make_context(model_dir: Path, model_yaml: dict | None = None, gpu_id: int | None = None) -> Context:
    """A real ts.context.Context, built as ts/service.py builds it for a worker."""
    manifest = {"model": {"modelName": "tiny", "serializedFile": "model.pt",
                          "handler": "classifier_handler.py", "modelVersion": "1.0"}}
    return Context("tiny", str(model_dir), manifest, 8, gpu_id, "0.12.0", True,
                   MetricsStore(uuid.uuid4(), "tiny"), MODEL_YAML if model_yaml is None else model_yaml)


def call_handle(handler: ClassifierHandler, context: Context, rows: list) -> tuple[list, list[int]]:
    """One batch through handle() as ts/service.py calls it; bodies must be JSON-serialisable."""
    context.request_processor = [RequestProcessor({}) for _ in rows]
    bodies = handler.handle(rows, context)
    assert len(bodies) == len(rows)
    json.dumps(bodies)
    return bodies, [context.get_response_status(i)[0] for i in range(len(rows))]


def expected_probabilities(rgb: tuple[int, int, int], num_classes: int = 3) -> list[float]:
    """TinyNet by hand: x = (c/255 - 0.5)/0.5, logits_i = (1 + i//3) * x[i % 3] + 0.1 * i/(n-1)."""
    x = [(c / 255 - 0.5) / 0.5 for c in rgb]
    logits = [(1 + i // 3) * x[i % 3] + 0.1 * i / (num_classes - 1) for i in range(num_classes)]
    total = sum(math.exp(v) for v in logits)
    return [math.exp(v) / total for v in logits]


def new_handler(run_dir: Path, model_yaml: dict | None = None,
                gpu_id: int | None = None) -> tuple[ClassifierHandler, Context]:
    """An initialised handler; close it with close_handler (the handler_factory fixture does)."""
    context = make_context(run_dir, model_yaml, gpu_id)
    handler = ClassifierHandler()
    handler.initialize(context)
    return handler, context


def close_handler(handler: ClassifierHandler) -> None:
    """Stop the handler's decode threads (TorchServe ends the worker process instead)."""
    if getattr(handler, "decode_pool", None) is not None:
        handler.decode_pool.shutdown(wait=True)


SHARED_POOLS: list = []  # the module-wide handler's pool, alive on purpose


def decode_threads() -> set[threading.Thread]:
    """Live decode threads that no test owns on purpose."""
    shared = {t for pool in SHARED_POOLS for t in getattr(pool, "_threads", ())}
    return {t for t in threading.enumerate() if t.name.startswith("decode") and t not in shared}


@pytest.fixture(autouse=True)
def leaves_no_threads_behind():
    """initialize() sets torch's process-wide thread count and starts a pool: tests must undo both."""
    threads, pools = torch.get_num_threads(), decode_threads()
    yield
    assert torch.get_num_threads() == threads, "a test left torch's thread count changed"
    assert decode_threads() <= pools, "a test left decode threads running"


@pytest.fixture
def handler_factory():
    """new_handler for one test: every handler closed and torch's thread count restored afterwards."""
    threads, made = torch.get_num_threads(), []

    def make(run_dir: Path, model_yaml: dict | None = None,
             gpu_id: int | None = None) -> tuple[ClassifierHandler, Context]:
        made.append(new_handler(run_dir, model_yaml, gpu_id)[0])
        return made[-1], made[-1].context

    yield make
    for handler in made:
        close_handler(handler)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def served(run_dir):
    threads = torch.get_num_threads()
    handler, context = new_handler(run_dir)
    SHARED_POOLS.append(handler.decode_pool)
    yield handler, context
    close_handler(handler)
    SHARED_POOLS.remove(handler.decode_pool)
    torch.set_num_threads(threads)  # initialize() sets the process-wide count


def test_initialize_reads_run_folder_and_settings(served):
    handler, _ = served
    assert handler.labels == ["class_0", "class_1", "class_2"]
    assert handler.preprocess_config.image_size == (8, 8)
    assert handler.device == torch.device("cpu") and handler.precision == "fp32"
    assert handler.dtype == torch.float32
    assert handler.settings.topk == MODEL_YAML["handler"]["topk"]
    # Outside TorchServe no worker processes are found: the configured minWorkers count.
    assert torch.get_num_threads() == max(1, available_cores() // MODEL_YAML["minWorkers"])


def test_preprocess_stage_gives_normalised_tensors_and_per_row_errors(served):
    handler, _ = served
    items = handler.preprocess([{"body": png_bytes(RED, (16, 16))}, {"body": b"not an image"}])
    assert items[0].shape == (3, 8, 8)
    assert torch.equal(items[0], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 8, 8))
    assert isinstance(items[1], preprocessing.BadImage) and items[1].code == 400


def test_inference_stage_gives_exact_softmax(served):
    handler, _ = served
    tensors = handler.preprocess([{"body": png_bytes(c)} for c in (RED, GREEN, (128, 64, 200))])
    probabilities = handler.inference(tensors)
    expected = torch.tensor([expected_probabilities(c) for c in (RED, GREEN, (128, 64, 200))])
    assert probabilities.dtype == torch.float32 and probabilities.shape == (3, 3)
    torch.testing.assert_close(probabilities, expected, rtol=0, atol=1e-6)


def test_postprocess_stage_gives_topk_highest_first(served):
    handler, _ = served
    answers = handler.postprocess(torch.tensor([[0.2, 0.5, 0.3], [0.7, 0.1, 0.2]]))
    assert [[a["index"] for a in answer] for answer in answers] == [[1, 2, 0], [0, 2, 1]]
    assert answers[0][0] == {"label": "class_1", "index": 1, "probability": pytest.approx(0.5)}


@pytest.mark.parametrize("colour", [RED, GREEN, BLUE])
def test_handle_answers_exact_predictions(served, colour):
    handler, context = served
    bodies, statuses = call_handle(handler, context, [{"body": png_bytes(colour)}])
    assert statuses == [200]
    assert context.get_response_content_type(0) == "application/json"
    expected = expected_probabilities(colour)
    assert [a["index"] for a in bodies[0]] == sorted(range(3), key=lambda i: -expected[i])
    for answer in bodies[0]:
        assert answer["label"] == f"class_{answer['index']}"
        assert answer["probability"] == pytest.approx(expected[answer["index"]], abs=1e-6)


@pytest.mark.parametrize("name", sorted(zoo_files()))
def test_zoo_through_handle(served, name):
    handler, context = served
    content, status = zoo_files()[name]
    bodies, statuses = call_handle(handler, context, [{"body": content}])
    assert statuses == [status]
    if status == 200:
        assert len(bodies[0]) == 3 and bodies[0][0]["probability"] >= bodies[0][-1]["probability"]
        if name in DOMINANT_CHANNEL:
            assert bodies[0][0]["index"] == DOMINANT_CHANNEL[name]
    else:
        assert bodies[0]["code"] == status and bodies[0]["error"]
        assert context.get_response_status(0)[1]  # the reason phrase carries the message


def test_whole_zoo_as_one_batch_keeps_positions(served):
    handler, context = served
    zoo = zoo_files()
    bodies, statuses = call_handle(handler, context, [{"data": content} for content, _ in zoo.values()])
    assert statuses == [status for _, status in zoo.values()]


def test_batch_of_eight_with_two_bad_images(served):
    handler, context = served
    colours = [RED, GREEN, None, BLUE, RED, None, GREEN, BLUE]
    bad = {2: zoo_files()["truncated.jpg"][0], 5: b"<html>not an image</html>"}
    rows = [{"body": bad[i] if c is None else png_bytes(c)} for i, c in enumerate(colours)]
    bodies, statuses = call_handle(handler, context, rows)
    assert statuses == [200, 200, 400, 200, 200, 400, 200, 200]
    for i, colour in enumerate(colours):
        if colour is None:
            assert bodies[i]["code"] == 400 and "error" in bodies[i]
        else:
            assert bodies[i][0]["index"] == colour.index(255)
            assert bodies[i][0]["probability"] == pytest.approx(max(expected_probabilities(colour)), abs=1e-6)


@pytest.mark.parametrize("topk, entries", [(5, 3), (2, 2), (1, 1)])
def test_topk_is_capped_at_the_number_of_classes(handler_factory, run_dir, topk, entries):
    config = {**MODEL_YAML, "handler": {**MODEL_YAML["handler"], "topk": topk}}
    handler, context = handler_factory(run_dir, config)
    bodies, _ = call_handle(handler, context, [{"body": png_bytes(RED)}])
    assert len(bodies[0]) == entries and bodies[0][0]["label"] == "class_0"


def test_mixed_batch_answers_stay_at_their_own_positions(served):
    """Good and bad images interleaved (decoded in the handler's threads): each answer is its own row's."""
    from tests.image_zoo import cut_jpeg_with_end_marker, png_header_of

    colours = {0: (250, 10, 10), 2: (10, 250, 10), 4: (10, 10, 250), 6: (128, 64, 200), 8: (60, 200, 120)}
    bad = {1: (b"<html>not an image</html>", 400, "not a recognised image format"),
           3: (png_header_of(8000, 8000), 413, "over the limit of 50,000,000"),
           5: (cut_jpeg_with_end_marker(0.3), 400, "truncated or corrupt"),
           7: (b"", 400, "empty body")}
    rows = [{"body": png_bytes(colours[i])} if i in colours else {"body": bad[i][0]} for i in range(9)]
    rows[7] = {"data": png_bytes(RED), "file": png_bytes(GREEN)}  # two images: refused as a whole
    bad[7] = (None, 400, "one request is one image")
    handler, context = served
    assert handler.decode_pool is not None or os.cpu_count() == 1  # the threaded path is what's tested
    bodies, statuses = call_handle(handler, context, rows)
    assert statuses == [200 if i in colours else bad[i][1] for i in range(9)]
    for i, body in enumerate(bodies):
        if i in bad:
            assert body["code"] == bad[i][1] and bad[i][2] in body["error"], (i, body)
            continue
        expected = expected_probabilities(colours[i])
        assert body[0]["index"] == max(range(3), key=lambda k: expected[k])
        for answer in body:  # distinct colours: a swapped row would be off by far more than 1e-6
            assert answer["probability"] == pytest.approx(expected[answer["index"]], abs=1e-6)


def test_request_forms_through_handle(served):
    handler, context = served
    b64 = base64.b64encode(png_bytes(BLUE)).decode()
    rows = [{"data": bytearray(png_bytes(BLUE))}, {"file": png_bytes(BLUE)}, {"body": {"data": b64}},
            {"body": b64}, {"body": "plain text, not base64!"}, {"other": b""}]
    bodies, statuses = call_handle(handler, context, rows)
    assert statuses == [200, 200, 200, 200, 400, 400]
    assert all(body[0]["index"] == 2 for body in bodies[:4])


class TopVersusBottom(nn.Module):
    """Class 0: red in the top half; class 1: red in the bottom half; class 2: neither."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[2] // 2
        top, bottom = x[:, 0, :half].mean(dim=(1, 2)), x[:, 0, half:].mean(dim=(1, 2))
        return torch.stack([10 * (top - bottom), 10 * (bottom - top), torch.zeros_like(top)], dim=1)


def test_exif_orientation_is_applied(handler_factory, tmp_path):
    run_dir = make_tiny_run(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(TopVersusBottom()).save(str(run_dir / "model.pt"))
    handler, context = handler_factory(run_dir)
    bodies, statuses = call_handle(handler, context, [{"body": exif_rotated_jpeg_bytes()}])
    assert statuses == [200]
    assert bodies[0][0]["index"] == 0 and bodies[0][0]["probability"] > 0.99  # upright: red on top
    img = preprocessing.open_image(exif_rotated_jpeg_bytes())
    assert img.size == (16, 32) and img.getpixel((8, 4))[0] > 200 and img.getpixel((8, 28))[2] > 200


class Exploding(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("kaboom in the forward pass")


def test_failed_forward_pass_answers_500_to_every_decoded_image(handler_factory, run_dir, caplog):
    handler, context = handler_factory(run_dir)
    handler.model = Exploding()
    rows = [{"body": png_bytes(RED)}, {"body": b""}, {"body": png_bytes(GREEN)}]
    with caplog.at_level(logging.ERROR):
        bodies, statuses = call_handle(handler, context, rows)
    assert statuses == [500, 400, 500]
    assert "kaboom" in bodies[0]["error"] and bodies[0]["code"] == 500
    assert "forward pass failed" in caplog.text


def test_initialize_refuses_labels_that_do_not_match_the_model(handler_factory, tmp_path):
    run_dir = make_tiny_run(tmp_path / "run")
    (run_dir / "index_to_name.json").write_text(json.dumps({str(i): f"c{i}" for i in range(4)}))
    with pytest.raises(ValueError, match="outputs 3 classes but index_to_name.json names 4"):
        handler_factory(run_dir)


def test_handler_module_defines_exactly_one_class():
    from ts.utils.util import list_classes_from_module

    import handler.classifier_handler as module
    assert list_classes_from_module(module) == [ClassifierHandler]
    assert not hasattr(module, "handle")  # a module-level handle() would be taken as the entry point


def test_grayscale_colour_mode_from_preprocess_json(handler_factory, tmp_path):
    run_dir = make_tiny_run(tmp_path / "run")
    cfg = json.loads((run_dir / "preprocess.json").read_text())
    (run_dir / "preprocess.json").write_text(json.dumps({**cfg, "color_mode": "grayscale"}))
    handler, _ = handler_factory(run_dir)
    tensor = handler.preprocess([{"body": encode(Image.new("RGB", (8, 8), RED), "PNG")}])[0]
    luminance = round(255 * 299 / 1000) / 255  # PIL's L = 0.299 R (+ 0.587 G + 0.114 B)
    torch.testing.assert_close(tensor, torch.full((3, 8, 8), (luminance - 0.5) / 0.5), rtol=0, atol=1e-6)


def with_precision(precision: str) -> dict:
    return {**MODEL_YAML, "handler": {**MODEL_YAML["handler"], "precision": precision}}


@pytest.mark.skipif(not device.cpu_has_native_bf16(), reason="this CPU has no native bf16 (avx512_bf16/amx)")
def test_bf16_on_a_cpu_that_has_it_answers_close_to_fp32(handler_factory, run_dir):
    handler, context = handler_factory(run_dir, with_precision("bf16"))
    assert handler.precision == "bf16" and handler.dtype == torch.bfloat16
    colours = [RED, GREEN, BLUE, (128, 64, 200)]
    bodies, statuses = call_handle(handler, context, [{"body": png_bytes(c)} for c in colours])
    assert statuses == [200] * 4
    for body, colour in zip(bodies, colours):
        expected = expected_probabilities(colour)
        for answer in body:  # bf16 rounds inputs and weights to 8 bits of mantissa: 2^-8 relative
            assert answer["probability"] == pytest.approx(expected[answer["index"]], abs=1e-2)


def test_bf16_on_a_cpu_without_it_refuses_to_start(handler_factory, run_dir, monkeypatch):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)  # pretend the flag is absent
    with pytest.raises(device.DeviceError, match="precision bf16: the CPU cannot run it: no native bf16"):
        handler_factory(run_dir, with_precision("bf16"))


@pytest.mark.parametrize("has_bf16", [False, True])
def test_auto_serves_bf16_only_with_the_capability_and_a_passing_report(handler_factory, tmp_path,
                                                                          monkeypatch, has_bf16):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: has_bf16)  # pretended either way
    run_dir = make_tiny_run(tmp_path / "run")
    report = {"precision": "bf16", "passed": True, "agreement": 1.0, "accuracy_fp32": 1.0, "accuracy": 1.0,
              "model_sha256": file_sha256(run_dir / "model.pt")}
    (run_dir / "precision-bf16.json").write_text(json.dumps(report))
    handler, context = handler_factory(run_dir, with_precision("auto"))
    assert handler.precision == ("bf16" if has_bf16 else "fp32")
    described = handler.describe_handle()["precision"]
    assert described["served"] == handler.precision and described["configured"] == "auto"
    assert described["agreement_reports"] == {"bf16": report}
    assert ("no native bf16" in described["why"]) is not has_bf16


@pytest.mark.parametrize("setting", ["auto", "bf16"])
def test_a_report_about_another_model_pt_refuses_the_start(handler_factory, tmp_path, monkeypatch, setting):
    # A .mar whose model.pt was swapped after the check, its report edited to "passed": the report
    # names the model.pt it was made for, and the handler compares before believing it.
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    run_dir = make_tiny_run(tmp_path / "run")
    report = {"precision": "bf16", "passed": True, "agreement": 12.0, "model_sha256": "0" * 64}
    (run_dir / "precision-bf16.json").write_text(json.dumps(report))
    with pytest.raises(device.DeviceError, match="agreement report for bf16 is about another model.pt "
                                                 "[(]sha256 000000000000[.][.][.], this one [0-9a-f]{12}"):
        handler_factory(run_dir, with_precision(setting))


def test_an_accelerator_failure_ends_the_worker(handler_factory, run_dir, monkeypatch):
    # The forward pass raises what a broken CUDA context raises (no GPU here); end_worker is
    # replaced so that the test process survives to see it called.
    ended = []
    monkeypatch.setattr(classifier_handler, "end_worker", lambda: ended.append(1))
    handler, context = handler_factory(run_dir)

    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    handler.model = Broken()
    with pytest.raises(batch_inference.AcceleratorFailure):
        call_handle(handler, context, [{"body": png_bytes(RED)}])
    assert ended == [1]


def test_auto_threads_follow_the_workers_running(handler_factory, run_dir, monkeypatch):
    # The archive says one worker; `manage.py scale --min 2` started a second: the count of
    # worker processes (replaced here by a number) decides, not minWorkers or maxWorkers.
    monkeypatch.setattr(device, "available_cores", lambda *a: 8)
    running = [1]
    monkeypatch.setattr(device, "count_running_workers", lambda *a, **k: running[0])
    handler, context = handler_factory(run_dir)
    assert torch.get_num_threads() == 8 and handler.decode_pool._max_workers == 8
    running[0] = 2
    call_handle(handler, context, [{"body": png_bytes(RED)}])
    assert torch.get_num_threads() == 8  # rechecked only every THREADS_RECHECK_S
    handler.threads_checked -= classifier_handler.THREADS_RECHECK_S
    bodies, statuses = call_handle(handler, context, [{"body": png_bytes(RED)}])
    assert statuses == [200] and torch.get_num_threads() == 4 and handler.decode_pool._max_workers == 4
