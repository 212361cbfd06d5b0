"""classify_dir's --preprocess: which side decodes an image, and the client's side of it.

server: the file's bytes are sent; the handler decodes them (today's behaviour, and the only way
        with a handler that does not say how it preprocesses).
client: this process decodes, orients (EXIF), converts and resizes each file with
        handler/preprocessing.py, the code the handler itself runs, using the served model's own
        settings (preprocess.json and the decoding limits, read from TorchServe's describe with
        customized=true), and sends uint8 pixels as .npy (handler/pixel_payload.py): for a
        224x224 model about 150 KB a file, whatever the file's size. The handler normalises them.
auto:   client when the model exposes its settings, else server; and in client mode a file
        already smaller than its pixels would be (a 1.4 KB 32x32 PNG against 150 KB of 224x224
        pixels) is sent as it is, since the pixels would only add bytes to the request.

A file this process cannot decode gets the error the server would give (the same open_image
check, so the same message and HTTP code), without a request. A file that is already a pixel
payload (it starts with the .npy magic, whatever its name) is sent as it is in every mode: the
handler recognises it by that magic, so it gets the server mode's answer.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

from core.errors import UserError
from core.torchserve import TorchServe
from handler import pixel_payload, preprocessing

BadImage = preprocessing.BadImage  # what a prepare hook raises for a file it refuses
logger = logging.getLogger("classify_dir")
MODES = ("auto", "client", "server")
DEFAULT_MODE = "auto"
FILE_CONTENT_TYPE = "application/octet-stream"
Prepare = Callable[[bytes], tuple[bytes, str]]  # a file's bytes -> (request body, its content type)


def send_file(data: bytes) -> tuple[bytes, str]:
    """Server mode: the file as it is."""
    return data, FILE_CONTENT_TYPE


@dataclass(frozen=True)
class PixelSettings:
    """What the handler's describe_handle says a client needs to preprocess for it."""

    cfg: preprocessing.PreprocessConfig
    max_pixels: int
    max_decoded_bytes: int
    content_type: str

    @classmethod
    def from_metadata(cls, metadata: object) -> "PixelSettings":
        """Parse describe's customizedMetadata (a JSON text or object); ValueError when it is not ours."""
        if isinstance(metadata, (str, bytes)):
            metadata = json.loads(metadata)
        if not isinstance(metadata, dict) or not isinstance(metadata.get("pixel_payload"), dict):
            raise ValueError("no pixel_payload in the handler's description")
        payload = metadata["pixel_payload"]
        cfg = preprocessing.PreprocessConfig(**metadata["preprocess"])
        if (payload.get("content_type") != pixel_payload.CONTENT_TYPE or payload.get("dtype") != "uint8"
                or tuple(payload.get("shape") or ()) != pixel_payload.expected_shape(cfg.image_size)):
            raise ValueError(f"the handler wants a pixel payload this client does not write: {payload}")
        limits = {k: metadata[k] for k in ("max_pixels", "max_decoded_bytes")}
        if any(type(v) is not int or v < 1 for v in limits.values()):
            raise ValueError(f"limits must be integers >= 1, got {limits}")
        return cls(cfg, limits["max_pixels"], limits["max_decoded_bytes"], payload["content_type"])


def settings_of(entry: dict, model: str) -> PixelSettings | None:
    """A describe entry's settings (its customizedMetadata); None when its handler has none."""
    metadata = entry.get("customizedMetadata")
    if not metadata:
        return None
    try:
        return PixelSettings.from_metadata(metadata)
    except (ValueError, TypeError, KeyError) as e:  # another handler's description, or an older one's
        logger.debug("model %s describes no pixel settings: %s", model, e)
        return None


def fetch_settings(server: TorchServe, model: str, version: str | None) -> PixelSettings | None:
    """The served version's settings (describe with customized=true); None when its handler has none."""
    body = server.describe(model, version, customized="true")
    return settings_of(body[0], model) if body else None


NO_SETTINGS = "its handler does not expose its preprocessing settings (describe with customized=true)"


class ClientPreprocessor:
    """Client mode's prepare hook: a file's bytes -> (.npy of its resized pixels, content type).

    Files under `min_file_bytes` go as they are (auto: smaller than the pixel payload), and so do
    files that are already a pixel payload.
    """

    def __init__(self, settings: PixelSettings, min_file_bytes: int = 0):
        self.settings, self.min_file_bytes = settings, min_file_bytes
        # The handler sets Pillow's bomb limit from max_pixels; the same limit here words the same refusal.
        preprocessing.configure_pillow(settings.max_pixels)

    def __call__(self, data: bytes) -> tuple[bytes, str]:
        s = self.settings
        # A .npy file is the handler's pixel payload whatever its name: send it as server mode does,
        # so the handler checks its shape and answers as it would to that file.
        if len(data) < self.min_file_bytes or pixel_payload.is_pixel_payload(data):
            return send_file(data)
        try:
            pixels = preprocessing.load_pixels(data, s.cfg, s.max_pixels, s.max_decoded_bytes)
        except BadImage:
            raise
        except Exception as e:  # noqa: BLE001 - a decoder bug is this file's 500, as on the server
            raise preprocessing.internal_error(e) from None
        return pixel_payload.encode(pixels), s.content_type


def choose(mode: str, model: str, settings: PixelSettings | None, why: str = NO_SETTINGS) -> tuple[str, Prepare]:
    """Resolve --preprocess to the mode used and its prepare hook, from the served model's `settings`
    (None: `why` there are none); UserError when client mode cannot be."""
    if mode not in MODES:
        raise UserError(f"--preprocess must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "server":
        return "server", send_file
    if settings is None:
        if mode == "client":
            raise UserError(f"--preprocess client: model '{model}' cannot be preprocessed here: {why}; "
                            f"use --preprocess server")
        logger.info("--preprocess auto: sending files, %s", why)
        return "server", send_file
    if mode == "client":
        return "client", ClientPreprocessor(settings)
    payload_bytes = len(pixel_payload.encode(np.zeros(pixel_payload.expected_shape(settings.cfg.image_size),
                                                      np.uint8)))
    return (f"client, files under {payload_bytes:,} bytes as they are",
            ClientPreprocessor(settings, min_file_bytes=payload_bytes))
