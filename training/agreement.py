"""The agreement gate: a run's validation list through fp32 and a lower precision, served alike.

Both passes load model.pt with the handler's own code (handler.batch_inference.load_model:
weights converted, then frozen) and run batches of 8 through its forward_batch, so the
report speaks of what a worker would serve. `python scripts/export.py --check-precision P`
writes RUN/precision-P.json; scripts/archive.sh packages it, and `auto` in the handler reads it.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from handler import aot, batch_inference
from handler import device as devices
from handler.preprocessing import PreprocessConfig, load_tensor
from training.dataset import read_list
from training.labels import load_labels

MIN_AGREEMENT = 99.5  # % of images whose top-1 label equals fp32's
MAX_ACCURACY_DROP = 0.5  # accuracy points the lower precision may lose against fp32
BATCH_SIZE = 8  # the handler's batchSize in model-config.yaml


def report_path(run_dir: str | Path, precision: str) -> Path:
    return Path(run_dir) / devices.REPORT_PATTERN.format(precision)


file_sha256 = aot.file_sha256


def served_probabilities(model, dtype: torch.dtype, images: list[torch.Tensor],
                         where: torch.device) -> tuple[torch.Tensor, float]:
    """Softmax of a loaded model, in batches as the handler runs them; and seconds."""
    start = time.perf_counter()
    rows = [batch_inference.forward_batch(model, images[i:i + BATCH_SIZE], where, dtype)
            for i in range(0, len(images), BATCH_SIZE)]
    return torch.cat(rows), time.perf_counter() - start


def measure(run_dir: str | Path, precision: str, val_list: str | Path, where: torch.device,
            package: str | Path | None = None) -> dict:
    """The figures of the report (no verdict): agreement, accuracies, probability differences, time.

    The reference is model.pt at fp32; the other side model.pt at `precision`, or with `package`
    that AOTInductor package (its precision; float32 in and out), loaded as a worker loads it."""
    run_dir = Path(run_dir)
    labels = load_labels(run_dir / "index_to_name.json")
    samples = read_list(val_list, labels)
    cfg = PreprocessConfig.load(run_dir / "preprocess.json")
    truth = torch.tensor([label for _, label in samples])
    reference_model = batch_inference.load_model(run_dir / "model.pt", where, "fp32")
    extra = {}
    if package is None:
        model, dtype = batch_inference.load_model(run_dir / "model.pt", where, precision), devices.DTYPES[precision]
    else:
        model, meta = aot.load_package(package, where)
        dtype, precision = torch.float32, f"pt2-{meta['precision']}"
        extra = {"package": Path(package).name, "package_sha256": meta["package_sha256"], "march": meta["march"]}
    # Batch by batch: decoded images are held one batch at a time (a whole 50,000-image list at 224 px
    # was ~30 GB), and of the probabilities only each image's top-1s and largest difference are kept.
    top1_fp32, top1, differences, seconds_fp32, seconds = [], [], [], 0.0, 0.0
    for start in range(0, len(samples), BATCH_SIZE):
        images = [load_tensor(path, cfg) for path, _ in samples[start:start + BATCH_SIZE]]
        reference, spent_fp32 = served_probabilities(reference_model, torch.float32, images, where)
        lower, spent = served_probabilities(model, dtype, images, where)
        top1_fp32.append(reference.argmax(dim=1))
        top1.append(lower.argmax(dim=1))
        differences.append((reference - lower).abs().max(dim=1).values)
        seconds_fp32, seconds = seconds_fp32 + spent_fp32, seconds + spent
    per_image, top1_fp32, top1 = torch.cat(differences), torch.cat(top1_fp32), torch.cat(top1)
    return {
        "precision": precision, "device": devices.describe_device(where), "images": len(samples),
        "agreement": round(100 * (top1 == top1_fp32).float().mean().item(), 4),
        "accuracy_fp32": round(100 * (top1_fp32 == truth).float().mean().item(), 4),
        "accuracy": round(100 * (top1 == truth).float().mean().item(), 4),
        "max_probability_difference": per_image.max().item(),
        "p99_probability_difference": torch.quantile(per_image, 0.99).item(),
        "seconds_fp32": round(seconds_fp32, 3), "seconds": round(seconds, 3),
        "model_sha256": file_sha256(run_dir / "model.pt"), "val_list": str(Path(val_list).resolve()), **extra,
    }


def verdict(figures: dict, min_agreement: float, max_accuracy_drop: float) -> list[str]:
    """What fails the gate (nothing: [])."""
    failures = []
    if figures["agreement"] < min_agreement:
        failures.append(f"top-1 agreement with fp32 {figures['agreement']:.2f} % < {min_agreement:g} %")
    drop = figures["accuracy_fp32"] - figures["accuracy"]
    if drop > max_accuracy_drop:
        failures.append(f"accuracy {figures['accuracy']:.2f} % is {drop:.2f} points under fp32's "
                        f"{figures['accuracy_fp32']:.2f} % (> {max_accuracy_drop:g})")
    return failures


def write_report(run_dir: str | Path, figures: dict, min_agreement: float, max_accuracy_drop: float) -> dict:
    """Add the thresholds and the verdict to `figures` and write RUN/precision-P.json."""
    failures = verdict(figures, min_agreement, max_accuracy_drop)
    report = {**figures, "min_agreement": min_agreement, "max_accuracy_drop": max_accuracy_drop,
              "passed": not failures, "failures": failures,
              "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    report_path(run_dir, figures["precision"]).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
