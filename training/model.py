"""torchvision classifiers with their output layer sized for our classes; offline weights."""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from core.errors import UserError


def classification_archs() -> list[str]:
    """Names of torchvision's image classification models."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def replace_head(model: nn.Module, arch: str, num_classes: int) -> nn.Module:
    """Swap the final classification layer for one with `num_classes` outputs."""
    if isinstance(getattr(model, "classifier", None), nn.Sequential) and any(
            isinstance(m, nn.Conv2d) for m in model.classifier):  # SqueezeNet: a 1x1 conv head
        index = max(i for i, m in enumerate(model.classifier) if isinstance(m, nn.Conv2d))
        old = model.classifier[index]
        model.classifier[index] = nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size)
        return model
    # ResNet `fc`, MobileNet/EfficientNet/ConvNeXt `classifier[-1]`, ViT `heads.head`,
    # Swin `head`, ...: the head is the last Linear layer in registration order.
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"--arch {arch}: cannot find a final Linear layer to adapt; "
                        f"pick e.g. resnet18, mobilenet_v3_small, efficientnet_b0")
    name, old = linears[-1]
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    setattr(parent, name.rpartition(".")[2], new)
    return model


def cached_weights_path(weights) -> Path:
    """Where torch hub keeps the file of a torchvision weights enum."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def resolve_weights(arch: str, name: str):
    """A torchvision weights enum for `arch` ("DEFAULT" or e.g. "IMAGENET1K_V1")."""
    try:
        enum = torchvision.models.get_model_weights(arch)
        return enum.DEFAULT if name.upper() == "DEFAULT" else enum[name]
    except (KeyError, ValueError):
        raise UserError(f"--weights {name}: no such weights for {arch}; try DEFAULT") from None


def load_pretrained_state(arch: str, weights: str | None, weights_file: str | None) -> dict | None:
    """Pretrained state dict from --weights-file or the local torch hub cache; never downloads."""
    if weights_file:
        path = Path(weights_file)
    elif weights:
        path = cached_weights_path(resolve_weights(arch, weights))
        if not path.is_file():
            raise UserError(f"--weights {weights}: {path.name} is not in the local torch hub cache; "
                            f"nothing is downloaded at run time: put the file at {path} "
                            f"(or pass --weights-file PATH)")
    else:
        return None
    if not path.is_file():
        raise UserError(f"--weights-file {path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: cannot load weights ({e.__class__.__name__}: {e})") from None
    return state.get("model", state) if isinstance(state, dict) else state


def build_model(arch: str, num_classes: int, weights: str | None = None,
                weights_file: str | None = None) -> nn.Module:
    """A torchvision `arch` with `num_classes` outputs, optionally from pretrained weights."""
    if arch not in classification_archs():
        raise UserError(f"--arch {arch}: not a torchvision classification model; "
                        f"e.g. resnet18, resnet50, mobilenet_v3_small, efficientnet_b0, vit_b_16")
    if num_classes < 2:
        raise UserError(f"need at least 2 classes, got {num_classes}")
    kwargs = {"aux_logits": False, "init_weights": False} if arch in ("inception_v3", "googlenet") else {}
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    state = load_pretrained_state(arch, weights, weights_file)
    if state is not None:
        state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.") and not k.startswith("aux")}
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"pretrained weights do not fit {arch}: {str(e).splitlines()[0]}") from None
    return replace_head(model, arch, num_classes)


def fits_input_size(model: nn.Module, size: tuple[int, int]) -> str | None:
    """None when one zero image of `size` goes through `model`, else the first line of its error."""
    was_training = model.training
    model.eval()  # eval: no BatchNorm statistics updated, no random numbers drawn
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *size))
        return None
    except Exception as e:  # shape errors surface as RuntimeError, ValueError or AssertionError
        return (str(e).strip().splitlines() or [e.__class__.__name__])[0][:160]
    finally:
        model.train(was_training)


def check_input_size(model: nn.Module, arch: str, size: tuple[int, int], limit: int = 512) -> None:
    """Refuse an image size `arch` cannot take, naming the smallest square size that it can."""
    error = fits_input_size(model, size)
    if error is None:
        return
    flag = f"--image-size {size[0]} {size[1]}" if size[0] != size[1] else f"--image-size {size[0]}"
    low, high = max(size), max(size) + 1  # low fails; look for a square size that works
    while high <= limit and fits_input_size(model, (high, high)) is not None:
        low, high = high, high * 2
    if high > limit:  # e.g. ViT takes one size only, which its own message names
        raise UserError(f"{flag}: {arch} cannot take this size ({error})")
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if fits_input_size(model, (middle, middle)) is None else (middle, high)
    raise UserError(f"{flag}: too small for {arch}; the smallest square size it takes is {high}")


def hold_frozen_norms(model: nn.Module) -> None:
    """Put the BatchNorm layers whose weights are frozen in eval mode (after model.train()): train mode
    would still move their running statistics with every batch, so a frozen backbone would change."""
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and params and not any(p.requires_grad for p in params):
            module.eval()


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the output layer (the part left trainable by --freeze-backbone)."""
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    return list(last.parameters())
