"""Request rows -> image bytes -> tensors, and the per-image answer bodies; no server, no model."""
from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from ts.context import Context, RequestProcessor

from handler import request_decoding
from handler.preprocessing import BadImage, PreprocessConfig
from handler.request_decoding import (
    bytes_from_value,
    decode_base64,
    decode_batch,
    error_body,
    extract_image_bytes,
    format_responses,
    status_phrase,
)
from tests.image_zoo import RED, png_bytes

PNG = png_bytes(RED, (4, 4))
B64 = base64.b64encode(PNG).decode()
CFG = PreprocessConfig(image_size=(4, 4), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.mark.parametrize("row", [
    {"body": PNG}, {"data": PNG}, {"file": PNG}, {"body": bytearray(PNG)}, PNG,
    {"body": B64}, {"body": f"  {B64[:20]}\n{B64[20:]}  "}, {"body": f"data:image/png;base64,{B64}"},
    {"body": {"data": B64}}, {"body": {"image": B64}}, {"body": {"b64": B64}}, {"body": [B64]},
    {"body": [{"data": B64}]}, {"data": None, "body": PNG}, {"file": PNG, "label": b"cat"},
])
def test_every_supported_form_gives_the_image_bytes(row):
    assert extract_image_bytes(row) == PNG


@pytest.mark.parametrize("row, message", [
    ({"body": b""}, "empty body"),
    ({"data": bytearray()}, "empty body"),
    ({"body": ""}, "empty body"),
    ({"body": "   \n"}, "empty body"),
    ({"body": "hello, I am a text file\n"}, "body is text, not an image"),
    ({"body": "<html><body>hi</body></html>"}, "body is text, not an image"),
    ({"body": {"instances": [1, 2]}}, "JSON body has no base64 image"),
    ({"body": {"data": 42}}, "JSON body has no base64 image"),
    ({"body": 42}, "JSON int"),
    ({"body": [B64, B64]}, "JSON list"),
    ({"body": [[[B64]]]}, "JSON list"),
    ({"body": None}, "no image in the request"),
    ({"image": PNG, "label": b"x"}, "fields received: image, label"),
    ({}, "fields received: none"),
    (None, "unsupported request payload of type NoneType"),
    ({"data": PNG, "body": b"x"}, "one request is one image, but it carries 2 (data, body)"),
    ({"data": PNG, "file": PNG}, "one request is one image, but it carries 2 (data, file)"),
    ({"data": PNG, "__repeated_fields__": ["data"]}, "form field(s) data came more than once"),
])
def test_everything_else_is_a_400_with_a_clear_message(row, message):
    with pytest.raises(BadImage) as info:
        extract_image_bytes(row)
    assert info.value.code == 400 and message in info.value.message


def test_base64_of_nothing_is_an_empty_body():
    with pytest.raises(BadImage, match="empty body"):
        decode_base64("data:image/png;base64,")
    assert bytes_from_value(base64.b64encode(b"\x00\x01").decode()) == b"\x00\x01"


def test_decode_batch_isolates_failures_and_keeps_positions():
    rows = [{"body": PNG}, {"body": b""}, {"body": b"GIF89a broken"}, {"data": PNG}]
    items = decode_batch(rows, CFG, 10**6)
    assert [type(i).__name__ for i in items] == ["Tensor", "BadImage", "BadImage", "Tensor"]
    assert torch.equal(items[0], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 4, 4))
    assert items[1].code == 400 and items[2].code == 400


