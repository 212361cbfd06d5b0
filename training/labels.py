"""The label map for training: handler/labels.py's loader, its errors as the user's mistakes (exit 2)."""
from __future__ import annotations

from pathlib import Path

from core.errors import UserError
from handler.labels import LabelsError, save_labels
from handler.labels import load_labels as _load_labels

__all__ = ["load_labels", "save_labels"]


def load_labels(path: str | Path) -> list[str]:
    """Class names ordered by index (handler.labels.load_labels); UserError naming the file when bad."""
    try:
        return _load_labels(path)
    except LabelsError as e:
        raise UserError(str(e)) from None
