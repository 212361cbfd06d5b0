"""Export a trained checkpoint to TorchScript and prove the saved file matches the eager model."""
from __future__ import annotations

import argparse
import copy
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from training.checkpoint import load_checkpoint
from core.errors import run_main

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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pth written by training.train")
    parser.add_argument("--out", default=None,
                        help="TorchScript file to write (default: model.pt beside the checkpoint)")
    return parser


def main(args: argparse.Namespace) -> None:
    path = Path(args.checkpoint)
    checkpoint = load_checkpoint(path)
    image_size = tuple(checkpoint["preprocess"]["image_size"])
    out = Path(args.out) if args.out else path.parent / "model.pt"
    difference = export_torchscript(model_from_checkpoint(checkpoint), out, image_size)
    print(f"exported {checkpoint['arch']} ({len(checkpoint['classes'])} classes) to {out}; "
          f"reloaded and checked, max logit difference {difference:.2e}")


if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args())
