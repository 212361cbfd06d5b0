"""int8 as a measured experiment (not a served precision): static post-training quantization of the
same model with PyTorch 2's export-based flow for x86 (torchao's X86InductorQuantizer), calibrated on
the training list, against fp32 and bf16 frozen TorchScript (what the handler serves).

    pip install torchao==0.18.0   # into .venv: not a project dependency
    .venv/bin/python scripts/bench_int8.py --run runs/digits --lists demo/lists

Two figures decide (issue 18): speed, resnet18 at 224x224 batch 8 on this CPU's threads (ms per
image, best of interleaved repeats), and accuracy on the digits run's validation list. int8 would
ship only at >= 1.3x bf16's speed with at most 0.5 points of accuracy lost; docs/benchmark.md has
the result.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from core.errors import UserError, command
from handler import batch_inference
from handler.preprocessing import PreprocessConfig, load_tensor
from training.checkpoint import load_checkpoint
from training.dataset import read_list
from training.export import model_from_checkpoint
from training.labels import load_labels
from training.model import build_model


def quantize_int8(model: torch.nn.Module, calibration: list[torch.Tensor]) -> torch.nn.Module:
    """Export, insert observers, calibrate, convert; compiled with inductor (where int8 kernels live)."""
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:
        raise UserError("int8 needs torchao (pip install torchao==0.18.0): not a project dependency") from None
    example = (calibration[0],)
    # strict: torch 2.15's non-strict export gives a graph torchao 0.18's x86 quantizer cannot annotate
    exported = torch.export.export(model.eval(), example, strict=True).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    converted = convert_pt2e(prepared)
    torch._inductor.config.freezing = True
    return torch.compile(converted)


def batches(images: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    return [torch.stack(images[i:i + size]).contiguous(memory_format=torch.channels_last)
            for i in range(0, len(images), size)]


def accuracy(forward, images: list[torch.Tensor], truth: torch.Tensor) -> float:
    """Top-1 accuracy in %, in batches of 8 (the last padded with blanks: the int8 graph is exported for 8)."""
    padded = images + [torch.zeros_like(images[0])] * (-len(images) % 8)
    with torch.no_grad():
        predicted = torch.cat([forward(b).float().argmax(dim=1) for b in batches(padded, 8)])[:len(images)]
    return 100 * (predicted == truth).float().mean().item()


def ms_per_image(forward, batch: torch.Tensor, repeats: int) -> float:
    """Best of `repeats` timed passes (after two warm-ups), per image."""
    with torch.no_grad():
        for _ in range(2):
            forward(batch)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            forward(batch)
            best = min(best, time.perf_counter() - start)
    return 1000 * best / len(batch)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="int8 (PT2E, x86) against fp32 and bf16: speed and accuracy")
    parser.add_argument("--run", required=True, help="a training run folder (checkpoint.pth, model.pt)")
    parser.add_argument("--lists", required=True, help="the folder with its train.list and val.list")
    parser.add_argument("--calibration-images", type=int, default=256, help="from train.list (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=20, help="timed passes per form (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> None:
    run, lists = Path(args.run), Path(args.lists)
    cfg = PreprocessConfig.load(run / "preprocess.json")
    labels = load_labels(run / "index_to_name.json")
    calibration = [load_tensor(p, cfg) for p, _ in read_list(lists / "train.list", labels)[:args.calibration_images]]
    samples = read_list(lists / "val.list", labels)
    images = [load_tensor(p, cfg) for p, _ in samples]
    truth = torch.tensor([label for _, label in samples])
    where = torch.device("cpu")
    served = {p: batch_inference.load_model(run / "model.pt", where, p) for p in ("fp32", "bf16")}
    eager = model_from_checkpoint(load_checkpoint(run / "checkpoint.pth")).eval()
    int8 = quantize_int8(eager, batches(calibration, 8))
    forms = {"fp32": lambda b: served["fp32"](b), "bf16": lambda b: served["bf16"](b.to(torch.bfloat16)),
             "int8": int8}
    print(f"digits run {run} ({cfg.image_size[0]}x{cfg.image_size[1]}), {len(images)} validation images, "
          f"{len(calibration)} calibration images, {torch.get_num_threads()} threads")
    for name, forward in forms.items():
        print(f"  accuracy {name}: {accuracy(forward, images, truth):.2f} %")
    # speed at the size the benchmark serves: resnet18 at 224, random fixed-seed weights, batch 8
    torch.manual_seed(0)
    big = build_model("resnet18", 10).eval()
    scripted = torch.jit.script(big.to(memory_format=torch.channels_last))
    big_path = Path("bench") / "int8-resnet18.pt"
    big_path.parent.mkdir(exist_ok=True)
    torch.jit.save(scripted, big_path)
    served224 = {p: batch_inference.load_model(big_path, where, p) for p in ("fp32", "bf16")}
    sample = torch.rand(8, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    big8 = quantize_int8(big, [torch.rand(8, 3, 224, 224) for _ in range(8)])
    speed = {"fp32": ms_per_image(lambda b: served224["fp32"](b), sample, args.repeats),
             "bf16": ms_per_image(lambda b: served224["bf16"](b.to(torch.bfloat16)), sample, args.repeats),
             "int8": ms_per_image(big8, sample, args.repeats)}
    for name, ms in speed.items():
        print(f"  resnet18 224 batch 8, {name}: {ms:.2f} ms/image ({speed['fp32'] / ms:.2f}x fp32, "
              f"{speed['bf16'] / ms:.2f}x bf16)")


cli = command(main, get_args_parser)
