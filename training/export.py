"""Export a trained checkpoint to TorchScript and prove the saved file matches the eager model.

With --pt2 P (fp32, bf16, int8), compile an AOTInductor package RUN/model-P.pt2 beside model.pt
instead (training/aot.py), reloaded and compared like model.pt (int8: by the gate only).
With --check-precision P, check instead that the run's model.pt served at P agrees with fp32
on the validation list (training/agreement.py) and write RUN/precision-P.json; with --pt2 P and
--check-precision, the gate runs the package against model.pt at fp32: RUN/precision-pt2-P.json.
"""
from __future__ import annotations

import argparse
import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from core.errors import Refused, UserError, command
from core.files import atomic_path
from handler.aot import PT2_PRECISIONS
from training.aot import CALIBRATION_SIZE
from training.checkpoint import load_checkpoint

TOLERANCE = 1e-5  # max abs logit difference allowed between eager and reloaded TorchScript


class ExportMismatch(RuntimeError):
    """The reloaded TorchScript file does not reproduce the eager model."""


def script_model(model: nn.Module) -> torch.jit.ScriptModule:
    """TorchScript is what TorchServe loads natively; its deprecation warning is not the user's concern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(model)


def load_torchscript(path: str | Path, device: str = "cpu") -> torch.jit.ScriptModule:
    """torch.jit.load without the deprecation warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location=device)


def max_logit_difference(eager: nn.Module, scripted: torch.jit.ScriptModule, image_size,
                         seed: int = 0) -> float:
    """Largest |eager - scripted| logit over random batches of size 1 and 8."""
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    with torch.inference_mode():
        for batch in (1, 8):
            x = torch.randn(batch, 3, *image_size, generator=generator)
            worst = max(worst, (eager(x) - scripted(x)).abs().max().item())
    return worst


def export_torchscript(model: nn.Module, out: str | Path, image_size: tuple[int, int]) -> float:
    """Script a contiguous CPU copy of `model`, save it, reload and compare; returns the max difference.

    The copy is in the default (NCHW) memory format whatever `model` trained in (channels_last):
    the same weights then give the same file, and CPU kernels do not depend on how training ran.
    The file replaces `out` only once the reloaded copy has passed the comparison.
    """
    model = copy.deepcopy(model).cpu().eval().to(memory_format=torch.contiguous_format)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            script_model(model).save(str(tmp))
        difference = max_logit_difference(model, load_torchscript(tmp), image_size)
        if not difference <= TOLERANCE:
            raise ExportMismatch(f"{out}: reloaded TorchScript differs from the eager model by "
                                 f"{difference:.3g} (> {TOLERANCE}); the file is not safe to serve")
    return difference


def model_from_checkpoint(checkpoint: dict) -> nn.Module:
    """Rebuild the best model a checkpoint describes."""
    from training.model import build_model

    model = build_model(checkpoint["arch"], len(checkpoint["classes"]))
    model.load_state_dict(checkpoint.get("best_model", checkpoint["model"]))
    return model


