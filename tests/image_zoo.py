"""The bad-input zoo: deterministic image files (and non-images) with the HTTP status each must get.

Importable without a server; handler, decoding and integration tests share it.
Good images carry a dominant colour where they can, so a model that reacts to
channel means (tests/tiny_model.py) tells a correct decode from a wrong one.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
EXIF_ORIENTATION = 0x0112

# For good images with one dominant channel: the channel (= tiny model class) expected on top.
DOMINANT_CHANNEL = {
    "cmyk.jpg": 0,
    "animated.gif": 0,  # first frame red, second blue
    "image.webp": 1,
    "one_pixel.png": 1,
    "progressive.jpg": 2,
    "rgba.png": 1,
    "palette_transparent.gif": 2,
}


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    """Encode a PIL image to bytes in `fmt`."""
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def jpeg_bytes(color: tuple[int, int, int] = RED, size: tuple[int, int] = (32, 32), *, quality: int = 90,
               progressive: bool = False, orientation: int | None = None) -> bytes:
    """A solid-colour RGB JPEG of size (W, H), optionally progressive or with an EXIF orientation."""
    options: dict = {"quality": quality, "progressive": progressive}
    if orientation is not None:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        options["exif"] = exif.tobytes()
    return encode(Image.new("RGB", size, color), "JPEG", **options)


def png_bytes(color: tuple[int, int, int] = GREEN, size: tuple[int, int] = (32, 32)) -> bytes:
    """A solid-colour RGB PNG of size (W, H)."""
    return encode(Image.new("RGB", size, color), "PNG")


def noise_jpeg_bytes(size: tuple[int, int] = (64, 64), seed: int = 0) -> bytes:
    """A JPEG of random pixels: its entropy-coded data is long, so truncating it really cuts pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels, "RGB"), "JPEG", quality=95)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries no pixels: a decompression-bomb probe."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def png_header_of(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """A PNG header of any bit depth and colour type (0 grey, 2 RGB), no pixels: limit probes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def gradient_jpeg_bytes(size: tuple[int, int] = (256, 256), **options) -> bytes:
    """A smooth RGB gradient JPEG (photo-like: its scan data is short for its pixels)."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], -1)
    return encode(Image.fromarray(pixels.astype(np.uint8), "RGB"), "JPEG", **{"quality": 90, **options})


def cut_jpeg_with_end_marker(fraction: float = 0.3) -> bytes:
    """A 256x256 JPEG cut to `fraction` of its bytes, with an end-of-image marker (FF D9) appended."""
    data = gradient_jpeg_bytes()
    return data[: int(len(data) * fraction)] + b"\xff\xd9"


def jpeg_claiming_size(width: int, height: int) -> bytes:
    """A complete 16x16 JPEG whose frame header (SOF0) claims width x height."""
    data = gradient_jpeg_bytes((16, 16))
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9:]


def big_gray16_png_bytes(width: int = 7000, height: int = 7000) -> bytes:
    """A 16-bit greyscale PNG of one value: ~95 KB on disk for 7000x7000 (98 MB decoded)."""
    return encode(Image.fromarray(np.full((height, width), 40000, dtype=np.uint16)), "PNG")


def exif_rotated_jpeg_bytes() -> bytes:
    """Stored 32x16, left half red, right half blue, EXIF orientation 6: upright it is red on top."""
    img = Image.new("RGB", (32, 16), BLUE)
    img.paste(RED, (0, 0, 16, 16))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def animated_gif_bytes() -> bytes:
    """Two frames: red then blue."""
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def palette_transparent_gif_bytes() -> bytes:
    """A blue square on a transparent background (palette index 0 is transparent)."""
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (4, 4, 12, 12))
    return encode(img, "GIF", transparency=0)


def rgba_png_bytes() -> bytes:
    """Left half opaque green, right half fully transparent black (must become white)."""
    img = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    img.paste((0, 255, 0, 255), (0, 0, 8, 16))
    return encode(img, "PNG")


def gray16_png_bytes() -> bytes:
    """A 16-bit grayscale PNG at 3/4 of full scale (49151 of 65535 -> 191 of 255)."""
    return encode(Image.fromarray(np.full((16, 16), 49151, dtype=np.uint16)), "PNG")


def zoo_files() -> dict[str, tuple[bytes, int]]:
    """Every zoo entry: file name -> (content, expected HTTP status)."""
    jpeg = noise_jpeg_bytes()
    return {
        # refused: not an image, or too large
        "zero_bytes.jpg": (b"", 400),
        "truncated.jpg": (jpeg[: len(jpeg) * 6 // 10], 400),
        "text.txt": (b"hello, this is a text file and not an image\n", 400),
        "page.html": (b"<!DOCTYPE html><html><body><img src='cat.jpg'></body></html>\n", 400),
        "document.pdf": (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n"
                         b"trailer << /Root 1 0 R >>\n%%EOF\n", 400),
        "huge_40000x40000.png": (png_header_only(40000, 40000), 413),
        # accepted: every colour mode and container the issue names
        "cmyk.jpg": (encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95), 200),
        "gray16.png": (gray16_png_bytes(), 200),
        "grayscale.jpg": (encode(Image.new("L", (16, 16), 128), "JPEG"), 200),
        "bilevel.png": (encode(Image.new("1", (16, 16), 1), "PNG"), 200),
        "gray_alpha.png": (encode(Image.new("LA", (16, 16), (100, 255)), "PNG"), 200),
        "rgba.png": (rgba_png_bytes(), 200),
        "palette_transparent.gif": (palette_transparent_gif_bytes(), 200),
        "animated.gif": (animated_gif_bytes(), 200),
        "image.webp": (encode(Image.new("RGB", (16, 16), GREEN), "WEBP", lossless=True), 200),
        "exif_orientation_6.jpg": (exif_rotated_jpeg_bytes(), 200),
        "one_pixel.png": (png_bytes(GREEN, (1, 1)), 200),
        "progressive.jpg": (jpeg_bytes(BLUE, (64, 48), progressive=True), 200),
    }


def write_zoo(directory: str | Path) -> dict[str, int]:
    """Write the zoo into `directory`; return file name -> expected HTTP status."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    statuses = {}
    for name, (content, status) in zoo_files().items():
        (directory / name).write_bytes(content)
        statuses[name] = status
    return statuses
