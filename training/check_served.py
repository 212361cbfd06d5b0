"""Check a server's answers against the run's model.pt, image by image.

The server runs model.pt frozen and fused, on batches of up to 8 channels_last images; the
reference here runs the saved file one image at a time. Both read preprocess.json through
the one preprocessing implementation, so they differ only by float rounding.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from core.errors import UserError, command
from core.rows import read_rows
from handler.preprocessing import PreprocessConfig, load_tensor
from training.export import load_torchscript
from training.labels import load_labels

# Max |served - reference| probability. Other kernels (frozen conv+BN folding, batch size,
# memory layout) move float32 logits by about 1e-6 on this project's digits model; drifted
# preprocessing or a wrong model moves probabilities by orders of magnitude more.
PROBABILITY_TOLERANCE = 1e-4
# A server at a lower precision (handler.precision) is compared with the same fp32 model.pt at
# that precision's tolerance. bf16 keeps 8 significant bits (rounding 2^-9 relative) in every
# weight and activation: on the digits run the agreement gate measured probabilities moved by
# up to 2.0e-2 (p99 9e-3), so 5e-2. fp16 keeps 11 bits, 8x finer: 1e-2.
TOLERANCES = {"fp32": PROBABILITY_TOLERANCE, "bf16": 5e-2, "fp16": 1e-2}
# The served top-1 may differ from the reference's only on a near tie: each probability may
# move by the tolerance, so the gap between two of them by twice that.
LABEL_MARGIN = 2 * PROBABILITY_TOLERANCE


def reference_probabilities(run_dir: str | Path, paths: list[Path]) -> torch.Tensor:
    """Softmax of run_dir/model.pt for each image, one at a time on the CPU: N x C."""
    run_dir = Path(run_dir)
    cfg = PreprocessConfig.load(run_dir / "preprocess.json")
    model = load_torchscript(run_dir / "model.pt").eval()
    with torch.inference_mode():
        rows = [model(load_tensor(p, cfg).unsqueeze(0)).float() for p in paths]
        return torch.softmax(torch.cat(rows), dim=1)


def compare_row(row: dict, expected: torch.Tensor | None, labels: list[str],
                tolerance: float = PROBABILITY_TOLERANCE) -> list[str]:
    """What is wrong with one served row against its reference probabilities (nothing: [])."""
    if row.get("status") != "ok" or expected is None:
        return [f"{row['path']}: served an error ({row.get('error')})"]
    if row["label"] not in labels:
        return [f"{row['path']}: served label {row['label']!r} is not one of the model's"]
    problems = []
    best, served_best = expected.max().item(), expected[labels.index(row["label"])].item()
    if served_best < best - 2 * tolerance:
        problems.append(f"{row['path']}: served {row['label']!r}, model.pt says "
                        f"{labels[int(expected.argmax())]!r} (probability {served_best:.6f} vs {best:.6f})")
    for answer in row["topk"]:
        reference = expected[answer["index"]].item()
        if abs(answer["probability"] - reference) > tolerance:
            problems.append(f"{row['path']}: probability of {answer['label']!r} served "
                            f"{answer['probability']:.6f}, model.pt {reference:.6f}")
    return problems


def compare_rows(rows: list[dict], reference: list[torch.Tensor | None], labels: list[str],
                 tolerance: float = PROBABILITY_TOLERANCE) -> tuple[list[str], dict]:
    """Each served row against its reference row: the problems (one line each) and the figures."""
    problems, figures = [], {"images": len(rows), "disagree": 0, "near_ties": 0, "max_difference": 0.0}
    for row, expected in zip(rows, reference, strict=True):
        found = compare_row(row, expected, labels, tolerance)
        problems += found
        figures["disagree"] += bool(found)
        if expected is None or row.get("status") != "ok":
            continue
        top2 = torch.topk(expected, min(2, len(expected))).values
        figures["near_ties"] += len(top2) == 2 and (top2[0] - top2[1]).item() < 2 * tolerance
        for answer in row["topk"]:
            difference = abs(answer["probability"] - expected[answer["index"]].item())
            figures["max_difference"] = max(figures["max_difference"], difference)
    return problems, figures


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder with model.pt, preprocess.json, index_to_name.json")
    parser.add_argument("results", help="results.jsonl written by scripts/classify_dir.py")
    parser.add_argument("--root", required=True,
                        help="the folder classify_dir.py classified (row paths are relative to it)")
    parser.add_argument("--precision", choices=sorted(TOLERANCES), default="fp32",
                        help="the precision the server ran (handler.precision; describe shows it): sets "
                             "the tolerance, " + ", ".join(f"{k} {v:g}" for k, v in TOLERANCES.items()))
    return parser


def main(args: argparse.Namespace) -> None:
    results, root = Path(args.results), Path(args.root)
    if not results.is_file():
        raise UserError(f"{results}: results file not found")
    # the client's own reader: a name holding U+2028 or bytes that are not UTF-8 reads back as written
    rows = [row for _, row in read_rows(results, strict=True)]
    if not rows:
        raise UserError(f"{results}: no rows")
    labels = load_labels(Path(args.run) / "index_to_name.json")
    ok = [i for i, row in enumerate(rows) if row.get("status") == "ok"]
    probabilities = reference_probabilities(args.run, [root / rows[i]["path"] for i in ok]) if ok else []
    reference: list[torch.Tensor | None] = [None] * len(rows)
    for i, expected in zip(ok, probabilities):
        reference[i] = expected
    tolerance = TOLERANCES[args.precision]
    problems, figures = compare_rows(rows, reference, labels, tolerance)
    summary = (f"{figures['images'] - figures['disagree']}/{figures['images']} images agree with model.pt "
               f"(top-1 label except near ties under {2 * tolerance:g}: {figures['near_ties']}; "
               f"max probability difference {figures['max_difference']:.1e}, "
               f"tolerance {tolerance:g} for {args.precision})")
    if problems:
        sys.exit("\n".join(problems[:10] + [f"check_served: disagreement: {summary}"]))
    print(f"check_served: {summary}")


cli = command(main, get_args_parser)
