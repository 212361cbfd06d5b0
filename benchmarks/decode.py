"""Cost of decoding a 12 MP JPEG to the model's input, with and without JPEG draft decoding.

Both paths go through handler/preprocessing.py, the code the handler runs; the photo is
scikit-learn's bundled china.jpg upscaled to 4000x3000 and re-encoded (no download).
"""
from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path
from typing import Callable

from PIL import Image

from core.errors import command
from handler import preprocessing


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=None,
                        help="a JPEG to use instead of the upscaled china.jpg (default: generated)")
    parser.add_argument("--width", type=int, default=4000, help="width of the generated photo (default 4000)")
    parser.add_argument("--height", type=int, default=3000,
                        help="height of the generated photo (default 3000)")
    parser.add_argument("--quality", type=int, default=90,
                        help="JPEG quality of the generated photo (default 90)")
    parser.add_argument("--size", type=int, default=224, help="model input size, square (default 224)")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per path; the median is reported")
    return parser


def make_photo_jpeg(width: int, height: int, quality: int) -> bytes:
    """scikit-learn's bundled china.jpg, upscaled to width x height and re-encoded as JPEG."""
    from sklearn.datasets import load_sample_image

    photo = Image.fromarray(load_sample_image("china.jpg")).resize((width, height), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def time_median_ms(fn: Callable[[], object], runs: int) -> float:
    """Median wall time of fn() in milliseconds, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure_decode(data: bytes, cfg: preprocessing.PreprocessConfig, runs: int) -> dict:
    """ms per image for full decoding and for draft decoding, both followed by the same preprocess."""
    full = time_median_ms(lambda: preprocessing.preprocess(preprocessing.open_image(data), cfg), runs)
    draft = time_median_ms(lambda: preprocessing.load_tensor(data, cfg), runs)
    return {"full_ms": full, "draft_ms": draft, "ratio": full / draft,
            "decoded_size": preprocessing.open_image(data, size=cfg.image_size).size}


def main(args: argparse.Namespace) -> None:
    data = args.image.read_bytes() if args.image else make_photo_jpeg(args.width, args.height, args.quality)
    width, height = Image.open(io.BytesIO(data)).size
    cfg = preprocessing.PreprocessConfig(image_size=(args.size, args.size))
    result = measure_decode(data, cfg, args.runs)
    print(f"decode {width}x{height} JPEG ({len(data) / 1e6:.1f} MB) -> {args.size}x{args.size}: "
          f"full {result['full_ms']:.1f} ms/image, draft {result['draft_ms']:.1f} ms/image "
          f"(decoded at {result['decoded_size'][0]}x{result['decoded_size'][1]}), "
          f"{result['ratio']:.1f}x faster; median of {args.runs} runs")


cli = command(main, get_args_parser)
