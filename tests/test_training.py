"""Training stage: list parsing, labels, class-folder lists, heads, smoke training, export, weights."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from core.errors import UserError, run_main
from handler import device
from handler.preprocessing import PreprocessConfig, load_tensor
from training import agreement, export, lists, train
from training.dataset import ImageListDataset, read_list
from training.labels import load_labels, save_labels
from training.model import build_model
from training.sample_data import write_digits

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """500 real handwritten digits as class folders."""
    out = tmp_path_factory.mktemp("digits")
    write_digits(out, size=32, limit=500)
    return out


@pytest.fixture
def labels_file(tmp_path) -> Path:
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"0": "cat", "1": "dog"}))
    return path


def make_png(path: Path, color=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path)
    return path


def run_cli(module, argv: list[str], capsys) -> tuple[int, str]:
    """Run a CLI's main like `python -m` does; return (exit code, stderr)."""
    code = 0
    try:
        run_main(module.main, module.get_args_parser().parse_args(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# --- list files -------------------------------------------------------------

def test_read_list_resolves_relative_paths_and_skips_comments(tmp_path, labels_file):
    make_png(tmp_path / "img" / "a.png")
    make_png(tmp_path / "img" / "b b.png")
    (tmp_path / "train.list").write_text("# header\n\nimg/a.png\tcat\nimg/b b.png\tdog\n")
    samples = read_list(tmp_path / "train.list", load_labels(labels_file))
    assert samples == [((tmp_path / "img" / "a.png").resolve(), 0),
                       ((tmp_path / "img" / "b b.png").resolve(), 1)]


@pytest.mark.parametrize("content, message", [
    ("img/a.png cat\n", ":1: malformed line"),
    ("img/a.png\tcat\textra\n", ":1: malformed line"),
    ("img/a.png\tcow\n", ":1: label 'cow' is not in the labels file"),
    ("img/a.png\tcat\nimg/missing.png\tdog\n", ":2: image not found"),
    ("img/a.png\tcat\n# c\nimg/./a.png\tdog\n", ":3: duplicate entry 'img/./a.png', first listed at line 1"),
    ("img/text.png\tcat\n", ":1: cannot decode image"),
    ("# only a comment\n\n", "no samples"),
])
def test_read_list_bad_input_names_file_and_line(tmp_path, labels_file, content, message):
    make_png(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "text.png").write_text("not an image")
    (tmp_path / "bad.list").write_text(content)
    with pytest.raises(UserError) as info:
        read_list(tmp_path / "bad.list", load_labels(labels_file))
    assert str(tmp_path / "bad.list") in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize("content, message", [
    ('{"0": "cat", "2": "dog"}', "contiguous from 0"),
    ('{"0": "cat", "0": "dog"}', "duplicate index '0'"),
    ('{"0": "cat", "00": "dog"}', "key '00' is not an integer index"),
    ('{"0": "cat", " 1": "dog"}', "key ' 1' is not an integer index"),
    ('{"0": "cat", "0_1": "dog"}', "key '0_1' is not an integer index"),
    ('{"0": "cat", "1": "cat"}', "used by two indices"),
    ('{"a": "cat"}', "not an integer index"),
    ('["cat", "dog"]', "expected a non-empty object"),
    ('{"0": "cat",', "not valid JSON"),
])
def test_load_labels_rejects_bad_maps(tmp_path, content, message):
    path = tmp_path / "labels.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as info:
        load_labels(path)
    assert str(path) in str(info.value)


def test_load_labels_of_40000_classes(tmp_path):
    # a count per key made this quadratic (20 s in every worker at start); no time is asserted here
    names = [f"class {i}" for i in range(40000)]
    save_labels(names, tmp_path / "labels.json")
    assert load_labels(tmp_path / "labels.json") == names


def test_dataset_pickles_for_spawned_dataloader_workers(tmp_path, labels_file):
    make_png(tmp_path / "a.png", (10, 200, 30))
    (tmp_path / "val.list").write_text("a.png\tdog\n")
    dataset = ImageListDataset(tmp_path / "val.list", labels_file, PreprocessConfig(image_size=(16, 16)))
    copy = pickle.loads(pickle.dumps(dataset))  # what a spawn/forkserver worker receives
    assert torch.equal(copy[0][0], dataset[0][0]) and copy[0][1] == dataset[0][1]


def test_dataset_items_match_shared_preprocessing(tmp_path, labels_file):
    make_png(tmp_path / "a.png", (10, 200, 30))
    (tmp_path / "val.list").write_text("a.png\tdog\n")
    cfg = PreprocessConfig(image_size=(16, 16))
    dataset = ImageListDataset(tmp_path / "val.list", labels_file, cfg)
    tensor, target = dataset[0]
    assert len(dataset) == 1 and target == 1
    assert tensor.shape == (3, 16, 16)
    assert torch.equal(tensor, load_tensor(tmp_path / "a.png", cfg))


# --- class-folder lists ------------------------------------------------------

def test_lists_stratified_and_deterministic(tmp_path, capsys):
    for cls, count in (("cat", 10), ("dog", 20)):
        for i in range(count):
            make_png(tmp_path / "tree" / cls / ("sub" if i % 2 else "") / f"{i}.{'PNG' if i % 3 else 'jpeg'}")
    (tmp_path / "tree" / "dog" / "notes.txt").write_text("not an image")
    for name in ("a", "b"):
        argv = [str(tmp_path / "tree"), "--out", str(tmp_path / name), "--seed", "3"]
        assert run_cli(lists, argv, capsys)[0] == 0
    for name in ("train.list", "val.list", "labels.json"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    val = [line.split("\t")[1] for line in (tmp_path / "a" / "val.list").read_text().splitlines()]
    train_rows = (tmp_path / "a" / "train.list").read_text().splitlines()
    assert val.count("cat") == 2 and val.count("dog") == 4
    assert len(train_rows) == 24 and not any("notes.txt" in r for r in train_rows)
    assert load_labels(tmp_path / "a" / "labels.json") == ["cat", "dog"]
    samples = read_list(tmp_path / "a" / "train.list", ["cat", "dog"])  # the written list is valid
    assert len(samples) == 24


def test_lists_refuses_empty_class_naming_it(tmp_path, capsys):
    make_png(tmp_path / "tree" / "cat" / "a.png")
    (tmp_path / "tree" / "dog").mkdir()
    code, err = run_cli(lists, [str(tmp_path / "tree"), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "class 'dog' has no images" in err


def test_lists_refuses_empty_tree(tmp_path, capsys):
    (tmp_path / "tree").mkdir()
    code, err = run_cli(lists, [str(tmp_path / "tree"), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "no class folders" in err


# --- models ------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "squeezenet1_1"])
def test_build_model_replaces_head(arch):
    model = build_model(arch, 7).eval()
    with torch.inference_mode():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 7)


def test_build_model_unknown_arch_is_a_user_error():
    with pytest.raises(UserError, match="not a torchvision classification model"):
        build_model("resnet_nope", 3)


def test_pretrained_weights_from_local_hub_cache(tmp_path, monkeypatch):
    import torchvision
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(UserError, match=r"not in the local torch hub cache.*put the file at"):
        build_model("mobilenet_v3_small", 4, weights="DEFAULT")
    reference = torchvision.models.mobilenet_v3_small()
    url = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / Path(url).name)
    model = build_model("mobilenet_v3_small", 4, weights="DEFAULT")
    assert torch.equal(model.features[0][0].weight, reference.features[0][0].weight)
    assert model.classifier[-1].out_features == 4
    weights_file = str(tmp_path / "hub" / "checkpoints" / Path(url).name)
    from_file = build_model("mobilenet_v3_small", 4, weights_file=weights_file)
    assert torch.equal(from_file.features[0][0].weight, reference.features[0][0].weight)


# --- export --------------------------------------------------------------------

def test_export_reloaded_torchscript_matches_eager(tmp_path):
    model = build_model("resnet18", 5).eval()
    difference = export.export_torchscript(model, tmp_path / "model.pt", (32, 32))
    assert difference <= export.TOLERANCE
    reloaded = torch.jit.load(str(tmp_path / "model.pt"))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # same weights and layout, other graph executor: the export tolerance
        assert (reloaded(x) - model(x)).abs().max().item() <= export.TOLERANCE


def test_export_fails_loudly_on_mismatch(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "max_logit_difference", lambda *a, **k: 0.5)
    with pytest.raises(export.ExportMismatch, match="not safe to serve"):
        export.export_torchscript(build_model("resnet18", 3), tmp_path / "model.pt", (32, 32))


# --- training smoke test ---------------------------------------------------------

def test_train_two_epochs_on_real_digits(digits, tmp_path, capsys, monkeypatch):
    assert run_cli(lists, [str(digits), "--out", str(tmp_path / "lists")], capsys)[0] == 0
    out = tmp_path / "run"
    argv = ["--train-list", str(tmp_path / "lists/train.list"),
            "--val-list", str(tmp_path / "lists/val.list"),
            "--labels", str(tmp_path / "lists/labels.json"), "--out", str(out), "--image-size", "32",
            "--epochs", "2", "--batch-size", "16", "--lr", "2e-3", "--workers", "0"]
    code, err = run_cli(train, argv, capsys)
    assert code == 0, err
    for name in ("checkpoint.pth", "model.pt", "index_to_name.json", "preprocess.json", "metrics.json",
                 "training_curves.png"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 2
    assert metrics["best_val_acc"] > 0.3, metrics["history"]  # chance is 0.1 with 10 classes
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=False)
    assert checkpoint["arch"] == "resnet18" and checkpoint["classes"] == [str(i) for i in range(10)]
    assert checkpoint["preprocess"]["image_size"] == [32, 32] and checkpoint["epoch"] == 2
    assert PreprocessConfig.load(out / "preprocess.json").image_size == (32, 32)
    assert load_labels(out / "index_to_name.json") == checkpoint["classes"]
    # The exported file reproduces the best checkpoint, and export from the checkpoint agrees.
    assert run_cli(export, ["--checkpoint", str(out / "checkpoint.pth"), "--out", str(tmp_path / "again.pt")],
                   capsys)[0] == 0
    a, b = torch.jit.load(str(out / "model.pt")), torch.jit.load(str(tmp_path / "again.pt"))
    a_state, b_state = a.state_dict(), b.state_dict()
    assert a_state.keys() == b_state.keys()
    assert all(torch.equal(a_state[k], b_state[k]) for k in a_state)  # the same weights, exactly
    assert all(t.is_contiguous() for t in a_state.values())  # model.pt does not keep training's channels_last
    # Same weights and layout: outputs within the export tolerance (kernels vary by CPU, not by file).
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert (a(x) - b(x)).abs().max().item() <= export.TOLERANCE
    # --resume continues from the saved epoch
    resume = argv[:-6] + ["--epochs", "3", "--batch-size", "16", "--workers", "0", "--resume"]
    code, err = run_cli(train, resume, capsys)
    assert code == 0, err
    assert [h["epoch"] for h in json.loads((out / "metrics.json").read_text())["history"]] == [1, 2, 3]
    resumed = torch.load(out / "checkpoint.pth", weights_only=False)
    assert resumed["scaler"] == checkpoint["scaler"] == {}  # no loss scaling on the CPU: saved all the same
    # The agreement gate on this run. bf16 is pretended present where the CPU lacks it (its kernels
    # then emulate it, slowly but correctly): what is tested is the gate, not the hardware.
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    gate = ["--checkpoint", str(out / "checkpoint.pth"), "--check-precision", "bf16"]
    code, err = run_cli(export, gate + ["--min-agreement", "90", "--max-accuracy-drop", "5"], capsys)
    assert code == 0, err
    report = json.loads((out / "precision-bf16.json").read_text())
    assert report["images"] == len((tmp_path / "lists/val.list").read_text().splitlines())
    assert report["passed"] and report["min_agreement"] == 90 and report["max_accuracy_drop"] == 5
    assert report["agreement"] >= 90 and abs(report["accuracy_fp32"] - report["accuracy"]) <= 5
    # bf16 keeps 8 significant bits: probabilities move by about 1e-2, never by 0.5.
    assert 0 <= report["p99_probability_difference"] <= report["max_probability_difference"] < 0.5
    assert report["model_sha256"] == agreement.file_sha256(out / "model.pt")
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    code, err = run_cli(export, gate, capsys)
    assert code == 2 and err.strip() == ("error: --check-precision bf16: the CPU cannot run it: no native bf16 "
                                         "(none of the flags avx512_bf16, amx_bf16 in /proc/cpuinfo)")


@pytest.mark.parametrize("extra, message", [
    (["--image-size", "0"], "--image-size 0"),
    (["--arch", "nonet"], "--arch nonet"),
    (["--epochs", "0"], "--epochs 0"),
])
def test_train_bad_flags_exit_2_with_one_line(digits, tmp_path, capsys, extra, message):
    assert run_cli(lists, [str(digits), "--out", str(tmp_path / "lists")], capsys)[0] == 0
    argv = ["--train-list", str(tmp_path / "lists/train.list"),
            "--val-list", str(tmp_path / "lists/val.list"),
            "--labels", str(tmp_path / "lists/labels.json"), "--out", str(tmp_path / "run"), "--workers", "0"]
    code, err = run_cli(train, argv + extra, capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_cli_user_error_is_one_line_without_traceback(tmp_path):
    (tmp_path / "labels.json").write_text('{"0": "a", "1": "b"}')
    (tmp_path / "train.list").write_text("missing.png\ta\n")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"),
                             "--train-list", str(tmp_path / "train.list"),
                             "--val-list", str(tmp_path / "train.list"),
                             "--labels", str(tmp_path / "labels.json"),
                             "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    expected = f"error: {tmp_path / 'train.list'}:1: image not found: {tmp_path / 'missing.png'}"
    assert result.stderr.strip() == expected


def test_precision_gate_verdict_and_its_one_line_failure(tmp_path, capsys, monkeypatch):
    figures = {"precision": "bf16", "agreement": 99.4, "accuracy_fp32": 97.0, "accuracy": 96.4}
    assert agreement.verdict({**figures, "agreement": 99.5, "accuracy": 96.5}, 99.5, 0.5) == []
    assert agreement.verdict(figures, 99.5, 0.5) == [
        "top-1 agreement with fp32 99.40 % < 99.5 %",
        "accuracy 96.40 % is 0.60 points under fp32's 97.00 % (> 0.5)"]
    assert agreement.verdict(figures, 99, 1) == []  # the flags move both thresholds
    # The CLI on a failing measurement (measure replaced: the figures above, no model run).
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(b"model")
    monkeypatch.setattr(export, "load_checkpoint", lambda path: {"args": {"val_list": "val.list"}})
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(agreement, "measure", lambda *a: {**figures, "device": "the CPU", "images": 500,
                                                          "max_probability_difference": 0.02,
                                                          "p99_probability_difference": 0.01,
                                                          "seconds_fp32": 1.0, "seconds": 0.5})
    code, err = run_cli(export, ["--checkpoint", str(run / "checkpoint.pth"), "--check-precision", "bf16"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: precision gate failed: top-1 agreement with fp32 99.40 % < 99.5 %; accuracy")
    report = json.loads((run / "precision-bf16.json").read_text())
    assert report["passed"] is False and len(report["failures"]) == 2


def test_agreement_holds_one_batch_of_decoded_images_at_a_time(tmp_path, monkeypatch):
    # A 50,000-image validation list at 224 px decoded up front is ~30 GB: measure must decode a batch,
    # run both models on it and move on (issue 25, item 16).
    from tests.tiny_model import make_tiny_run
    run = make_tiny_run(tmp_path / "run")
    labels = load_labels(run / "index_to_name.json")
    lines = []
    for i in range(3 * agreement.BATCH_SIZE + 1):
        make_png(tmp_path / "val" / f"{i}.png", ((i * 40) % 256, 200, 30))
        lines.append(f"{tmp_path / 'val' / f'{i}.png'}\t{labels[i % len(labels)]}")
    (tmp_path / "val.list").write_text("\n".join(lines) + "\n")
    events = []
    decode, forward = agreement.load_tensor, agreement.served_probabilities
    monkeypatch.setattr(agreement, "load_tensor", lambda *a, **k: events.append("decode") or decode(*a, **k))
    monkeypatch.setattr(agreement, "served_probabilities",
                        lambda *a, **k: events.append("forward") or forward(*a, **k))
    figures = agreement.measure(run, "fp32", tmp_path / "val.list", torch.device("cpu"))
    assert figures["images"] == len(lines) and figures["agreement"] == 100.0
    assert events.count("decode") == len(lines)  # each image decoded once, for both models
    last_decode = len(events) - 1 - events[::-1].index("decode")
    assert events.index("forward") < last_decode, "every image was decoded before the first forward pass"
