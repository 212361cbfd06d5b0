"""Turn a class-folder tree into train.list, val.list and labels.json (stratified split).

ROOT/<class>/**/<image>: one folder per class, images at any depth below it.
"""
from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

from core.errors import UserError, command
from core.files import IMAGE_EXTENSIONS, iter_files
from training.labels import save_labels


def find_images(folder: Path) -> list[Path]:
    """The image files below `folder`, sorted (core.files' walk: folder links followed, each folder once);
    a broken link, FIFO or device with an image name is refused with its path, not trained on."""
    found = sorted(iter_files(folder, set(IMAGE_EXTENSIONS)))
    odd = next((p for p in found if not p.is_file()), None)
    if odd is not None:
        raise UserError(f"{odd}: not a regular file (a broken link, FIFO or device); remove it or fix the link")
    return found


def scan_classes(root: str | Path) -> dict[str, list[Path]]:
    """Map each class folder name under `root` to its images; refuse an empty tree or class."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a folder; expected one sub-folder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{root}: no class folders found; expected ROOT/<class>/<images>")
    if len(classes) < 2:  # training.train needs two classes; say so before writing lists it refuses
        raise UserError(f"{root}: one class folder ({classes[0]!r}); a classifier needs at least 2 classes, "
                        "one sub-folder each")
    tree = {name: find_images(root / name) for name in classes}
    for name, images in tree.items():
        if not images:
            raise UserError(f"{root / name}: class {name!r} has no images "
                            f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                            "add some or remove the folder")
        bad = next((p for p in images if "\t" in str(p) or "\n" in str(p)), None)
        if bad is not None:
            raise UserError(f"{bad}: a tab or newline in a path cannot be written to a list file; rename it")
    return tree


def split_stratified(tree: dict[str, list[Path]], val_fraction: float, seed: int):
    """Split each class separately so train and val keep the class proportions."""
    rng = random.Random(seed)
    train, val = [], []
    for name in sorted(tree):
        images = list(tree[name])
        rng.shuffle(images)
        n_val = round(len(images) * val_fraction)
        if val_fraction > 0 and len(images) >= 2:
            n_val = min(max(n_val, 1), len(images) - 1)  # every class in both splits
        val += [(p, name) for p in images[:n_val]]
        train += [(p, name) for p in images[n_val:]]
    return sorted(train), sorted(val)


def write_list(samples: list[tuple[Path, str]], path: Path) -> None:
    """Write `<path>\\t<label>` lines, paths relative to the list file's folder."""
    base = path.parent.resolve()
    lines = [f"{os.path.relpath(p.resolve(), base)}\t{label}\n" for p, label in samples]
    path.write_text("".join(lines), encoding="utf-8")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", help="class-folder tree: ROOT/<class>/**/<image>")
    parser.add_argument("--out", required=True, help="folder for train.list, val.list and labels.json")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of each class held out for validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (same seed, same lists)")
    return parser


def main(args: argparse.Namespace) -> None:
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction {args.val_fraction}: must be in [0, 1)")
    tree = scan_classes(args.root)
    train, val = split_stratified(tree, args.val_fraction, args.seed)
    if args.val_fraction > 0 and not val:  # training.train refuses an empty val.list
        raise UserError(f"{args.root}: every class has a single image, so none can be held out for "
                        "validation; add images (at least 2 in some class)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_list(train, out / "train.list")
    write_list(val, out / "val.list")
    save_labels(sorted(tree), out / "labels.json")
    print(f"{len(tree)} classes, {len(train)} train and {len(val)} val images -> {out}/"
          "{train.list,val.list,labels.json}")


cli = command(main, get_args_parser)
