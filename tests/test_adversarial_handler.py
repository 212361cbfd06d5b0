"""Probes of the outside review: corrupt JPEGs, decoded-byte bombs, Pillow's limit, one image a request.

The first half runs the decoding functions in-process; the second half sends the same probes to a real
TorchServe (the session's `server` fixture), where the defects were seen.
"""
from __future__ import annotations

import io
import threading
import time
import tracemalloc
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from core.http import new_session
from core.keys import request_with_key
from handler import preprocessing
from handler.preprocessing import DEFAULT_MAX_DECODED_BYTES, BadImage, open_image, to_uint8
from tests.image_zoo import (
    GREEN,
    RED,
    big_gray16_png_bytes,
    cut_jpeg_with_end_marker,
    encode,
    gradient_jpeg_bytes,
    jpeg_bytes,
    jpeg_claiming_size,
    png_bytes,
    png_header_of,
)


@pytest.fixture(scope="module")
def gray16_7000() -> bytes:
    return big_gray16_png_bytes(7000, 7000)  # ~2 s to encode: once per module


def refusal(data: bytes, **options) -> BadImage:
    with pytest.raises(BadImage) as info:
        open_image(data, **options)
    return info.value


# ---- 2: corrupt JPEGs ----

@pytest.mark.parametrize("size", [None, (32, 32)])  # full decode and draft decode
def test_jpeg_cut_short_with_an_end_marker_is_a_400_naming_truncation(size):
    error = refusal(cut_jpeg_with_end_marker(0.3), size=size)
    assert error.code == 400 and "truncated or corrupt" in error.message


@pytest.mark.parametrize("size", [None, (32, 32)])
def test_jpeg_header_claiming_7000x7000_over_16x16_of_data_is_a_400(size):
    error = refusal(jpeg_claiming_size(7000, 7000), size=size, max_decoded_bytes=2**30)
    assert error.code == 400 and "truncated or corrupt" in error.message


def exif_with_thumbnail() -> bytes:
    """A JPEG whose EXIF block holds a whole JPEG thumbnail (its own SOS and EOI)."""
    exif = Image.Exif()
    exif[0x0112] = 1
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    thumb = encode(img.resize((8, 8)), "JPEG")
    app1 = b"Exif\0\0" + exif.tobytes() + thumb  # a thumbnail-shaped payload inside APP1
    data = encode(img, "JPEG", quality=80)
    segment = b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1
    return data[:2] + segment + data[2:]


