"""From a TorchServe request row to image tensors, and the JSON bodies of the answers.

A row is what TorchServe hands the handler for one request: a dict whose "data",
"file" or "body" value is bytes (raw POST, multipart), a str (text/* bodies are
decoded by TorchServe) or a dict/list (application/json bodies are parsed).
"""
from __future__ import annotations

import base64
import binascii
import logging
from concurrent.futures import Executor
from typing import Any

import torch

from handler import pixel_payload, preprocessing

BadImage = preprocessing.BadImage
logger = logging.getLogger(__name__)

ROW_FIELDS = ("data", "file", "body")  # multipart field names first, then the raw body
JSON_FIELDS = ("data", "image", "b64", "file", "body")  # where a JSON body may carry base64
MAX_PHRASE_CHARS = 200  # an HTTP reason phrase is one short line
REPEATED_FIELDS_KEY = "__repeated_fields__"  # set on a row by record_repeated_fields


def record_repeated_fields(batch: list, rows: list) -> None:
    """Mark each row whose request named a form field more than once (before the merge lost it).

    TorchServe's worker (ts/service.py, retrieve_data_for_inference) folds a request's
    parameters into one dict, so of two `data` parts only the last reaches the handler.
    """
    for request, row in zip(batch, rows):
        names = [p.get("name") for p in (request or {}).get("parameters") or []]
        repeated = sorted({str(n) for n in names if names.count(n) > 1})
        if repeated and isinstance(row, dict):
            row[REPEATED_FIELDS_KEY] = repeated


def watch_repeated_fields(service_class: Any) -> None:
    """Wrap the worker's request merge so that rows carry their repeated field names (idempotent)."""
    merge = getattr(service_class, "retrieve_data_for_inference", None)
    if merge is None or getattr(merge, "records_repeated_fields", False):
        return

    def retrieve_data_for_inference(batch):
        headers, rows, ids = merge(batch)
        record_repeated_fields(batch or [], rows)
        return headers, rows, ids

    retrieve_data_for_inference.records_repeated_fields = True
    retrieve_data_for_inference.__wrapped__ = merge  # TorchServe's own, for whoever needs it unwrapped
    service_class.retrieve_data_for_inference = staticmethod(retrieve_data_for_inference)


def extract_image_bytes(row: Any) -> bytes:
    """Return the image bytes of one request row; BadImage(400) when there are none or several."""
    if isinstance(row, (bytes, bytearray)):
        return _require_bytes(bytes(row))
    if not isinstance(row, dict):
        raise BadImage(400, f"unsupported request payload of type {type(row).__name__}")
    repeated = row.get(REPEATED_FIELDS_KEY)
    if repeated:
        raise BadImage(400, f"one request is one image, but form field(s) {', '.join(repeated)} came "
                            "more than once: send each image in its own request")
    present = [field for field in ROW_FIELDS if row.get(field) is not None]
    if len(present) > 1:
        raise BadImage(400, f"one request is one image, but it carries {len(present)} "
                            f"({', '.join(present)}): send each image in its own request")
    if present:
        return bytes_from_value(row[present[0]])
    fields = ", ".join(sorted(str(k) for k in row)) or "none"
    raise BadImage(400, f"no image in the request: send the file as the body or as form field "
                        f"'data' or 'file' (fields received: {fields})")


def bytes_from_value(value: Any, depth: int = 0) -> bytes:
    """Turn a body or form value (bytes, base64 str, parsed JSON) into image bytes."""
    if isinstance(value, (bytes, bytearray)):
        return _require_bytes(bytes(value))
    if isinstance(value, str):
        return decode_base64(value)
    if depth < 2 and isinstance(value, dict):  # a JSON object such as {"data": "<base64>"}
        for field in JSON_FIELDS:
            if isinstance(value.get(field), str):
                return decode_base64(value[field])
        raise BadImage(400, f"JSON body has no base64 image in any of the fields {list(JSON_FIELDS)}")
    if depth < 2 and isinstance(value, list) and len(value) == 1:  # ["<base64>"]
        return bytes_from_value(value[0], depth + 1)
    raise BadImage(400, f"unsupported request body: JSON {type(value).__name__}, "
                        "expected the image bytes or a base64 string")


