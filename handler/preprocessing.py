"""The one implementation of image preprocessing, shared by training and serving.

`preprocess.json` (written by training) is its only source of settings; this file
is packaged into the .mar beside the handler, so the two paths cannot drift apart. The
client's `--preprocess client` runs the same decode and resize (load_pixels) before sending.
"""
from __future__ import annotations

import io
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Union

import numpy as np
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # torch loads where tensors are made: the client decodes with this module, without it
    import torch

DEFAULT_MAX_PIXELS = 50_000_000  # ~50 MP: above any camera photo, below a decompression bomb
# 64 MiB of decoded pixels: a 16 MP RGB PNG (Pillow keeps RGB in 4 bytes a pixel) or a 33 MP
# 16-bit greyscale one; camera JPEGs decode at a reduced DCT scale (draft) far below it.
DEFAULT_MAX_DECODED_BYTES = 64 * 2**20
# A side of the model's input, in pixels: every reader of preprocess.json refuses more (20000x20000
# made archive.sh's output check allocate 4.8 GB); 4096 is far above any classifier's input.
MAX_IMAGE_SIZE = 4096
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
COLOR_MODES = ("RGB", "grayscale")
EXIF_ORIENTATION = 0x0112
# libjpeg reads up to 8 bytes ahead of the bits it needs (64-bit bit buffer); zeros are what it
# would fill in itself. Measured on 150 random JPEGs: with 8 or more, pixels identical.
JPEG_PAD = b"\0" * 16
SEQUENTIAL_HUFFMAN_SOF = (0xC0, 0xC1)  # baseline and extended sequential
FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF0..SOF15, not DHT/JPG/DAC
ENTROPY_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # a marker: not stuffing, RSTn or fill
ROWS_CHUNK_PIXELS = 1 << 20  # 16-bit -> 8-bit conversion in blocks: float64 copies stay ~8 MB
ImageSource = Union[bytes, bytearray, str, os.PathLike, BinaryIO]


class BadImage(ValueError):
    """An input that is not a usable image; `code` is the HTTP status to answer with, `reason` one of
    REFUSALS (the bounded value the handler's metrics count it under; never the message's text)."""

    def __init__(self, code: int, message: str, reason: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or ("internal_error" if code >= 500 else "bad_request")
        if self.reason not in REFUSALS:
            raise ValueError(f"unknown refusal reason {self.reason!r}")


# Why an image was refused, as the metrics count it (docs/observability.md says what each means).
REFUSALS = ("bad_request", "empty", "not_an_image", "undecodable", "too_many_pixels", "too_many_bytes",
            "wrong_pixel_payload", "out_of_memory", "inference_failed", "internal_error")


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything needed to turn an image into the model's input tensor."""

    image_size: tuple[int, int] = (224, 224)  # [H, W] of the model's input
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    color_mode: str = "RGB"  # "grayscale" replicates the luminance into 3 channels

    def __post_init__(self):
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.image_size) != 2 or min(self.image_size) < 1 or max(self.image_size) > MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be two integers [H, W] from 1 to {MAX_IMAGE_SIZE}, "
                             f"got {list(self.image_size)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std must have 3 values each, std > 0")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.color_mode not in COLOR_MODES:
            raise ValueError(f"color_mode must be one of {COLOR_MODES}, got {self.color_mode!r}")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PreprocessConfig":
        """preprocess.json; ValueError naming the file when it is not valid JSON or not a valid config."""
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: neither names the file
                raise ValueError(f"{path}: not a JSON preprocessing config ({e})") from None
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        """The JSON form of preprocess.json (lists, not tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def configure_pillow(max_pixels: int) -> None:
    """Set Pillow's own bomb limit from the setting, once per process (not per decode thread).

    Pillow refuses images over 2x MAX_IMAGE_PIXELS (89.5 MP by default) and warns above it;
    open_image's check answers first with its own 413, so Pillow's warning is only noise.
    """
    Image.MAX_IMAGE_PIXELS = int(max_pixels)
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def bytes_per_pixel(mode: str) -> int:
    """Bytes Pillow allocates per pixel of `mode`: 4 for any multi-band mode, else the band's size."""
    descriptor = ImageMode.getmode(mode)
    return 4 if len(descriptor.bands) > 1 else max(1, int(descriptor.typestr[-1]))


