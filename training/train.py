"""Train a torchvision classifier on a list file; write a self-describing run folder.

runs/NAME/: checkpoint.pth, model.pt (TorchScript, best epoch), index_to_name.json,
preprocess.json, metrics.json, training_curves.png.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from core.errors import UserError, command
from handler.preprocessing import MAX_IMAGE_SIZE, PreprocessConfig, resize, to_tensor
from training.checkpoint import load_checkpoint, save_checkpoint
from training.dataset import ImageListDataset
from training.export import export_torchscript
from training.labels import save_labels
from training.model import build_model, check_input_size, head_parameters, hold_frozen_norms


class TrainPreset:
    """Light augmentation on top of the shared preprocessing; training only."""

    def __init__(self, *, cfg: PreprocessConfig, hflip: bool = False):
        self.cfg = cfg
        ops = [T.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1)),
               T.ColorJitter(brightness=0.2, contrast=0.2)]
        self.augment = T.Compose(ops + ([T.RandomHorizontalFlip()] if hflip else []))

    def __call__(self, img):
        return to_tensor(self.augment(resize(img, self.cfg)), self.cfg)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    return torch.device(name)


def load_data(args, cfg: PreprocessConfig, device: torch.device):
    """Validated train and val datasets and their loaders."""
    train_set = ImageListDataset(args.train_list, args.labels, cfg,
                                 transform=TrainPreset(cfg=cfg, hflip=args.hflip))
    val_set = ImageListDataset(args.val_list, args.labels, cfg)
    common = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda",
                  persistent_workers=args.workers > 0)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, shuffle=True, drop_last=len(train_set) > args.batch_size,
                              generator=generator, **common)
    return train_set, val_set, train_loader, DataLoader(val_set, shuffle=False, **common)


def check_batches(model: nn.Module, args, train_size: int) -> None:
    """BatchNorm in training mode cannot normalise a batch of one image: refuse what would give one."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    if args.batch_size < 2:
        raise UserError(f"--batch-size {args.batch_size}: {args.arch} has BatchNorm layers, "
                        "which need at least 2 images a batch")
    # load_data drops an incomplete last batch whenever there is more than one batch, so only
    # a one-image list is left to refuse.
    if train_size < 2:
        raise UserError(f"{args.train_list}: {train_size} training image; {args.arch} has BatchNorm layers, "
                        "which need at least 2 images a batch")


def train_one_epoch(model, loader, optimizer, scaler, device, epoch: int, epochs: int) -> dict:
    model.train()
    hold_frozen_norms(model)  # --freeze-backbone: the backbone's BatchNorm statistics stay as they are
    criterion = nn.CrossEntropyLoss()
    total_loss, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False, disable=None)
    for images, targets in bar:
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=scaler.is_enabled()):
            logits = model(images)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total_loss += loss.item() * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(targets)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
    seconds = time.perf_counter() - start
    return {"train_loss": total_loss / seen, "train_acc": correct / seen, "images_per_s": seen / seconds}


def evaluate(model, loader, device) -> dict:
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct, seen = 0.0, 0, 0
    with torch.inference_mode():
        for images, targets in loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            targets = targets.to(device, non_blocking=True)
            logits = model(images).float()
            total_loss += criterion(logits, targets).item()
            correct += (logits.argmax(1) == targets).sum().item()
            seen += len(targets)
    return {"val_loss": total_loss / seen, "val_acc": correct / seen, "val_error": 1 - correct / seen}


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    ax_loss.set(title="loss", xlabel="epoch")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [h["val_acc"] for h in history], "o-", label="val")
    ax_acc.set(title="accuracy", xlabel="epoch", ylim=(0, 1.01))
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)



def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train-list", required=True, help="list file of training samples")
    parser.add_argument("--val-list", required=True, help="list file of validation samples")
    parser.add_argument("--labels", required=True, help="labels JSON {\"0\": name, ...}")
    parser.add_argument("--out", required=True, help="run folder to write, e.g. runs/NAME")
    parser.add_argument("--arch", default="resnet18", help="torchvision classification model name")
    parser.add_argument("--weights", default=None,
                        help="pretrained weights name (e.g. DEFAULT) from the local torch hub cache")
    parser.add_argument("--weights-file", default=None, help="pretrained state dict file for --arch")
    parser.add_argument("--image-size", type=int, nargs="+", default=[224], help="model input size: S or H W")
    parser.add_argument("--epochs", type=int, default=10, help="number of epochs")
    parser.add_argument("--batch-size", type=int, default=64, help="images per training step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine schedule)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay")
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="optimizer")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, shuffling and augmentation")
    parser.add_argument("--freeze-backbone", action="store_true", help="train the output layer only")
    parser.add_argument("--hflip", action="store_true",
                        help="add random horizontal flips (not for text or digits)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pth")
    return parser


