"""The label map `{"0": "name0", ...}`: one format and one loader from training to the .mar.

It lives in the handler package because the worker reads index_to_name.json inside TorchServe, where
only this package is there; training reads its labels.json with the same function.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path


class LabelsError(ValueError):
    """A label map that is missing or malformed; the message names the file."""


INDEX = re.compile(r"0|[1-9][0-9]*")  # the keys save_labels writes: "1", never " 1", "01" or "0_1"


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    data = dict(pairs)
    if len(data) < len(pairs):  # linear: 40,000 classes load at once (a count per key was quadratic)
        repeated = sorted(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise LabelsError(f"duplicate index {repeated[0]!r}")
    return data


def load_labels(path: str | Path) -> list[str]:
    """Read a labels JSON and return the class names ordered by index; validate it fully."""
    path = Path(path)
    try:  # utf-8-sig: accept the BOM some editors write
        data = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_no_duplicate_keys)
    except FileNotFoundError:
        raise LabelsError(f"{path}: labels file not found") from None
    except LabelsError as e:
        raise LabelsError(f"{path}: {e}; each index must appear once") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LabelsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not data:
        raise LabelsError(f'{path}: expected a non-empty object like {{"0": "cat", "1": "dog"}}')
    by_index: dict[int, str] = {}
    for key, name in data.items():
        if not INDEX.fullmatch(key):  # int() also takes " 1", "0_1" and "１"
            raise LabelsError(f"{path}: key {key!r} is not an integer index (0, 1, 2, ...)")
        index = int(key)  # one spelling per index: two keys cannot name one index
        if not isinstance(name, str) or not name.strip() or "\t" in name or "\n" in name:
            raise LabelsError(f"{path}: index {index}: label must be a non-empty string "
                            "without tabs or newlines")
        by_index[index] = name
    if sorted(by_index) != list(range(len(by_index))):
        missing = sorted(set(range(len(by_index))) - set(by_index))
        raise LabelsError(f"{path}: indices must be contiguous from 0; missing {missing[:5]}")
    names = [by_index[i] for i in range(len(by_index))]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise LabelsError(f"{path}: label {name!r} is used by two indices; names must be unique")
        seen.add(name)
    return names


def save_labels(names: list[str], path: str | Path) -> None:
    """Write class names as `{"0": name0, ...}`."""
    Path(path).write_text(json.dumps({str(i): n for i, n in enumerate(names)}, indent=2,
                                     ensure_ascii=False) + "\n", encoding="utf-8")