def get_args_parser() -> argparse.ArgumentParser:
    from training import agreement

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pth written by training.train")
    parser.add_argument("--out", default=None,
                        help="TorchScript file to write (default: model.pt beside the checkpoint)")
    parser.add_argument("--check-precision", nargs="?", const="pt2", choices=["bf16", "fp16", "pt2"], default=None,
                        help="instead of exporting: the agreement gate of model.pt served at this precision "
                             "against fp32, written to precision-P.json beside the checkpoint; with --pt2 P "
                             "and no value, the gate of that package (precision-pt2-P.json)")
    parser.add_argument("--pt2", choices=list(PT2_PRECISIONS), default=None,
                        help="compile an AOTInductor package model-P.pt2 beside model.pt at this precision "
                             "(int8: static quantization calibrated on the training list)")
    parser.add_argument("--calibration-size", type=int, default=CALIBRATION_SIZE, metavar="N",
                        help="int8: training images that calibrate the quantization, a seeded sample "
                             "(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help="--pt2: the largest batch the package takes (default: batchSize of "
                             "handler/model-config.yaml)")
    parser.add_argument("--val-list", default=None,
                        help="list file for the gate (default: the --val-list the run was trained with)")
    parser.add_argument("--device", default=None,
                        help="device for the gate, e.g. cpu or cuda:0 (default: cuda:0 when CUDA is usable)")
    parser.add_argument("--min-agreement", type=float, default=agreement.MIN_AGREEMENT,
                        help="gate: least %% of images whose top-1 label equals fp32's (default: %(default)s)")
    parser.add_argument("--max-accuracy-drop", type=float, default=agreement.MAX_ACCURACY_DROP,
                        help="gate: most accuracy points lost against fp32 (default: %(default)s)")
    return parser


def check_precision(args: argparse.Namespace, checkpoint: dict, run_dir: Path) -> None:
    """The agreement gate: write the report; one line and exit 1 when it fails."""
    from handler import device as devices
    from training import agreement

    if not 0 <= args.min_agreement <= 100 or args.max_accuracy_drop < 0:
        raise UserError(f"--min-agreement {args.min_agreement:g} must be 0..100 and "
                        f"--max-accuracy-drop {args.max_accuracy_drop:g} at least 0")
    val_list = args.val_list or (checkpoint.get("args") or {}).get("val_list")
    if not val_list:
        raise UserError(f"{args.checkpoint}: names no validation list; pass --val-list")
    package = None
    if args.check_precision == "pt2":
        if not args.pt2:
            raise UserError("--check-precision without a precision needs --pt2 P (the package to check)")
        from training.aot import package_path
        package = package_path(run_dir, args.pt2)
        if not package.is_file():
            raise UserError(f"{package}: not found; compile it first (--pt2 {args.pt2} without --check-precision)")
        args.device = args.device or "cpu"
    elif args.pt2:
        raise UserError("--check-precision P and --pt2 together: give --check-precision no value to check the package")
    where = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    devices.use_full_fp32()
    lack = None if package else devices.missing_capability(where, args.check_precision)
    if lack:
        raise UserError(f"--check-precision {args.check_precision}: {devices.describe_device(where)} cannot "
                        f"run it: {lack}")
    model_file = run_dir / "model.pt"
    if not model_file.is_file():
        raise UserError(f"{model_file}: not found; export the run first")
    from handler.aot import PackageRefused
    try:
        figures = agreement.measure(run_dir, args.check_precision, val_list, where, package)
    except PackageRefused as e:
        raise Refused(str(e)) from None
    report = agreement.write_report(run_dir, figures, args.min_agreement, args.max_accuracy_drop)
    summary = (f"{report['precision']} on {report['device']}: top-1 agreement {report['agreement']:.2f} %, "
               f"accuracy {report['accuracy_fp32']:.2f} -> {report['accuracy']:.2f} %, max probability "
               f"difference {report['max_probability_difference']:.1e} (p99 "
               f"{report['p99_probability_difference']:.1e}), {report['images']} images, "
               f"{report['seconds_fp32']:.1f} s fp32 / {report['seconds']:.1f} s; report "
               f"{agreement.report_path(run_dir, report['precision'])}")
    if not report["passed"]:
        raise Refused(f"precision gate failed: {'; '.join(report['failures'])} ({summary})")
    print(f"precision gate passed: {summary}")


def main(args: argparse.Namespace) -> None:
    path = Path(args.checkpoint)
    checkpoint = load_checkpoint(path)
    if args.check_precision:
        check_precision(args, checkpoint, path.parent)
        return
    image_size = tuple(checkpoint["preprocess"]["image_size"])
    if args.pt2:
        export_package(args, checkpoint, path.parent, image_size)
        return
    out = Path(args.out) if args.out else path.parent / "model.pt"
    difference = export_torchscript(model_from_checkpoint(checkpoint), out, image_size)
    print(f"exported {checkpoint['arch']} ({len(checkpoint['classes'])} classes) to {out}; "
          f"reloaded and checked, max logit difference {difference:.2e}")


def export_package(args: argparse.Namespace, checkpoint: dict, run_dir: Path, image_size: tuple[int, int]) -> None:
    """--pt2 P: compile the package, reload it as a worker would and compare (fp32, bf16)."""
    import time

    import yaml

    from handler import device as devices
    from handler.preprocessing import PreprocessConfig
    from training import aot
    from training.agreement import file_sha256
    from training.labels import load_labels

    model_file = run_dir / "model.pt"
    if not model_file.is_file():
        raise UserError(f"{model_file}: not found; export model.pt first (the package is checked against it)")
    batch_size = args.batch_size
    if batch_size is None:
        config = Path(__file__).resolve().parent.parent / "handler" / "model-config.yaml"
        batch_size = int(yaml.safe_load(config.read_text(encoding="utf-8"))["batchSize"])
    if batch_size < 1 or args.calibration_size < 1:
        raise UserError(f"--batch-size {batch_size} and --calibration-size {args.calibration_size} must be at least 1")
    calibration = None
    if args.pt2 == "int8":
        train_list = (checkpoint.get("args") or {}).get("train_list")
        if not train_list:
            raise UserError(f"{args.checkpoint}: names no training list to calibrate int8 on")
        labels = load_labels(run_dir / "index_to_name.json")
        calibration = aot.calibration_images(train_list, labels, PreprocessConfig.load(run_dir / "preprocess.json"),
                                             args.calibration_size)
    out = aot.package_path(run_dir, args.pt2)
    (run_dir / devices.REPORT_PATTERN.format(f"pt2-{args.pt2}")).unlink(missing_ok=True)  # about the old package
    started = time.monotonic()
    model = model_from_checkpoint(checkpoint)
    try:
        meta = aot.export_pt2(model, out, args.pt2, image_size, batch_size, file_sha256(model_file), calibration)
        seconds = time.monotonic() - started
        checked = "checked by the gate only (--check-precision)"
        if args.pt2 != "int8":
            tolerance = TOLERANCE * 10 if args.pt2 == "fp32" else 0.05
            checked = (f"reloaded and checked, max logit difference "
                       f"{aot.check_reload(out, model, args.pt2, image_size, batch_size, tolerance):.2e}")
    except (RuntimeError, ValueError) as e:  # a refused package, a reload mismatch, an empty list
        raise Refused(f"--pt2 {args.pt2}: {e}") from None
    print(f"compiled {checkpoint['arch']} at {args.pt2} to {out} for {meta['march']} (batches 1..{batch_size}) "
          f"in {seconds:.0f} s; {checked}; next: --check-precision --pt2 {args.pt2}")


cli = command(main, get_args_parser)
