"""Copy the images of a list file into OUT/<label>/ class folders (e.g. to classify a val set)."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from core.errors import UserError, command
from training.dataset import read_list
from training.labels import load_labels


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("list", help="list file: <image path>\\t<label> per line")
    parser.add_argument("--labels", required=True, help="labels JSON the list refers to")
    parser.add_argument("--out", required=True, help="folder to fill with one sub-folder per label")
    return parser


def folder_name(label: str, labels_path: str) -> str:
    """The label as one folder name; UserError for a label that would name another place."""
    if label in (".", "..") or "/" in label or "\\" in label or "\0" in label:
        raise UserError(f"{labels_path}: label {label!r} cannot be a folder name (it holds '/', '\\' "
                        f"or NUL, or is '.' or '..'); rename it in the labels file")
    return label


def unique_target(folder: Path, name: str, taken: set[Path]) -> Path:
    """folder/name, or folder/stem-2.ext, -3, ... when this run or an earlier one already wrote that name."""
    stem, suffix = Path(name).stem, Path(name).suffix
    target, n = folder / name, 1
    while target in taken or target.exists():
        n += 1
        target = folder / f"{stem}-{n}{suffix}"
    taken.add(target)
    return target


def main(args: argparse.Namespace) -> None:
    names = load_labels(args.labels)
    folders = [folder_name(n, args.labels) for n in names]
    samples = read_list(args.list, names)
    out = Path(args.out)
    taken: set[Path] = set()
    renamed = 0
    for path, index in samples:
        target = unique_target(out / folders[index], path.name, taken)
        renamed += target.name != path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "rb") as src, open(target, "xb") as dst:  # "x": never over another file
            shutil.copyfileobj(src, dst)
    note = f" ({renamed} renamed: a file of that name was already there)" if renamed else ""
    print(f"copied {len(samples)} images into {len({i for _, i in samples})} class folders under {out}{note}")


cli = command(main, get_args_parser)
