"""The pixel payload: an image already decoded and resized by the client, as a .npy of uint8 H x W x 3.

The .npy format describes itself (magic, version, a header naming dtype, order and shape) and
holds no code: it is parsed here field by field, never with pickle, and the header is checked
against the model's preprocess.json before any pixel is read, so a wrong or hostile payload
costs a few bytes of parsing and answers 400 naming what came and what was wanted.
"""
from __future__ import annotations

import io
import tokenize

import numpy as np

from handler.preprocessing import BadImage

CONTENT_TYPE = "application/x-npy"
MAGIC = b"\x93NUMPY"
MAX_HEADER_BYTES = 1024  # numpy writes 64- or 128-byte headers; anything longer is not ours
DTYPE = np.dtype(np.uint8)


def is_pixel_payload(data: bytes) -> bool:
    """True for a body that claims to be a .npy array (no image format starts with this magic)."""
    return data[:len(MAGIC)] == MAGIC


def expected_shape(image_size: tuple[int, int]) -> tuple[int, int, int]:
    """The payload's shape for a model input of image_size (H, W): H x W x RGB."""
    return int(image_size[0]), int(image_size[1]), 3


def encode(pixels: np.ndarray) -> bytes:
    """uint8 H x W x 3 pixels -> .npy bytes (C order, no pickle)."""
    if pixels.dtype != DTYPE or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be uint8 H x W x 3, got {pixels.dtype} {pixels.shape}")
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(pixels), allow_pickle=False)
    return buffer.getvalue()


def decode(data: bytes, image_size: tuple[int, int]) -> np.ndarray:
    """.npy bytes -> uint8 H x W x 3 pixels of exactly image_size; BadImage(400) otherwise."""
    want = expected_shape(image_size)
    stream = io.BytesIO(data)
    try:
        major, _minor = np.lib.format.read_magic(stream)
        if major == 1:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream, MAX_HEADER_BYTES)
        elif major in (2, 3):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream, MAX_HEADER_BYTES)
        else:
            raise ValueError(f"unsupported .npy version {major}")
    # numpy's header reader tokenizes the header: an unclosed bracket, or a length field shorter than
    # the header, raises tokenize.TokenError, which is the client's bad payload like the others
    except (ValueError, SyntaxError, TypeError, EOFError, tokenize.TokenError) as e:
        raise BadImage(400, f"pixel payload ({CONTENT_TYPE}) has an unreadable header: "
                            f"{' '.join(str(e).split())[:200]}", "wrong_pixel_payload") from None
    if dtype != DTYPE or tuple(shape) != want or fortran:
        order = " (Fortran order)" if fortran else ""
        raise BadImage(400, f"pixel payload has shape {tuple(shape)} and dtype {dtype}{order}, but this "
                            f"model's preprocess.json wants shape {want} and dtype uint8 in C order: "
                            "preprocess with the served model's settings", "wrong_pixel_payload")
    start, size = stream.tell(), want[0] * want[1] * want[2]
    if len(data) - start != size:
        raise BadImage(400, f"pixel payload carries {len(data) - start} bytes of pixels, "
                            f"its header's shape {want} needs {size}", "wrong_pixel_payload")
    return np.frombuffer(data, DTYPE, size, start).reshape(want)