GOOD_JPEGS = {
    "baseline": lambda: gradient_jpeg_bytes((200, 120)),
    "noise 4:4:4 optimised": lambda: encode(Image.fromarray(np.random.default_rng(0).integers(
        0, 256, (97, 131, 3), dtype=np.uint8)), "JPEG", quality=95, subsampling=0, optimize=True),
    "restart markers": lambda: gradient_jpeg_bytes((160, 90), restart_marker_blocks=2),
    "grayscale": lambda: encode(Image.new("L", (33, 17), 77), "JPEG"),
    "cmyk": lambda: encode(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG"),
    "progressive": lambda: jpeg_bytes(RED, (64, 48), progressive=True),
    "trailing bytes after EOI": lambda: gradient_jpeg_bytes((64, 64)) + b"\0junk\xff\xd8" * 5,
    "exif thumbnail": exif_with_thumbnail,
    "one pixel": lambda: jpeg_bytes(GREEN, (1, 1)),
}


@pytest.mark.parametrize("name", sorted(GOOD_JPEGS))
@pytest.mark.parametrize("size", [None, (16, 16)])
def test_complete_jpegs_decode_to_exactly_pillows_pixels(name, size):
    data = GOOD_JPEGS[name]()
    direct = Image.open(io.BytesIO(data))
    if size is not None:
        direct.draft("RGB", size)
    expected = np.asarray(preprocessing.to_rgb(direct.convert("RGB") if direct.mode == "CMYK" else direct))
    assert np.array_equal(np.asarray(open_image(data, size=size)), expected)  # integers, one decoder


# ---- 5: decoded bytes, not only pixels ----

def test_sixteen_bit_7000x7000_png_is_a_413_naming_size_and_limit():
    error = refusal(png_header_of(7000, 7000, bit_depth=16, colour_type=0))  # 49 MP: under max_pixels
    assert error.code == 413
    assert "98,000,000 bytes (7000x7000 I;16, 2 bytes a pixel)" in error.message
    assert f"over the limit of {DEFAULT_MAX_DECODED_BYTES:,}" in error.message


def test_decoded_bytes_of_a_jpeg_count_at_its_draft_scale():
    data = jpeg_bytes(RED, (256, 256))
    assert open_image(data, size=(32, 32), max_decoded_bytes=32 * 32 * 4).size == (32, 32)
    assert refusal(data, max_decoded_bytes=32 * 32 * 4).code == 413  # full scale: 256 KB


def test_sixteen_bit_conversion_holds_no_float64_copy_of_the_image():
    img = Image.fromarray(np.full((3000, 3000), 40000, dtype=np.uint16))
    tracemalloc.start()
    rgb = preprocessing.to_rgb(img)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert rgb.getpixel((7, 7)) == (156, 156, 156)  # round(40000 / 257)
    # numpy's share (Pillow's own buffers are not traced): the float64 path peaked at 24 bytes a
    # pixel (216 MB here); now the 16-bit copies and the 8-bit result plus int64 blocks of
    # ROWS_CHUNK_PIXELS, whatever the image size (measured 44 MB).
    assert peak < img.width * img.height * 6 + 4 * preprocessing.ROWS_CHUNK_PIXELS * 8


@pytest.mark.parametrize("mode, values", [
    ("I;16", np.arange(0, 65536, 7, dtype=np.uint16)),
    ("I", np.array([-300, -1, 0, 1, 128, 255, 256, 65535, 70000, 2**31 - 1], dtype=np.int32)),
    ("I", np.array([0, 1, 100, 254, 255], dtype=np.int32)),  # 8-bit range: kept as is
    ("F", np.array([-0.5, 0.0, 0.0019, 0.002, 0.5, 1.0], dtype=np.float32)),  # [0, 1]: x 255
    ("F", np.array([-3.0, 0.4, 0.5, 127.49, 254.5, 300.0], dtype=np.float32)),
])
def test_to_uint8_gives_the_float64_formulas_results(mode, values):
    arr = values.reshape(1, -1)
    old = arr.astype(np.float64)  # the former implementation, verbatim
    if mode.startswith("I;16") or (mode == "I" and old.max() > 255):
        old = old / 257.0
    elif mode == "F" and old.max() <= 1.0:
        old = old * 255.0
    assert np.array_equal(to_uint8(arr, mode), np.clip(old + 0.5, 0, 255).astype(np.uint8))


# ---- 6: Pillow's limit and thread-safety ----

def test_open_image_leaves_the_process_warning_filters_alone(monkeypatch):
    filters, seen = warnings.filters, []
    real_open = Image.open
    monkeypatch.setattr(Image, "open",
                        lambda *a, **k: seen.append(warnings.filters is filters) or real_open(*a, **k))
    with ThreadPoolExecutor(2) as pool:  # decode threads must not swap the process-wide filter list
        list(pool.map(lambda _: open_image(png_bytes(RED)), range(4)))
    assert seen == [True] * 4


@pytest.fixture
def pillow_limit():
    limit = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = limit


def test_max_pixels_above_pillows_default_is_honoured(pillow_limit):
    preprocessing.configure_pillow(200_000_000)
    assert Image.MAX_IMAGE_PIXELS == 200_000_000
    header = png_header_of(10_000, 10_000)  # 100 MP: over Pillow's 89.5 MP default
    error = refusal(header, max_pixels=200_000_000, max_decoded_bytes=2**31)
    assert error.code == 400 and "cannot decode image" in error.message  # opened; no pixels follow
    assert refusal(header, max_pixels=99_999_999).code == 413  # the setting still applies


# ---- through a real TorchServe ----

def post(server, **kwargs) -> requests.Response:
    return request_with_key(new_session(), "POST",
                                     f"{server.inference_url}/predictions/{server.model}", server.keys(),
                                     "inference", timeout=60, **kwargs)


def raw(server, data: bytes) -> requests.Response:
    return post(server, data=data, headers={"Content-Type": "application/octet-stream"})


@pytest.mark.integration
@pytest.mark.parametrize("probe", ["cut", "claims 7000x7000"])
def test_served_corrupt_jpeg_is_a_400_with_the_reason(server, probe):
    data = cut_jpeg_with_end_marker(0.3) if probe == "cut" else jpeg_claiming_size(7000, 7000)
    response = raw(server, data)
    assert response.status_code == 400 and "truncated or corrupt" in response.json()["error"]


@pytest.mark.integration
def test_served_16_bit_7000x7000_png_is_a_413_naming_size_and_limit(server, gray16_7000):
    response = raw(server, gray16_7000)
    assert response.status_code == 413
    error = response.json()["error"]
    assert "98,000,000 bytes" in error and "over the limit of 67,108,864" in error


@pytest.mark.integration
@pytest.mark.parametrize("parts", [
    [("data", ("a.png", png_bytes(GREEN), "image/png")),
     ("data", ("b.gif", encode(Image.new("RGB", (8, 8), RED), "GIF"), "image/gif"))],
    [("file", ("bomb.png", png_header_of(40000, 40000), "image/png")),
     ("data", ("d.png", png_bytes(RED), "image/png"))],
], ids=["two data parts", "file and data"])
def test_served_multipart_with_two_images_is_a_400_naming_the_ambiguity(server, parts):
    response = post(server, files=parts)
    assert response.status_code == 400 and "one request is one image" in response.json()["error"]


@pytest.mark.integration
def test_served_multipart_with_one_image_is_answered(server):
    response = post(server, files=[("data", ("a.png", png_bytes(GREEN), "image/png"))])
    assert response.status_code == 200 and response.json()[0]["label"] == "green"


def worker_rss_mb(server) -> float:
    pid = server.workers()[0]["pid"]
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for worker {pid}")


@pytest.mark.integration
def test_worker_memory_stays_bounded_under_a_burst_of_16_bit_pngs(server, gray16_7000):
    """30 concurrent 7000x7000 16-bit PNGs: each a 413, the worker's RSS grows little (docs/decoding.md)."""
    before = worker_rss_mb(server)
    normal: dict = {}

    def normal_request() -> None:
        time.sleep(0.2)  # while the burst is queued
        started = time.perf_counter()
        normal["status"] = raw(server, png_bytes(RED)).status_code
        normal["seconds"] = time.perf_counter() - started

    side = threading.Thread(target=normal_request)
    side.start()
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: raw(server, gray16_7000).status_code, range(30)))
    side.join(timeout=120)
    after = worker_rss_mb(server)
    print(f"\nworker RSS before {before:.0f} MB, after 30 requests {after:.0f} MB; "
          f"a normal request during the burst: {normal.get('seconds', float('nan')):.2f} s")
    assert statuses == [413] * 30 and normal.get("status") == 200
    assert after - before < 200  # was +1.2 GB kept after 16 such requests: bounded by far