def test_decode_batch_in_a_thread_pool_gives_the_same_items_in_order():
    rows = [{"body": PNG}, {"body": b""}, {"body": png_bytes(RED, (10, 10))}, {"body": b"GIF89a broken"},
            {"data": PNG}]
    with ThreadPoolExecutor(2) as pool:
        threaded = decode_batch(rows, CFG, 99, pool)
    sequential = decode_batch(rows, CFG, 99)
    assert [type(i).__name__ for i in threaded] == ["Tensor", "BadImage", "BadImage", "BadImage", "Tensor"]
    for a, b in zip(threaded, sequential, strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert (a.code, a.message) == (b.code, b.message)


def test_decode_batch_applies_the_pixel_limit():
    items = decode_batch([{"body": png_bytes(RED, (10, 10))}, {"body": PNG}], CFG, max_pixels=99)
    assert isinstance(items[0], BadImage) and items[0].code == 413
    assert "over the limit of 99" in items[0].message
    assert isinstance(items[1], torch.Tensor)


def test_an_unexpected_decoder_error_is_that_images_500(monkeypatch, caplog):
    real = request_decoding.preprocessing.load_tensor

    def flaky(source, cfg, max_pixels, max_decoded_bytes):
        if source == PNG:
            raise KeyError("decoder bug")
        return real(source, cfg, max_pixels=max_pixels, max_decoded_bytes=max_decoded_bytes)

    monkeypatch.setattr(request_decoding.preprocessing, "load_tensor", flaky)
    items = decode_batch([{"body": PNG}, {"body": png_bytes(RED, (8, 8))}], CFG, 10**6)
    assert isinstance(items[0], BadImage) and items[0].code == 500 and "KeyError" in items[0].message
    assert isinstance(items[1], torch.Tensor)
    assert "unexpected error while decoding" in caplog.text


def test_status_phrase_is_one_short_ascii_line():
    assert status_phrase("cannot decode\n  image: bad\tdata") == "cannot decode image: bad data"
    assert status_phrase("caf\u00e9") == "caf?"
    long = status_phrase("x" * 1000)
    assert len(long) == request_decoding.MAX_PHRASE_CHARS and long.endswith("...")


def test_format_responses_sets_one_status_per_request():
    context = Context("m", "/tmp", {}, 3, None, "0.12.0")
    context.request_processor = [RequestProcessor({}) for _ in range(3)]
    prediction = [{"label": "a", "index": 0, "probability": 1.0}]
    bodies = format_responses([prediction, BadImage(413, "too\nlarge"), prediction], context, "2.0")
    assert bodies == [prediction, {"code": 413, "error": "too\nlarge"}, prediction]
    statuses = [context.get_response_status(i) for i in range(3)]
    assert statuses == [(200, "OK"), (413, "too large"), (200, "OK")]
    assert all(context.get_response_content_type(i) == "application/json" for i in range(3))
    assert all(context.get_response_headers(i)["X-Model-Version"] == "2.0" for i in range(3))
    assert error_body(BadImage(400, "x")) == {"code": 400, "error": "x"}


ZOO_PIXELS = {  # file -> (decoded size, {(x, y): RGB}) for the accepted zoo images
    "cmyk.jpg": ((16, 16), {(8, 8): (255, 0, 0)}),
    "gray16.png": ((16, 16), {(0, 0): (191, 191, 191)}),  # 49151 / 257
    "grayscale.jpg": ((16, 16), {(3, 3): (128, 128, 128)}),
    "bilevel.png": ((16, 16), {(0, 0): (255, 255, 255)}),
    "gray_alpha.png": ((16, 16), {(0, 0): (100, 100, 100)}),
    "rgba.png": ((16, 16), {(2, 2): (0, 255, 0), (12, 2): (255, 255, 255)}),  # transparent -> white
    "palette_transparent.gif": ((16, 16), {(0, 0): (255, 255, 255), (8, 8): (0, 0, 255)}),
    "animated.gif": ((16, 16), {(8, 8): (255, 0, 0)}),  # the first frame
    "image.webp": ((16, 16), {(8, 8): (0, 255, 0)}),
    "exif_orientation_6.jpg": ((16, 32), {(8, 2): (255, 0, 0), (8, 29): (0, 0, 255)}),  # upright
    "one_pixel.png": ((1, 1), {(0, 0): (0, 255, 0)}),
    "progressive.jpg": ((64, 48), {(30, 20): (0, 0, 255)}),
}


@pytest.mark.parametrize("name", sorted(ZOO_PIXELS))
def test_zoo_decodes_to_upright_rgb_pixels(name):
    from handler.preprocessing import open_image
    from tests.image_zoo import zoo_files

    img = open_image(zoo_files()[name][0])
    size, pixels = ZOO_PIXELS[name]
    assert img.mode == "RGB" and img.size == size
    for xy, rgb in pixels.items():
        assert all(abs(a - b) <= 3 for a, b in zip(img.getpixel(xy), rgb)), (xy, img.getpixel(xy))


@pytest.mark.parametrize("stored, orientation, target, decoded", [
    ((256, 256), None, (32, 32), (32, 32)),    # 1/8 scale
    ((256, 256), None, (33, 33), (64, 64)),    # 1/4: the smallest scale still >= the target
    ((256, 256), None, (300, 300), (256, 256)),
    ((256, 128), 6, (64, 32), (32, 64)),       # rotated after decoding: the target is swapped first
    ((256, 128), None, (64, 32), (128, 64)),   # H 128 / 64 limits the scale to 1/2
])
def test_jpeg_draft_decodes_at_the_smallest_sufficient_scale(stored, orientation, target, decoded):
    from handler.preprocessing import open_image
    from tests.image_zoo import jpeg_bytes

    data = jpeg_bytes(RED, stored, orientation=orientation)
    assert open_image(data, size=target).size == decoded
    full = open_image(data)
    assert full.size == (stored if orientation is None else stored[::-1])


def test_repeated_form_fields_are_recorded_before_the_worker_merges_them():
    from ts.service import Service

    # TorchServe's own merge, even where a handler initialised earlier in this process wrapped it
    merge = getattr(Service.retrieve_data_for_inference, "__wrapped__", Service.retrieve_data_for_inference)

    class Worker:  # a stand-in class with TorchServe's own merge
        retrieve_data_for_inference = staticmethod(merge)

    request_decoding.watch_repeated_fields(Worker)
    request_decoding.watch_repeated_fields(Worker)  # a second initialize wraps nothing more
    part = {"contentType": "image/png", "value": PNG}
    two = [{**part, "name": "data"}, {**part, "name": "data"}]
    batch = [{"requestId": b"1", "headers": [], "parameters": two},
             {"requestId": b"2", "headers": [], "parameters": [{**part, "name": "data"}]}]
    _, rows, _ = Worker.retrieve_data_for_inference(batch)
    assert rows[0] == {"data": PNG, "__repeated_fields__": ["data"]} and rows[1] == {"data": PNG}
    assert merge(batch)[1][0] == {"data": PNG}  # the merge loses it
    items = decode_batch(rows, CFG, 10**6)
    assert items[0].code == 400 and "came more than once" in items[0].message
    assert isinstance(items[1], torch.Tensor)
