"""A Dataset over a list file (`<image path>\\t<label name>`) and a labels JSON."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

from core.errors import UserError
from handler.preprocessing import BadImage, PreprocessConfig, open_image, preprocess
from training.labels import load_labels


def read_list(list_path: str | Path, class_names: list[str]) -> list[tuple[Path, int]]:
    """Parse and validate a whole list file; every error names `file:line` and the fix."""
    list_path = Path(list_path)
    try:
        text = list_path.read_text(encoding="utf-8-sig")  # -sig: a leading BOM is no part of a path
    except FileNotFoundError:
        raise UserError(f"{list_path}: list file not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{list_path}: not UTF-8 text ({e})") from None
    index_of = {name: i for i, name in enumerate(class_names)}
    samples: list[tuple[Path, int]] = []
    first_line: dict[Path, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{list_path}:{number}"
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise UserError(f"{where}: malformed line {line[:80]!r}; expected '<image path><TAB><label>'")
        path_text, label = fields[0].strip(), fields[1].strip()
        if "\0" in path_text:  # no file name holds one; os calls raise ValueError on it
            raise UserError(f"{where}: the image path {path_text[:80]!r} holds a NUL byte")
        if label not in index_of:
            raise UserError(f"{where}: label {label!r} is not in the labels file; "
                            f"known: {', '.join(class_names[:10])}{', ...' if len(class_names) > 10 else ''}")
        path = Path(path_text)
        if not path.is_absolute():
            path = list_path.parent / path
        try:
            path = Path(*path.parts).resolve()
            found = path.is_file()
        except (OSError, RuntimeError) as e:  # a name too long, a symlink loop (RuntimeError before 3.13)
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)[:120]
            raise UserError(f"{where}: unusable image path {path_text[:80]!r} ({reason})") from None
        if path in first_line:
            raise UserError(f"{where}: duplicate entry {path_text!r}, "
                            f"first listed at line {first_line[path]}")
        if not found:
            raise UserError(f"{where}: image not found: {path}")
        try:
            with Image.open(path) as img:
                img.verify()
        except Exception as e:  # PIL raises many types for a file that is not an image
            raise UserError(f"{where}: cannot decode image {path} ({e.__class__.__name__}: {e})") from None
        first_line[path] = number
        samples.append((path, index_of[label]))
    if not samples:
        raise UserError(f"{list_path}: no samples; expected lines of '<image path><TAB><label>'")
    return samples


class ImageListDataset(Dataset):
    """(tensor, class index) pairs from a list file; images decoded by the shared preprocessing."""

    def __init__(self, list_path: str | Path, labels_path: str | Path, cfg: PreprocessConfig,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None):
        self.classes = load_labels(labels_path)
        self.samples = read_list(list_path, self.classes)
        self.cfg = cfg
        # a partial, not a lambda: DataLoader workers started by spawn or forkserver (macOS; Linux's
        # default from Python 3.14) receive the dataset pickled, and a lambda does not pickle
        self.transform = transform or functools.partial(preprocess, cfg=cfg)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        try:
            img = open_image(path, size=self.cfg.image_size)
        except BadImage as e:
            raise UserError(f"{path}: {e.message}") from None
        return self.transform(img), target