def check_args(args: argparse.Namespace) -> tuple[int, int]:
    size = args.image_size * 2 if len(args.image_size) == 1 else args.image_size
    if len(size) != 2 or min(size) < 1 or max(size) > MAX_IMAGE_SIZE:
        raise UserError(f"--image-size {' '.join(map(str, args.image_size))}: "
                        f"give one or two integers from 1 to {MAX_IMAGE_SIZE}")
    for flag in ("epochs", "batch_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if args.lr <= 0:
        raise UserError(f"--lr {args.lr}: must be positive")
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: must be 0 or more")
    return size[0], size[1]


def main(args: argparse.Namespace) -> None:
    image_size = check_args(args)
    seed_everything(args.seed)
    device = resolve_device(args.device)
    cfg = PreprocessConfig(image_size=image_size)
    train_set, val_set, train_loader, val_loader = load_data(args, cfg, device)
    classes = train_set.classes
    model = build_model(args.arch, len(classes), args.weights, args.weights_file)
    check_input_size(model, args.arch, image_size)
    check_batches(model, args, len(train_set))
    if args.freeze_backbone:
        head = {id(p) for p in head_parameters(model)}
        for p in model.parameters():
            p.requires_grad_(id(p) in head)
    model = model.to(device, memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "checkpoint.pth"
    history, best_acc, best_state, start_epoch = [], -1.0, None, 1
    if args.resume:
        if not checkpoint_path.is_file():
            raise UserError(f"--resume: {checkpoint_path} not found; train without --resume first")
        state = load_checkpoint(checkpoint_path, map_location=device)
        if state["arch"] != args.arch or state["classes"] != classes:
            raise UserError(f"--resume: {checkpoint_path} was trained as {state['arch']} on other classes")
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):  # the loss scale learned so far, not 65536 again
                scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as e:  # e.g. --freeze-backbone changed since
            raise UserError(f"--resume: {checkpoint_path} does not fit this run's flags "
                            f"({str(e).strip().splitlines()[0][:160]})") from None
        history, best_acc, best_state = state["history"], state["best_acc"], state["best_model"]
        start_epoch = state["epoch"] + 1
    print(f"training {args.arch} on {len(train_set)} images, validating on {len(val_set)}, "
          f"{len(classes)} classes, {image_size[0]}x{image_size[1]}, device {device}")

    start = time.perf_counter()
    for epoch in range(start_epoch, args.epochs + 1):
        epoch_start = time.perf_counter()
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        row.update(train_one_epoch(model, train_loader, optimizer, scaler, device, epoch, args.epochs))
        row.update(evaluate(model, val_loader, device))
        row["seconds"] = time.perf_counter() - epoch_start
        scheduler.step()
        history.append(row)
        if row["val_acc"] > best_acc:
            best_acc = row["val_acc"]
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        print(f"epoch {epoch}/{args.epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
              f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} error {row['val_error']:.4f} | "
              f"{row['images_per_s']:.0f} img/s, {row['seconds']:.1f}s")
        save_checkpoint({"model": model.state_dict(), "best_model": best_state,
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict(), "epoch": epoch, "args": vars(args), "arch": args.arch, "classes": classes,
                         "preprocess": cfg.to_dict(), "history": history, "best_acc": best_acc},
                        checkpoint_path)
    train_seconds = time.perf_counter() - start

    model.load_state_dict(best_state)
    difference = export_torchscript(model, out / "model.pt", image_size)
    save_labels(classes, out / "index_to_name.json")
    cfg.save(out / "preprocess.json")
    best = max(history, key=lambda h: h["val_acc"])
    metrics = {"arch": args.arch, "classes": classes, "image_size": list(image_size), "history": history,
               "best_epoch": best["epoch"], "best_val_acc": best["val_acc"],
               "final_val_acc": history[-1]["val_acc"],
               "train_seconds": train_seconds, "export_max_logit_difference": difference}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    plot_curves(history, out / "training_curves.png")
    print(f"done: best val acc {best['val_acc']:.4f} at epoch {best['epoch']} of {len(history)}, "
          f"{train_seconds:.0f}s; model.pt checked against eager (max diff {difference:.1e}) -> {out}")


cli = command(main, get_args_parser)
