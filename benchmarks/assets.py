"""What the benchmark (scripts/benchmark.py) measures with: a model run, two image sets, .mar files, servers.

Everything is made under bench/ (git-ignored) and reused when it is already there, so a
second `make bench` spends its time measuring. Nothing is downloaded: captum, which TorchServe's
stock image_classifier handler imports, is pinned in requirements-test.txt (`make install`).
"""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from client.local_server import LocalServer
from handler.preprocessing import PreprocessConfig

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench"  # git-ignored: run folder, images, model store, server logs
SUMMARY = re.compile(r"ok (\d+), failed (\d+).*?; ([\d.]+) images/s over ([\d.]+)s; "
                     r"latency ms p50 ([\d.]+) p95 ([\d.]+)")

PYTHON = ROOT / ".venv" / "bin" / "python"
ARCHIVER = ROOT / ".venv" / "bin" / "torch-model-archiver"
PHOTO_SOURCES = ("china.jpg", "flower.jpg")  # scikit-learn's bundled photos, 640x427
PHOTO_NOISE = 4.0  # sensor-like grain (std, 0-255): a smooth upscale would compress far below a camera's


def _stamp_matches(folder: Path, settings: dict) -> bool:
    stamp = folder / ".settings.json"
    return stamp.is_file() and json.loads(stamp.read_text()) == settings


def _write_stamp(folder: Path, settings: dict) -> None:
    (folder / ".settings.json").write_text(json.dumps(settings, sort_keys=True) + "\n")


def make_run(run_dir: Path, arch: str, image_size: int, num_classes: int, seed: int) -> Path:
    """model.pt (random fixed-seed weights, verified TorchScript), labels and preprocess.json."""
    import torch

    from training.export import export_torchscript
    from training.model import build_model

    settings = {"arch": arch, "image_size": image_size, "num_classes": num_classes, "seed": seed}
    if _stamp_matches(run_dir, settings):
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    torch.manual_seed(seed)
    export_torchscript(build_model(arch, num_classes), run_dir / "model.pt", (image_size, image_size))
    labels = {str(i): str(i) for i in range(num_classes)}  # the digits' names, for both handlers
    (run_dir / "index_to_name.json").write_text(json.dumps(labels, indent=2) + "\n")
    PreprocessConfig(image_size=(image_size, image_size)).save(run_dir / "preprocess.json")
    _write_stamp(run_dir, settings)
    return run_dir


def make_packages(run_dir: Path, arch: str, image_size: int, num_classes: int, seed: int,
                  precisions: list[str], calibration: list[Path], batch_size: int) -> None:
    """RUN/model-P.pt2 for each P (training/aot.py): the same fixed-seed weights as model.pt, int8
    calibrated on `calibration` (the benchmark's own images). A package already made from this
    model.pt with this torch and recipe is kept (compiling takes minutes on a small CPU)."""
    import torch

    from handler import aot
    from handler.preprocessing import load_tensor
    from training import aot as export_aot
    from training.agreement import file_sha256
    from training.model import build_model

    model_sha = file_sha256(run_dir / "model.pt")
    cfg = PreprocessConfig.load(run_dir / "preprocess.json")
    for precision in precisions:
        out = export_aot.package_path(run_dir, precision)
        try:
            meta = aot.read_meta(out)
            if (meta["model_sha256"] == model_sha and meta["torch"] == torch.__version__
                    and meta.get("recipe") == export_aot.RECIPE and out.is_file()):
                continue
        except aot.PackageRefused:
            pass
        torch.manual_seed(seed)
        model = build_model(arch, num_classes)
        images = [load_tensor(p, cfg) for p in calibration] if precision == "int8" else None
        started = time.perf_counter()
        export_aot.export_pt2(model, out, precision, (image_size, image_size), batch_size, model_sha, images)
        print(f"benchmark: compiled {out.name} in {time.perf_counter() - started:.0f} s", flush=True)


def _fresh_folder(folder: Path, settings: dict) -> Path | None:
    """None when `folder` already holds this set; else an empty folder to write it into."""
    if _stamp_matches(folder, settings):
        return None
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def make_png_set(folder: Path, count: int) -> list[Path]:
    """`count` of scikit-learn's handwritten digits as 32x32 RGB PNGs.

    RGB, not the digits' grayscale: the stock handler feeds the decoded mode straight to
    ToTensor, so a 1-channel PNG would fail in the model; ours converts any mode.
    """
    from training.sample_data import write_digits

    settings = {"kind": "png", "count": count, "size": 32}
    if _fresh_folder(folder, settings) is not None:
        with tempfile.TemporaryDirectory() as tmp:
            write_digits(tmp, size=32, limit=count)
            for i, path in enumerate(sorted(Path(tmp).rglob("*.png"))):
                Image.open(path).convert("RGB").save(folder / f"digit_{path.parent.name}_{i:04d}.png")
        _write_stamp(folder, settings)
    return sorted(folder.glob("*.png"))


