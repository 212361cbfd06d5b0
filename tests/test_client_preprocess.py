"""--preprocess client: the pixel payload, the handler's describe, and parity with server mode."""
from __future__ import annotations

import io
import json
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ts.context import Context, RequestProcessor
from ts.metrics.metrics_store import MetricsStore

from client import pixels
from core.errors import UserError
from handler import pixel_payload, preprocessing, request_decoding
from handler.classifier_handler import ClassifierHandler
from tests.conftest import PYTHON, REPO
from tests.image_zoo import big_gray16_png_bytes, jpeg_claiming_size, png_header_of, zoo_files
from tests.tiny_model import make_tiny_run

ROOT = Path(__file__).resolve().parents[1]
MODEL_YAML = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())
CFG = preprocessing.PreprocessConfig(image_size=(8, 8), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
MAX_PIXELS, MAX_DECODED = preprocessing.DEFAULT_MAX_PIXELS, preprocessing.DEFAULT_MAX_DECODED_BYTES
SETTINGS = pixels.PixelSettings(CFG, MAX_PIXELS, MAX_DECODED, pixel_payload.CONTENT_TYPE)
# Probabilities of one file in two modes: the same input tensor, but batches of other sizes and
# neighbours (the server forms them as requests arrive), so the kernels may sum in another order.
PROBABILITY_TOLERANCE = 1e-6


def server_side(data: bytes) -> torch.Tensor | preprocessing.BadImage:
    """What the handler makes of one request body (its decode_row)."""
    return request_decoding.decode_row(0, {"body": data}, CFG, MAX_PIXELS, MAX_DECODED)


def client_side(data: bytes) -> tuple[bytes, str] | preprocessing.BadImage:
    try:
        return pixels.ClientPreprocessor(SETTINGS)(data)
    except preprocessing.BadImage as e:
        return e


def bombs() -> dict[str, bytes]:
    return {"png_100000x100000": png_header_of(100000, 100000),  # over Pillow's own limit too
            "gray16_7000x7000": big_gray16_png_bytes(),  # under max_pixels, over max_decoded_bytes
            "jpeg_claims_9000x9000": jpeg_claiming_size(9000, 9000)}


@pytest.mark.parametrize("name", sorted(zoo_files()))
def test_zoo_file_gives_the_same_tensor_or_the_same_refusal_in_both_modes(name):
    data = zoo_files()[name][0]
    server, client = server_side(data), client_side(data)
    if isinstance(server, preprocessing.BadImage):
        assert isinstance(client, preprocessing.BadImage), f"{name}: the server refuses, the client sent it"
        assert (client.code, client.message) == (server.code, server.message)
        return
    body, content_type = client
    assert content_type == "application/x-npy" and pixel_payload.is_pixel_payload(body)
    # Same uint8 pixels through the same normalisation code: bit-identical, no tolerance needed.
    assert torch.equal(server_side(body), server)


def npy_files() -> dict[str, bytes]:
    """Files holding .npy bytes under an image's name: the handler takes them as pixel payloads."""
    return {"npy_as_photo.png": pixel_payload.encode(np.full((*CFG.image_size, 3), 128, np.uint8)),
            "npy_of_other_size.png": pixel_payload.encode(np.full((32, 32, 3), 128, np.uint8))}


@pytest.mark.parametrize("name", sorted(npy_files()))
@pytest.mark.parametrize("auto", [False, True])  # client mode; auto, the file not under min_file_bytes
def test_file_starting_with_the_npy_magic_is_sent_as_it_is_and_answered_as_in_server_mode(name, auto):
    data = npy_files()[name]
    min_file_bytes = len(data) if auto else 0
    assert pixels.ClientPreprocessor(SETTINGS, min_file_bytes)(data) == pixels.send_file(data)
    server = server_side(data)
    if name == "npy_as_photo.png":  # the model's shape: classified, as in server mode
        assert isinstance(server, torch.Tensor) and tuple(server.shape) == (3, *CFG.image_size)
    else:  # another shape: the handler's 400 naming both shapes, as in server mode
        assert isinstance(server, preprocessing.BadImage) and server.code == 400


@pytest.mark.parametrize("name", sorted(bombs()))
def test_bomb_is_refused_client_side_with_the_servers_reason(name):
    data = bombs()[name]
    server, client = server_side(data), client_side(data)
    assert isinstance(server, preprocessing.BadImage) and server.code == 413
    assert isinstance(client, preprocessing.BadImage)
    assert (client.code, client.message) == (server.code, server.message)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def test_payload_of_wrong_shape_answers_400_naming_both_shapes():
    error = server_side(pixel_payload.encode(np.zeros((16, 8, 3), np.uint8)))
    assert isinstance(error, preprocessing.BadImage) and error.code == 400
    assert "(16, 8, 3)" in error.message and "(8, 8, 3)" in error.message
    assert "preprocess.json" in error.message


@pytest.mark.parametrize("array, words", [
    (np.zeros((8, 8, 3), np.float32), "float32"),
    (np.zeros((8, 8, 3), np.uint16), "uint16"),
    (np.asfortranarray(np.zeros((8, 8, 3), np.uint8)), "Fortran"),
    (np.array([{"x": 1}] * 3, dtype=object), "object"),  # a pickled payload is never unpickled
])
def test_payload_of_wrong_dtype_or_order_answers_400_naming_it(array, words):
    error = server_side(npy(array))
    assert isinstance(error, preprocessing.BadImage) and error.code == 400
    assert words in error.message and "uint8" in error.message


def test_payload_cut_short_or_padded_answers_400():
    body = pixel_payload.encode(np.zeros((8, 8, 3), np.uint8))
    for wrong in (body[:-1], body + b"\0"):
        error = server_side(wrong)
        assert isinstance(error, preprocessing.BadImage) and error.code == 400
        assert "192" in error.message  # the bytes the header's shape needs


def test_payload_with_oversized_or_garbled_header_answers_400():
    long_header = b"\x93NUMPY\x02\x00" + (2**20).to_bytes(4, "little") + b" " * 64
    for wrong in (long_header, b"\x93NUMPY\x01\x00\x10\x00{'descr': 1 +}    \n"):
        error = server_side(wrong)
        assert isinstance(error, preprocessing.BadImage) and error.code == 400
        assert "header" in error.message


def test_payload_header_with_an_unclosed_bracket_or_a_short_length_field_answers_400():
    body = pixel_payload.encode(np.zeros((8, 8, 3), np.uint8))
    length = int.from_bytes(body[8:10], "little")
    header = body[10:10 + length]
    unclosed = body[:10] + header.replace(b"(8, 8, 3)", b"(8, 8, 3 ").replace(b"}", b" ") + body[10 + length:]
    short_length = body[:8] + (20).to_bytes(2, "little") + body[10:]
    for wrong in (unclosed, short_length):  # numpy raises tokenize.TokenError on both: not a 500
        error = server_side(wrong)
        assert isinstance(error, preprocessing.BadImage) and error.code == 400, error
        assert "unreadable header" in error.message


def test_client_decoder_failure_is_the_servers_500_wording(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("decoder bug")
    monkeypatch.setattr(preprocessing, "open_image", broken)
    data = zoo_files()["one_pixel.png"][0]
    server, client = server_side(data), client_side(data)
    assert isinstance(client, preprocessing.BadImage)
    assert (client.code, client.message) == (server.code, server.message) == (
        500, "internal error while decoding the image: RuntimeError: decoder bug")


def make_context(model_dir: Path) -> Context:
    manifest = {"model": {"modelName": "tiny", "serializedFile": "model.pt", "modelVersion": "1.0"}}
    return Context("tiny", str(model_dir), manifest, 8, None, "0.12.0", True,
                   MetricsStore(uuid.uuid4(), "tiny"), MODEL_YAML)


@pytest.fixture(scope="module")
def handler(tmp_path_factory):
    threads = torch.get_num_threads()
    context = make_context(make_tiny_run(tmp_path_factory.mktemp("run")))
    served = ClassifierHandler()
    served.initialize(context)
    yield served, context
    if served.decode_pool is not None:
        served.decode_pool.shutdown(wait=True)
    torch.set_num_threads(threads)  # initialize() sets the process-wide count


def test_handle_routes_describe_requests_to_describe_handle_in_their_position(handler):
    served, context = handler
    image = zoo_files()["one_pixel.png"][0]
    context.request_processor = [RequestProcessor({}), RequestProcessor({"describe": "True"}),
                                 RequestProcessor({})]
    bodies = served.handle([{"body": image}, {}, {"body": image}], context)
    json.dumps(bodies)
    assert [context.get_response_status(i)[0] for i in range(3)] == [200, 200, 200]
    assert bodies[0] == bodies[2] and bodies[0][0]["label"] == "class_1"
    description = bodies[1]
    assert description["preprocess"] == CFG.to_dict()
    assert description["pixel_payload"] == {"content_type": "application/x-npy", "dtype": "uint8",
                                            "shape": [8, 8, 3]}
    assert pixels.PixelSettings.from_metadata(json.dumps(description)) == SETTINGS


def test_handle_answers_a_pixel_payload_as_it_answers_the_file(handler):
    served, context = handler
    image = zoo_files()["exif_orientation_6.jpg"][0]
    payload, _ = pixels.ClientPreprocessor(SETTINGS)(image)
    context.request_processor = [RequestProcessor({}), RequestProcessor({})]
    bodies = served.handle([{"body": image}, {"body": payload}], context)
    assert bodies[0] == bodies[1]  # one batch, one kernel: the same numbers


def run_client_module(server, directory: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    """scripts/classify_dir.py against the session's server."""
    command = [str(PYTHON), str(REPO / "scripts" / "classify_dir.py"), str(directory),
               "--model", server.model,
               "--url", server.inference_url, "--management-url", server.management_url,
               "--token-file", str(server.key_file), "--output", str(output), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


class FakeServer:
    """A management API whose describe answers `body`."""

    def __init__(self, body):
        self.body, self.params = body, None

    def describe(self, model, version=None, **params):
        self.params = params
        return self.body


def choose(mode, server):
    return pixels.choose(mode, "m", pixels.fetch_settings(server, "m", None))


def test_auto_falls_back_to_server_mode_when_the_handler_exposes_nothing():
    stock = FakeServer([{"modelName": "m", "customizedMetadata": ""}])
    assert choose("auto", stock) == ("server", pixels.send_file)
    assert stock.params == {"customized": "true"}
    with pytest.raises(UserError, match="does not expose its preprocessing settings"):
        choose("client", stock)


def test_auto_uses_client_mode_when_the_handler_exposes_settings_and_sends_smaller_files_as_they_are(
        handler):
    served, _ = handler
    ours = FakeServer([{"customizedMetadata": json.dumps(served.describe_handle())}])
    mode, prepare = choose("auto", ours)
    assert mode == "client, files under 320 bytes as they are" and prepare.settings == SETTINGS
    small, large = zoo_files()["one_pixel.png"][0], zoo_files()["exif_orientation_6.jpg"][0]
    assert len(small) < 320 < len(large)  # 8x8x3 pixels and a 128-byte .npy header
    assert prepare(small) == (small, "application/octet-stream")
    assert prepare(large) == pixels.ClientPreprocessor(SETTINGS)(large)
    assert choose("client", ours)[1](small)[1] == "application/x-npy"


def test_zoo_gets_the_same_rows_in_client_and_server_mode(server, tmp_path):
    for name, (data, _) in zoo_files().items():
        (tmp_path / "zoo" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "zoo" / name).write_bytes(data)
    for name, data in bombs().items():
        (tmp_path / "zoo" / f"{name}.png").write_bytes(data)
    for name, data in npy_files().items():  # .npy bytes named .png: sent as they are in every mode
        (tmp_path / "zoo" / name).write_bytes(data)
    rows = {}
    for mode in ("server", "client", "auto"):
        output = tmp_path / f"{mode}.jsonl"
        result = run_client_module(server, tmp_path / "zoo", output, "--preprocess", mode,
                                   "--extensions", "jpg,png,gif,webp,txt,html,pdf")
        assert result.returncode == 1, result.stderr  # the zoo holds bad files
        resolved = "client, " if mode == "auto" else mode  # auto: client, small files as they are
        assert f"(preprocess {resolved}" in result.stdout
        rows[mode] = {r["path"]: r for r in map(json.loads, output.read_text().splitlines())}
    assert set(rows["server"]) == set(rows["client"]) and len(rows["server"]) == (
        len(zoo_files()) + len(bombs()) + len(npy_files()))
    assert rows["client"]["npy_as_photo.png"]["status"] == "ok"  # the tiny model's 8x8: classified
    assert rows["client"]["npy_of_other_size.png"]["http_status"] == 400
    for path, by_server in rows["server"].items():
        by_client = rows["client"][path]
        assert by_client["status"] == by_server["status"], path
        for key in ("error", "http_status"):  # refused here with the server's own words and code
            assert by_client[key] == by_server[key], (path, key)
        if by_server["status"] == "ok":
            assert [a["label"] for a in by_client["topk"]] == [a["label"] for a in by_server["topk"]]
            for a, b in zip(by_client["topk"], by_server["topk"], strict=True):
                assert abs(a["probability"] - b["probability"]) <= PROBABILITY_TOLERANCE, path
