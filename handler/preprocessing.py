"""The one implementation of image preprocessing, shared by training and serving.

`preprocess.json` (written by training) is its only source of settings; this file
is packaged into the .mar beside the handler, so the two paths cannot drift apart.
"""
from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 50_000_000  # ~50 MP: above any camera photo, below a decompression bomb
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
ImageSource = Union[bytes, bytearray, str, os.PathLike, BinaryIO]


class BadImage(ValueError):
    """An input that is not a usable image; `code` is the HTTP status to answer with."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


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
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be two positive integers [H, W], got {list(self.image_size)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std must have 3 values each, std > 0")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.color_mode not in COLOR_MODES:
            raise ValueError(f"color_mode must be one of {COLOR_MODES}, got {self.color_mode!r}")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PreprocessConfig":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        """The JSON form of preprocess.json (lists, not tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def open_image(source: ImageSource, *, size: tuple[int, int] | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `source` to an upright RGB image; refuse what is not an image or too large.

    `size` is the (H, W) the image will be resized to: a JPEG is then decoded at
    the smallest DCT scale that is still at least that large (`Image.draft`).
    """
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise BadImage(400, "empty body: no image bytes")
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
        width, height = img.size
        if width * height > max_pixels:
            raise BadImage(413, f"image has {width}x{height} = {width * height:,} pixels, "
                                f"over the limit of {max_pixels:,}")
        if size is not None and img.format == "JPEG":
            target_h, target_w = size
            if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                target_h, target_w = target_w, target_h  # rotated after decoding
            img.draft("RGB", (target_w, target_h))
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(413, f"image too large to decode safely: {e}") from None
    except UnidentifiedImageError:
        raise BadImage(400, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise BadImage(400, f"cannot decode image: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels become white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.size and arr.max() > 255):
            arr = arr / 257.0  # 16-bit range onto 8 bits
        elif img.mode == "F" and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


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
    tensor = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return tensor.sub_(mean).div_(std)


def preprocess(img: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """A decoded RGB image -> the model's input tensor (3 x H x W)."""
    return to_tensor(resize(img, cfg), cfg)


def load_tensor(source: ImageSource, cfg: PreprocessConfig,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode and preprocess in one step: what both training's validation and serving do."""
    return preprocess(open_image(source, size=cfg.image_size, max_pixels=max_pixels), cfg)
