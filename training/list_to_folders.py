"""Copy the images of a list file into OUT/<label>/ class folders (e.g. to classify a val set)."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from client.errors import run_main
from training.dataset import read_list
from training.labels import load_labels


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("list", help="list file: <image path>\\t<label> per line")
    parser.add_argument("--labels", required=True, help="labels JSON the list refers to")
    parser.add_argument("--out", required=True, help="folder to fill with one sub-folder per label")
    return parser


def main(args: argparse.Namespace) -> None:
    names = load_labels(args.labels)
    samples = read_list(args.list, names)
    out = Path(args.out)
    for path, index in samples:
        target = out / names[index] / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    print(f"copied {len(samples)} images into {len({i for _, i in samples})} class folders under {out}")


def cli() -> None:
    """The `list_to_folders` command (scripts/list_to_folders.py)."""
    run_main(main, get_args_parser().parse_args())


if __name__ == "__main__":
    cli()