def single_scan_end(data: bytes) -> int | None:
    """Where the entropy-coded data of a one-scan sequential JPEG ends; None for anything else.

    Walks the marker segments by their lengths (an EXIF thumbnail is skipped whole).
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, sequential, end = 2, False, None
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            break
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in FRAME_MARKERS:
            sequential = marker in SEQUENTIAL_HUFFMAN_SOF
        if marker != 0xDA:  # not SOS
            pos += 2 + length
            continue
        if end is not None:  # a second scan: the decoder buffers all scans, no early end to see
            return None
        found = ENTROPY_END.search(data, pos + 2 + length)
        if found is None:  # no marker after the data: the decoder already reports it truncated
            return None
        pos = end = found.start()
    return end if sequential else None


def without_end_marker(data: bytes) -> bytes:
    """A one-scan JPEG cut right after its entropy-coded data, so running short of it is an error.

    libjpeg answers scan data that ends early (a cut file with FF D9 appended, a header that
    claims more pixels than the data holds) with a warning and grey pixels, and Pillow drops the
    warning. Without a marker behind the data the decoder asks for more, and Pillow raises
    "image file is truncated". The pad covers libjpeg's read-ahead, so complete files decode to
    the same pixels. Progressive and multi-scan JPEGs keep their bytes: see docs/decoding.md.
    """
    end = single_scan_end(data)
    return data if end is None else data[:end] + JPEG_PAD


def open_image(source: ImageSource, *, size: tuple[int, int] | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS,
               max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> Image.Image:
    """Decode `source` to an upright RGB image; refuse what is not an image, corrupt or too large.

    `size` is the (H, W) the image will be resized to: a JPEG is then decoded at
    the smallest DCT scale that is still at least that large (`Image.draft`).
    """
    try:
        data = read_source(source)
        if not data:
            raise BadImage(400, "empty body: no image bytes", "empty")
        img = Image.open(io.BytesIO(without_end_marker(data)))
        width, height = img.size
        if width * height > max_pixels:
            raise BadImage(413, f"image has {width}x{height} = {width * height:,} pixels, "
                                f"over the limit of {max_pixels:,}", "too_many_pixels")
        if size is not None and img.format == "JPEG":
            target_h, target_w = size
            if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                target_h, target_w = target_w, target_h  # rotated after decoding
            img.draft("RGB", (target_w, target_h))
        check_decoded_bytes(img, max_decoded_bytes)
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(413, f"image too large to decode safely: {e}", "too_many_pixels") from None
    except UnidentifiedImageError:
        raise BadImage(400, "not a recognised image format", "not_an_image") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        if "truncated" in str(e):
            raise BadImage(400, f"cannot decode image: its data ends before its pixels do, "
                                f"the file is truncated or corrupt ({e})", "undecodable") from None
        raise BadImage(400, f"cannot decode image: {e}", "undecodable") from None


def read_source(source: ImageSource) -> bytes:
    """The bytes of a source: bytes as they are, a path's or a file object's content."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        return Path(source).read_bytes()
    return source.read()


def check_decoded_bytes(img: Image.Image, max_decoded_bytes: int) -> None:
    """413 when the pixels the decoder will allocate (at the draft scale) exceed the limit."""
    width, height = img.size
    per_pixel = bytes_per_pixel(img.mode)
    decoded = width * height * per_pixel
    if decoded > max_decoded_bytes:
        raise BadImage(413, f"image decodes to {decoded:,} bytes ({width}x{height} {img.mode}, "
                            f"{per_pixel} bytes a pixel), over the limit of {max_decoded_bytes:,}",
                       "too_many_bytes")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels become white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(to_uint8(np.asarray(img), img.mode), "L").convert("RGB")
    return img.convert("RGB")


def to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit integer or float pixels -> 8 bits, rounded, in row blocks to bound the copies.

    16-bit values map by round(v / 257); float images in [0, 1] are scaled by 255.
    """
    out = np.empty(arr.shape, np.uint8)
    if not arr.size:
        return out
    peak = arr.max()
    rows = max(1, ROWS_CHUNK_PIXELS // max(1, arr.shape[1]))
    for start in range(0, arr.shape[0], rows):
        if mode == "F":
            block = arr[start:start + rows].astype(np.float64)
            block *= 255.0 if peak <= 1.0 else 1.0
            block += 0.5
        else:
            block = arr[start:start + rows].astype(np.int64)
            if mode.startswith("I;16") or peak > 255:
                block += 128
                block //= 257  # floor(v / 257 + 0.5) for integers
        np.clip(block, 0, 255, out=block)
        out[start:start + rows] = block  # the cast truncates, as astype did
    return out


def resize(img: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """Resize to exactly cfg.image_size, applying the colour mode."""
    if cfg.color_mode == "grayscale":
        img = img.convert("L").convert("RGB")
    height, width = cfg.image_size
    if img.size != (width, height):
        img = img.resize((width, height), INTERPOLATIONS[cfg.interpolation])
    return img


def to_tensor(img: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """An RGB image of the model's size -> normalised float tensor 3 x H x W."""
    return pixels_to_tensor(np.array(img, dtype=np.uint8), cfg)


def pixels_to_tensor(pixels: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 H x W x 3 pixels of the model's size -> normalised float tensor 3 x H x W.

    The one normalisation: server-side decoding and the client's pixel payloads both end here.
    """
    import torch

    pixels = np.require(pixels, np.uint8, ["W"])  # a payload's read-only buffer is copied, an image's not
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return tensor.sub_(mean).div_(std)


def preprocess(img: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """A decoded RGB image -> the model's input tensor (3 x H x W)."""
    return to_tensor(resize(img, cfg), cfg)


def load_tensor(source: ImageSource, cfg: PreprocessConfig, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> torch.Tensor:
    """Decode and preprocess in one step: what both training's validation and serving do."""
    return preprocess(open_image(source, size=cfg.image_size, max_pixels=max_pixels,
                                 max_decoded_bytes=max_decoded_bytes), cfg)


def load_pixels(source: ImageSource, cfg: PreprocessConfig, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> np.ndarray:
    """Decode and resize, not normalise: uint8 H x W x 3, what load_tensor normalises (client mode)."""
    img = resize(open_image(source, size=cfg.image_size, max_pixels=max_pixels,
                            max_decoded_bytes=max_decoded_bytes), cfg)
    return np.array(img, dtype=np.uint8)


def internal_error(error: Exception) -> BadImage:
    """The 500 of a decoder failure that is no BadImage, worded alike on the server and the client."""
    return BadImage(500, f"internal error while decoding the image: {type(error).__name__}: {error}")
