"""Write scikit-learn's bundled handwritten digits as PNGs, one folder per class.

The 1,797 8x8 images ship inside scikit-learn's wheel: real data, no download.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from core.errors import UserError, command


def write_digits(out: str | Path, size: int = 32, limit: int | None = None) -> int:
    """Write up to `limit` digits as `out/<digit>/digit_NNNN.png`, upscaled to size x size."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = Path(out)
    count = len(digits.images) if limit is None else min(limit, len(digits.images))
    for i in tqdm(range(count), desc="digits", unit="img", disable=None):
        pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 -> 0..255
        img = Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.BICUBIC)
        folder = out / str(int(digits.target[i]))
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"digit_{i:04d}.png", optimize=False)
    return count


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", help="folder to write the class folders into")
    parser.add_argument("--size", type=int, default=32, help="side of the written images in pixels")
    parser.add_argument("--limit", type=int, default=None,
                        help="write only the first N images (default: all 1,797)")
    return parser


def main(args: argparse.Namespace) -> None:
    if args.size < 8:
        raise UserError(f"--size {args.size}: must be at least 8 (the digits are 8x8)")
    count = write_digits(args.out, args.size, args.limit)
    print(f"wrote {count} digit images ({args.size}x{args.size} PNG, 10 classes) to {args.out}")


cli = command(main, get_args_parser)
