"""scripts/archive.sh: input checks, the .mar's manifest and contents, and the handler loaded from it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.image_zoo import GREEN, png_bytes
from tests.tiny_model import make_tiny_run

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT / "scripts" / "archive.sh"
# The handler ships as the `handler` package (imported as in the repository) beside TorchServe's
# entry file, which the archiver always puts at the root.
MAR_FILES = ({"MAR-INF/MANIFEST.json", "model.pt", "classifier_handler.py", "index_to_name.json",
              "preprocess.json", "model-config.yaml"}
             | {f"handler/{p.name}" for p in (ROOT / "handler").glob("*.py")})  # the whole package

# Runs in a fresh interpreter, from the unzipped folder, as TorchServe's worker does: the folder on
# sys.path, the handler imported by module name, then one batch answered in the worker's wire format.
WORKER = r"""
import json, os, struct, sys
folder = sys.argv[1]
sys.path.insert(0, folder)
import ts
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.model_loader import TsModelLoader
metrics_yaml = os.path.join(os.path.dirname(ts.__file__), "configs", "metrics.yaml")
cache = MetricsCacheYamlImpl(config_file_path=metrics_yaml)
cache.initialize_cache()
manifest = json.load(open(os.path.join(folder, "MAR-INF", "MANIFEST.json")))
service = TsModelLoader().load("tiny", folder, manifest["model"]["handler"], None, 8, None, True, cache)
service.set_cl_socket(None)
rows = [("image/png", open(sys.argv[2], "rb").read()), ("text/plain", b"not an image")]
batch = [{"requestId": f"r{i}".encode(), "parameters": [{"name": "body", "contentType": ct, "value": v}]}
         for i, (ct, v) in enumerate(rows)]
msg = bytes(service.predict(batch))
pos = 0
def take_int():
    global pos
    pos += 4
    return struct.unpack("!i", msg[pos - 4:pos])[0]
def take_bytes():
    global pos
    n = take_int()
    pos += n
    return msg[pos - n:pos]
answers = []
batch_code, batch_message = take_int(), take_bytes().decode()
while True:
    n = take_int()
    if n == -1:
        break
    pos += n
    content_type, status, phrase = take_bytes().decode(), take_int(), take_bytes().decode()
    headers = {take_bytes().decode(): take_bytes().decode() for _ in range(take_int())}
    answers.append({"status": status, "phrase": phrase, "content_type": content_type,
                    "body": json.loads(take_bytes())})
print(json.dumps({"batch_code": batch_code, "answers": answers,
                  "handler_package": sys.modules["handler"].__file__,
                  "handler_file": sys.modules["classifier_handler"].__file__}))
