"""A tiny TorchScript classifier of fixed weights, and a run folder around it.

Its logits are exact functions of the per-channel means of the input, so tests
can predict outputs by hand: logits = W @ mean_rgb + b.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from handler.preprocessing import PreprocessConfig
from training.export import script_model


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.fc = nn.Linear(3, num_classes)
        with torch.no_grad():
            weight = torch.zeros(num_classes, 3)
            for i in range(num_classes):
                weight[i, i % 3] = 1.0 + i // 3  # class i reacts to channel i % 3
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(torch.linspace(0.0, 0.1, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def make_tiny_run(run_dir: str | Path, num_classes: int = 3, image_size=(8, 8),
                  labels: list[str] | None = None) -> Path:
    """Write model.pt, index_to_name.json and preprocess.json for TinyNet into run_dir."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    labels = labels or [f"class_{i}" for i in range(num_classes)]
    scripted = script_model(TinyNet(num_classes).eval())
    scripted.save(str(run_dir / "model.pt"))
    (run_dir / "index_to_name.json").write_text(
        json.dumps({str(i): name for i, name in enumerate(labels)}, indent=2), encoding="utf-8")
    PreprocessConfig(image_size=image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).save(
        run_dir / "preprocess.json")
    return run_dir
