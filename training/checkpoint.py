"""Checkpoint files: written atomically, read back with a one-line error when damaged."""
from __future__ import annotations

from pathlib import Path

import torch

from core.errors import UserError
from core.files import save_atomic
from handler.preprocessing import PreprocessConfig

# What training.train writes and what --resume and training.export need back.
REQUIRED_KEYS = ("model", "best_model", "optimizer", "scheduler", "epoch", "arch", "classes", "preprocess",
                 "history", "best_acc")


def save_checkpoint(state: dict, path: str | Path) -> None:
    """torch.save `state` to `path` atomically."""
    save_atomic(lambda f: torch.save(state, f), path)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """A checkpoint written by training.train; a missing, damaged or foreign file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        # weights_only: a checkpoint is tensors and plain data; unpickling anything else would run
        # whatever code a crafted file names, before any check of ours could refuse it
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated zip, a pickle error, an empty file: all mean the same to the user
        reason = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:120]  # the first sentence says it
        raise UserError(f"{path}: damaged or not a checkpoint ({e.__class__.__name__}: {reason}); "
                        "delete it and train again without --resume") from None
    missing = [k for k in REQUIRED_KEYS if k not in state] if isinstance(state, dict) else list(REQUIRED_KEYS)
    if missing:
        raise UserError(f"{path}: not a checkpoint written by training.train (missing {', '.join(missing)})")
    try:  # its preprocess.json to be, checked as every reader checks that file (image_size bounded)
        PreprocessConfig(**state["preprocess"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: preprocess: {e}") from None
    return state