def make_photo_set(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """`count` camera-size JPEGs (q90) from scikit-learn's sample photos: crop, flip, upscale, grain."""
    from sklearn.datasets import load_sample_image

    width, height = size
    settings = {"kind": "photo", "count": count, "size": [width, height], "seed": seed, "noise": PHOTO_NOISE}
    if _fresh_folder(folder, settings) is not None:
        rng = np.random.default_rng(seed)
        sources = [Image.fromarray(load_sample_image(name)) for name in PHOTO_SOURCES]
        for i in range(count):
            img = sources[i % len(sources)]
            scale = rng.uniform(0.7, 1.0)  # a different crop for every file
            w, h = int(img.width * scale), int(img.height * scale)
            left, top = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
            img = img.crop((left, top, left + w, top + h))
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            pixels = np.asarray(img.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
            pixels += rng.normal(0.0, PHOTO_NOISE, size=(height, width, 1)).astype(np.float32)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                folder / f"photo_{i:03d}.jpg", "JPEG", quality=90)
        _write_stamp(folder, settings)
    return sorted(folder.glob("*.jpg"))


def archive_project(run_dir: Path, store: Path, name: str, version: str = "1.0", *flags: str, **env: str) -> str:
    """This project's .mar, made by scripts/archive.sh exactly as users make it (`flags` passed on)."""
    subprocess.run(["bash", str(ROOT / "scripts" / "archive.sh"), str(run_dir), name, version, "--force", *flags],
                   check=True, env={**os.environ, "MODEL_STORE": str(store), **env}, stdout=subprocess.DEVNULL)
    return f"{name}-{version}.mar"


def archive_stock(run_dir: Path, store: Path, name: str, version: str = "1.0") -> str:
    """TorchServe's stock image_classifier handler on the same model.pt and labels (batch size 1)."""
    with tempfile.TemporaryDirectory(dir=store) as work:
        subprocess.run([str(ARCHIVER), "--model-name", name, "--version", version,
                        "--serialized-file", str(run_dir / "model.pt"), "--handler", "image_classifier",
                        "--extra-files", str(run_dir / "index_to_name.json"), "--export-path", work],
                       check=True)
        os.replace(Path(work) / f"{name}.mar", store / f"{name}-{version}.mar")
    return f"{name}-{version}.mar"


def handler_files_at(revision: str, folder: Path) -> Path:
    """The handler folder as it was at a git revision (to measure a change against its parent)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", revision, "handler/"],
                           check=True, capture_output=True, text=True).stdout.split()
    for name in names:
        data = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{name}"],
                              check=True, capture_output=True).stdout
        (folder / Path(name).name).write_bytes(data)
    (folder / "__init__.py").touch()  # older revisions had none
    return folder


def archive_variant(run_dir: Path, store: Path, name: str, handler_dir: Path,
                    model_config: dict[str, object]) -> str:
    """scripts/archive.sh from `handler_dir`, with model-config.yaml keys overridden."""
    import yaml

    config = yaml.safe_load((handler_dir / "model-config.yaml").read_text()) or {}
    for key, value in model_config.items():  # "handler.cpu_threads" sets a key of the handler section
        section, _, leaf = key.rpartition(".")
        (config.setdefault(section, {}) if section else config)[leaf] = value
    with tempfile.TemporaryDirectory(dir=store) as work:
        (Path(work) / "model-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        return archive_project(run_dir, store, name, HANDLER_DIR=str(handler_dir),
                               MODEL_CONFIG=str(Path(work) / "model-config.yaml"))


class CpuMeter:
    """CPU seconds of this process, its finished children (the client) and a server's processes."""

    def __init__(self, server: LocalServer | None = None):
        self.frontend = psutil.Process(server.pid()) if server else None
        self.workers = self.frontend.children(recursive=True) if self.frontend else []
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        def used(times) -> float:
            return times.user + times.system
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        reading = {"this process": time.process_time(), "client": children.ru_utime + children.ru_stime}
        if self.frontend:
            reading["frontend (Java)"] = used(self.frontend.cpu_times())
            reading["workers"] = sum(used(w.cpu_times()) for w in self.workers if w.is_running())
        return reading

    def per_image(self, images: int, parts: tuple[str, ...]) -> dict[str, float]:
        """ms of CPU per image since construction, for the named parts."""
        end = self._read()
        return {part: (end[part] - self.start[part]) * 1000 / images for part in parts}