def decode_base64(text: str) -> bytes:
    """Decode a base64 image string, also as a data URL; a plain text body is a 400."""
    text = text.strip()
    if not text:
        raise BadImage(400, "empty body: no image bytes", "empty")
    if text.startswith("data:") and "," in text:  # data:image/png;base64,....
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadImage(400, "body is text, not an image (send the file's bytes, "
                            "or base64 in a JSON body)", "not_an_image") from None
    return _require_bytes(data)


def _require_bytes(data: bytes) -> bytes:
    if not data:
        raise BadImage(400, "empty body: no image bytes", "empty")
    return data


def load_row_tensor(row: Any, cfg: preprocessing.PreprocessConfig, max_pixels: int,
                    max_decoded_bytes: int = preprocessing.DEFAULT_MAX_DECODED_BYTES) -> torch.Tensor:
    """One request row (an image file, or the client's resized pixels) -> 3 x H x W; raises BadImage."""
    data = extract_image_bytes(row)
    if pixel_payload.is_pixel_payload(data):  # recognised by its magic, whatever the transport
        return preprocessing.pixels_to_tensor(pixel_payload.decode(data, cfg.image_size), cfg)
    return preprocessing.load_tensor(data, cfg, max_pixels=max_pixels, max_decoded_bytes=max_decoded_bytes)


def decode_row(idx: int, row: Any, cfg: preprocessing.PreprocessConfig, max_pixels: int,
               max_decoded_bytes: int = preprocessing.DEFAULT_MAX_DECODED_BYTES) -> torch.Tensor | BadImage:
    """One row -> its tensor, or the BadImage that refused it (an unexpected error becomes a 500)."""
    try:
        return load_row_tensor(row, cfg, max_pixels, max_decoded_bytes)
    except BadImage as e:
        logger.info("request %d of the batch refused (%d): %s", idx, e.code, e.message)
        return e
    except Exception as e:  # noqa: BLE001 - a decoder bug must not fail the other images
        logger.exception("request %d of the batch: unexpected error while decoding", idx)
        return preprocessing.internal_error(e)


def decode_batch(rows: list, cfg: preprocessing.PreprocessConfig, max_pixels: int,
                 pool: Executor | None = None,
                 max_decoded_bytes: int = preprocessing.DEFAULT_MAX_DECODED_BYTES) -> list:
    """Decode every row on its own: a failure becomes that row's BadImage, never the batch's.

    With a thread pool the rows decode in parallel: Pillow releases the GIL while it decodes
    and resizes, so a worker with two cores decodes two camera photos at once.
    """
    def decode(args: tuple[int, Any]) -> torch.Tensor | BadImage:
        return decode_row(*args, cfg, max_pixels, max_decoded_bytes)

    if pool is None or len(rows) < 2:
        return [decode(args) for args in enumerate(rows)]
    return list(pool.map(decode, enumerate(rows)))


def error_body(error: BadImage) -> dict:
    """The JSON body of a refused image: {"code": N, "error": "..."}."""
    return {"code": error.code, "error": error.message}


def status_phrase(message: str) -> str:
    """An HTTP reason phrase: one printable ASCII line of bounded length."""
    line = " ".join(str(message).split())
    line = line.encode("ascii", "replace").decode("ascii")
    return line if len(line) <= MAX_PHRASE_CHARS else line[: MAX_PHRASE_CHARS - 3] + "..."


MODEL_VERSION_HEADER = "X-Model-Version"


def format_responses(answers: list, context, model_version: str | None = None) -> list:
    """Set each request's status (and the answering model version) and return the JSON-able bodies."""
    bodies = []
    for idx, answer in enumerate(answers):
        if isinstance(answer, BadImage):
            context.set_response_status(answer.code, status_phrase(answer.message), idx)
            bodies.append(error_body(answer))
        else:
            context.set_response_status(200, "OK", idx)
            bodies.append(answer)
        if getattr(context, "request_processor", None) is not None:
            context.set_response_content_type(idx, "application/json")
            if model_version:  # the client reports it per row, truthful across a live rollout
                context.set_response_header(idx, MODEL_VERSION_HEADER, model_version)
    return bodies
