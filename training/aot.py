"""Compile a trained model ahead of time into a `.pt2` package (torch.export + AOTInductor).

fp32 and bf16 export the eager model (bf16: weights and input in bfloat16 inside the graph, the
logits back in float32); int8 is static post-training quantization with PyTorch 2's export flow
for x86 (torchao's X86InductorQuantizer, `strict=True` export, as benchmarks/int8.py measured),
calibrated on a fixed, seeded sample of the run's training list. The batch dimension is dynamic
from 1 to the archive's batchSize, so a worker runs any batch TorchServe hands it, unpadded.
The C++ is compiled for an x86-64 level this CPU has (v4 with AVX-512, else v3), not for
`-march=native`, and the record beside the package says which (handler/aot.py checks it).
"""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import torch
from torch import nn

from core.files import save_atomic
from handler import aot
from handler.preprocessing import PreprocessConfig, load_tensor

# The compile's recipe (inductor settings and grad mode), recorded beside each package: a package
# made by an older recipe is made again where one is reused (make bench). 2: compiled under
# no_grad, so that freezing (and int8's kernels) applies.
RECIPE = 2
CALIBRATION_SIZE = 128  # training images that set int8's activation ranges (seeded sample)


def package_path(run_dir: str | Path, precision: str) -> Path:
    return Path(run_dir) / f"model-{precision}.pt2"


def march_for(flags: set[str]) -> str:
    """The highest x86-64 level whose every flag this CPU has."""
    for level in ("x86-64-v4", "x86-64-v3", "x86-64-v2"):
        if set(aot.MARCH_FLAGS[level]) <= flags:
            return level
    raise RuntimeError("this CPU lacks x86-64-v2: AOTInductor packages are not made for it")


# Instruction sets inductor enables beyond -march when the compiling CPU has them (its vec ISA's
# -m flags), as /proc/cpuinfo names them: a package using them must be refused where they are missing.
ISA_FLAGS = {"-mavx512bf16": "avx512_bf16", "-mavx512vnni": "avx512_vnni", "-mavx512fp16": "avx512_fp16",
             "-mamx-tile": "amx_tile", "-mamx-bf16": "amx_bf16", "-mamx-int8": "amx_int8",
             "-mavxvnni": "avx_vnni"}


def isa_extension_flags() -> list[str]:
    from torch._inductor import cpu_vec_isa
    used = str(cpu_vec_isa.pick_vec_isa().build_arch_flags()).split()
    return sorted({ISA_FLAGS[f] for f in used if f in ISA_FLAGS})


class AtPrecision(nn.Module):
    """The model at a lower float precision, taking and giving float32 (what the handler sends)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = copy.deepcopy(model).to(dtype), dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


def calibration_images(train_list: str | Path, labels: list[str], cfg: PreprocessConfig, size: int,
                       seed: int = 0) -> list[torch.Tensor]:
    """A fixed, seeded sample of the training list, preprocessed as served."""
    from training.dataset import read_list
    samples = read_list(train_list, labels)
    chosen = random.Random(seed).sample(samples, min(size, len(samples)))
    return [load_tensor(path, cfg) for path, _ in chosen]


def quantize_int8(model: nn.Module, example: torch.Tensor, dynamic: tuple,
                  calibration: list[torch.Tensor], batch_size: int) -> nn.Module:
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:
        from core.errors import UserError
        raise UserError("--pt2 int8 needs torchao (requirements.txt pins it; run `make install`)") from None
    # strict: torch 2.15's non-strict export gives a graph torchao's x86 quantizer cannot annotate
    exported = torch.export.export(model, (example,), dynamic_shapes=dynamic, strict=True).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for i in range(0, len(calibration), batch_size):
            prepared(torch.stack(calibration[i:i + batch_size]))
    return convert_pt2e(prepared)


def export_pt2(model: nn.Module, out: str | Path, precision: str, image_size: tuple[int, int], batch_size: int,
               model_sha256: str, calibration: list[torch.Tensor] | None = None) -> dict:
    """Compile `model` into the package `out` and write its record; the record."""
    if precision not in aot.PT2_PRECISIONS:
        raise ValueError(f"precision must be one of {aot.PT2_PRECISIONS}, not {precision!r}")
    if precision == "int8" and not calibration:
        raise ValueError("int8 needs calibration images")
    model = model.cpu().eval().to(memory_format=torch.contiguous_format)
    example = torch.zeros(min(2, batch_size), 3, *image_size)
    batch = torch.export.Dim("batch", min=1, max=batch_size) if batch_size > 1 else None
    dynamic = ({0: batch},) if batch is not None else None
    march = march_for(aot.cpu_flags())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # all under no_grad, the compile too: inductor freezes (constant weights, the x86 int8 and mkldnn
    # weight packing) only where grad mode is off, and says nothing otherwise: int8 compiled with
    # grad on ran at fp32's speed (12.7 against 1.3 ms an image, resnet18 at 224 on an AMX CPU)
    with torch.no_grad():
        if precision == "int8":
            model = quantize_int8(model, example, dynamic, calibration, batch_size)
        elif precision == "bf16":
            model = AtPrecision(model, torch.bfloat16)
        exported = torch.export.export(model, (example,), dynamic_shapes=dynamic, strict=precision == "int8")
        with torch._inductor.config.patch({"freezing": True, "cpp.march": march, "cpp.dynamic_threads": True}):
            save_atomic(lambda f: torch._inductor.aoti_compile_and_package(exported, package_path=f), out)
    meta = {"format": "pt2", "precision": precision, "device": "cpu", "torch": torch.__version__,
            "march": march, "cpu_flags": aot.MARCH_FLAGS[march] + isa_extension_flags(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "batch_sizes": [1, batch_size], "image_size": list(image_size),
            "package_sha256": aot.file_sha256(out), "model_sha256": model_sha256,
            "calibration_images": len(calibration or []), "recipe": RECIPE}
    # after the package: until this record names its sha256, a worker refuses the package (handler/aot.py)
    save_atomic(lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode("utf-8")), aot.meta_path(out))
    return meta


def check_reload(out: str | Path, model: nn.Module, precision: str, image_size: tuple[int, int], batch_size: int,
                 tolerance: float) -> float:
    """Load the package as a worker would and compare its logits with the eager model (fp32/bf16)."""
    compiled, _ = aot.load_package(out, torch.device("cpu"))
    worst = 0.0
    generator = torch.Generator().manual_seed(0)
    reference = model if precision == "fp32" else AtPrecision(model, torch.bfloat16)
    with torch.no_grad():
        for n in sorted({1, batch_size}):
            x = torch.randn(n, 3, *image_size, generator=generator)
            worst = max(worst, (compiled(x) - reference(x)).abs().max().item())
    if not worst <= tolerance:
        Path(out).unlink(missing_ok=True)
        aot.meta_path(out).unlink(missing_ok=True)
        raise RuntimeError(f"{out}: the compiled package differs from the model by {worst:.3g} (> {tolerance:g}); removed")
    return worst
