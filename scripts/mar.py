"""Model archives for manage.py: the name and version a .mar declares, and its place in the model store."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

from scripts.management import Refused
from training.errors import UserError


def read_manifest(mar: Path) -> tuple[str, str]:
    """(model name, version) from the archive's MAR-INF/MANIFEST.json, not from its file name."""
    try:
        with zipfile.ZipFile(mar) as archive:
            model = json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]
        return str(model["modelName"]), str(model["modelVersion"])
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError, OSError) as e:
        raise Refused(f"{mar} is not a readable model archive (MAR-INF/MANIFEST.json with modelName "
                      f"and modelVersion): {type(e).__name__}: {e}") from None


def locate_mar(mar: str, store: Path) -> Path:
    """The archive as a path inside the model store: TorchServe registers only files of its store."""
    path = Path(mar).expanduser()
    if not path.is_file() and not path.is_absolute() and (store / mar).is_file():
        path = store / mar
    if not path.is_file():
        raise UserError(f"model archive not found: {mar} (nor in the model store {store})")
    if path.resolve().parent != store.resolve():
        raise UserError(f"{mar} is not in the model store {store}: copy it there, or pass the store "
                        f"the server serves with --model-store")
    return path