"""


def archive(*args: str, cwd: Path, store: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MODEL_STORE": str(store)}
    return subprocess.run(["bash", str(ARCHIVE), *args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """One archive built from a relative run path, from a folder outside the repository."""
    base = tmp_path_factory.mktemp("archive")
    make_tiny_run(base / "run")
    result = archive("run", "tiny", "1.2", cwd=base, store=base / "store")
    return base, base / "store" / "tiny-1.2.mar", result


def test_archive_writes_name_version_mar(built):
    base, mar, result = built
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in mar.parent.iterdir()) == ["tiny-1.2.mar"]  # no temp folder left
    assert result.stdout.strip().splitlines()[-1].startswith(f"archive: {mar} (")


def test_manifest_and_contents(built):
    _, mar, _ = built
    with zipfile.ZipFile(mar) as z:
        assert set(z.namelist()) == MAR_FILES
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
        config = yaml.safe_load(z.read("model-config.yaml"))
        assert z.read("handler/preprocessing.py") == (ROOT / "handler" / "preprocessing.py").read_bytes()
    assert manifest["modelName"] == "tiny" and manifest["modelVersion"] == "1.2"
    assert manifest["handler"] == "classifier_handler.py" and manifest["serializedFile"] == "model.pt"
    assert manifest["configFile"] == "model-config.yaml" and config["batchSize"] == 8


def test_handler_loaded_from_the_unzipped_mar_answers(built, tmp_path):
    _, mar, _ = built
    folder = tmp_path / "unzipped"
    zipfile.ZipFile(mar).extractall(folder)
    image = tmp_path / "green.png"
    image.write_bytes(png_bytes(GREEN))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the repository must not be importable
    result = subprocess.run([sys.executable, "-c", WORKER, str(folder), str(image)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["handler_package"]).parent == folder / "handler"  # the .mar's, not the repository's
    assert Path(report["handler_file"]).parent == folder
    assert report["batch_code"] == 200
    good, bad = report["answers"]
    assert good["status"] == 200 and good["content_type"] == "application/json"
    assert good["body"][0]["label"] == "class_1" and len(good["body"]) == 3
    assert bad["status"] == 400 and bad["body"]["code"] == 400 and bad["phrase"] == bad["body"]["error"]


def test_refuses_to_overwrite_without_force(built):
    base, mar, _ = built
    before = mar.read_bytes()
    result = archive(str(base / "run"), "tiny", "1.2", cwd=ROOT, store=mar.parent)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {mar} exists; pass --force to overwrite it"
    assert mar.read_bytes() == before
    forced = archive(str(base / "run"), "tiny", "1.2", "--force", cwd=ROOT, store=mar.parent)
    assert forced.returncode == 0, forced.stderr
    assert sorted(p.name for p in mar.parent.iterdir()) == ["tiny-1.2.mar"]


def test_names_every_missing_run_file(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "preprocess.json").write_text("{}")
    result = archive("run", "tiny", "1", cwd=tmp_path, store=tmp_path / "store")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: missing: run/model.pt run/index_to_name.json"
    assert not (tmp_path / "store" / "tiny-1.mar").exists()


@pytest.mark.parametrize("image_size", [[20000, 20000], [224, 4097]])
def test_an_image_size_above_the_bound_is_refused_before_any_tensor(tmp_path, image_size):
    # 20000x20000 made the output check allocate 4.8 GB; every reader of preprocess.json refuses it
    run = make_tiny_run(tmp_path / "run")
    config = json.loads((run / "preprocess.json").read_text())
    (run / "preprocess.json").write_text(json.dumps({**config, "image_size": image_size}))
    result = archive("run", "tiny", "1", cwd=tmp_path, store=tmp_path / "store")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (f"run/preprocess.json: image_size must be two integers [H, W] from 1 to 4096, "
            f"got {image_size}") in result.stderr
    assert not (tmp_path / "store" / "tiny-1.mar").exists()


@pytest.mark.parametrize("args, message", [
    (["run", "tiny"], "expected RUN_DIR NAME VERSION, got 2 argument(s)"),
    (["run", "tiny", "1", "extra"], "expected RUN_DIR NAME VERSION, got 4 argument(s)"),
    (["run", "tiny", "1", "--forse"], "unknown option --forse"),
    (["nowhere", "tiny", "1"], "run folder not found: nowhere"),
    (["run", "ti/ny", "1"], "NAME 'ti/ny' must be"),
    (["run", "tiny", "1 0"], "VERSION '1 0' must be"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, args, message):
    make_tiny_run(tmp_path / "run")
    result = archive(*args, cwd=tmp_path, store=tmp_path / "store")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: ") and message in result.stderr


def test_refuses_labels_that_do_not_match_the_model(tmp_path):
    run = make_tiny_run(tmp_path / "run")
    (run / "index_to_name.json").write_text(json.dumps({"0": "only_one"}))
    result = archive("run", "tiny", "1", cwd=tmp_path, store=tmp_path / "store")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "outputs 3 classes but index_to_name.json names 1" in result.stderr
    assert not (tmp_path / "store" / "tiny-1.mar").exists()


def packaged(mar: Path) -> tuple[set[str], dict]:
    with zipfile.ZipFile(mar) as z:
        return set(z.namelist()), yaml.safe_load(z.read("model-config.yaml"))


def test_precision_needs_a_passing_report_on_this_model(tmp_path):
    from training.agreement import file_sha256

    run = make_tiny_run(tmp_path / "run")
    store = tmp_path / "store"
    refused = archive(str(run), "tiny", "1", "--precision", "bf16", cwd=ROOT, store=store)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "--precision bf16 needs a passing agreement report (precision-bf16.json; none found)" in refused.stderr
    assert "--check-precision bf16" in refused.stderr and not list(store.glob("*.mar"))
    # A passing report on another model.pt does not count.
    report = {"precision": "bf16", "passed": True, "agreement": 100.0, "model_sha256": "0" * 64}
    (run / "precision-bf16.json").write_text(json.dumps(report))
    stale = archive(str(run), "tiny", "1", "--precision", "auto", cwd=ROOT, store=store)
    assert stale.returncode == 2 and "precision-bf16.json found but not passed for this model.pt" in stale.stderr
    report["model_sha256"] = file_sha256(run / "model.pt")
    (run / "precision-bf16.json").write_text(json.dumps(report))
    done = archive(str(run), "tiny", "1", "--precision", "bf16", cwd=ROOT, store=store)
    assert done.returncode == 0, done.stderr
    names, config = packaged(store / "tiny-1.mar")
    assert names == MAR_FILES | {"precision-bf16.json"} and config["handler"]["precision"] == "bf16"
    assert config["batchSize"] == 8 and config["handler"]["topk"] == 5  # every other setting as before


def test_no_precision_check_packages_without_a_report(tmp_path):
    run = make_tiny_run(tmp_path / "run")
    result = archive(str(run), "tiny", "1", "--precision=fp16", "--no-precision-check", cwd=ROOT,
                     store=tmp_path / "store")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("precision fp16)")
    names, config = packaged(tmp_path / "store" / "tiny-1.mar")
    assert names == MAR_FILES and config["handler"]["precision"] == "fp16"
    bad = archive(str(run), "tiny", "2", "--precision", "int8", cwd=ROOT, store=tmp_path / "store")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: --precision int8: expected fp32, bf16, fp16 or auto"
