"""Export a trained checkpoint to TorchScript and prove the saved file matches the eager model.

With --check-precision P, check instead that the run's model.pt served at P agrees with fp32
on the validation list (training/agreement.py) and write RUN/precision-P.json.
"""
from __future__ import annotations

import argparse
import copy
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from core.errors import Refused, UserError, command
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
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            script_model(model).save(str(tmp))
        difference = max_logit_difference(model, load_torchscript(tmp), image_size)
        if not difference <= TOLERANCE:
            raise ExportMismatch(f"{out}: reloaded TorchScript differs from the eager model by "
                                 f"{difference:.3g} (> {TOLERANCE}); the file is not safe to serve")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
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
    parser.add_argument("--check-precision", choices=["bf16", "fp16"], default=None,
                        help="instead of exporting: the agreement gate of model.pt served at this precision "
                             "against fp32, written to precision-P.json beside the checkpoint")
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
    where = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    devices.use_full_fp32()
    lack = devices.missing_capability(where, args.check_precision)
    if lack:
        raise UserError(f"--check-precision {args.check_precision}: {devices.describe_device(where)} cannot "
                        f"run it: {lack}")
    model_file = run_dir / "model.pt"
    if not model_file.is_file():
        raise UserError(f"{model_file}: not found; export the run first")
    figures = agreement.measure(run_dir, args.check_precision, val_list, where)
    report = agreement.write_report(run_dir, figures, args.min_agreement, args.max_accuracy_drop)
    summary = (f"{args.check_precision} on {report['device']}: top-1 agreement {report['agreement']:.2f} %, "
               f"accuracy {report['accuracy_fp32']:.2f} -> {report['accuracy']:.2f} %, max probability "
               f"difference {report['max_probability_difference']:.1e} (p99 "
               f"{report['p99_probability_difference']:.1e}), {report['images']} images, "
               f"{report['seconds_fp32']:.1f} s fp32 / {report['seconds']:.1f} s; report "
               f"{agreement.report_path(run_dir, args.check_precision)}")
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
    out = Path(args.out) if args.out else path.parent / "model.pt"
    difference = export_torchscript(model_from_checkpoint(checkpoint), out, image_size)
    print(f"exported {checkpoint['arch']} ({len(checkpoint['classes'])} classes) to {out}; "
          f"reloaded and checked, max logit difference {difference:.2e}")


cli = command(main, get_args_parser)
