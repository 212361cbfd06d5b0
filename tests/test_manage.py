"""scripts/manage.py against a real TorchServe of its own (models come and go in these tests)."""
from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from client.local_server import free_ports
from client.rollout import read_manifest
from core import errors
from core.http import new_session
from core.keys import request_with_key
from tests.conftest import COLORS, PYTHON, REPO, rows_written, server_without_models, wait_for, write_images

pytestmark = pytest.mark.integration

MANAGE = REPO / "scripts" / "manage.py"
CLIENT = REPO / "scripts" / "classify_dir.py"
LOAD_IMAGES, CONCURRENCY = 1200, 16
# Batches of 32 that never fill at 16 in flight: each waits 200 ms, so the load runs at about
# 80 images/s on any machine and lasts long enough (~15 s) for a rollout to happen inside it.
THROTTLE = ("--batch-size", "32", "--max-batch-delay", "200")


def clone_mar(source: Path, target: Path, name: str, version: str, replace: dict | None = None) -> Path:
    """A copy of an archive with another name/version in its manifest and some files replaced."""
    replace = replace or {}
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            data = replace.get(info.filename, src.read(info.filename))
            if info.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"].update(modelName=name, modelVersion=version)
                data = json.dumps(manifest, indent=2).encode()
            out.writestr(info, data)
    return target


def server_flags(srv) -> list[str]:
    return ["--url", srv.inference_url, "--management-url", srv.management_url,
            "--token-file", str(srv.key_file)]


def manage_args(srv, command: str, *args: str) -> list[str]:
    store = ["--model-store", str(srv.store)] if command in ("register", "rollout") else []
    if command in ("register", "unregister", "rollout"):  # the server's logs: workers' reasons and batches
        store += ["--log-dir", str(srv.log_dir)]
    return [str(PYTHON), str(MANAGE), command, *args, *server_flags(srv), *store]


def run_manage(srv, command: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """manage.py from an unrelated folder, output captured."""
    return subprocess.run(manage_args(srv, command, *args), cwd=srv.base, capture_output=True,
                          text=True, timeout=timeout)


def versions(srv, name: str) -> dict[str, dict]:
    return {v["modelVersion"]: v for v in srv.api().versions(name)}


def default(srv, name: str) -> str | None:
    return srv.api().default_version(name)


def predict(srv, name: str, color: str = "red", version: str | None = None):
    path = f"/predictions/{name}" + (f"/{version}" if version else "")
    buf = Path(srv.base / f"{color}.png")
    Image.new("RGB", (8, 8), COLORS[color]).save(buf)
    return request_with_key(new_session(1), "POST", srv.inference_url + path, srv.keys(),
                                     "inference", data=buf.read_bytes(), timeout=30)


@pytest.fixture(scope="module")
def mserver(tmp_path_factory, tiny_run):
    """A TorchServe started with no model, for this module alone: its model set is ours to change."""
    srv = server_without_models(tmp_path_factory.mktemp("ts-manage"), tiny_run)
    for name in ("trip", "tiny", "guard"):
        for version in ("1", "2"):
            clone_mar(srv.source_mar, srv.store / f"{name}-{version}.mar", name, version)
    with srv.running():
        yield srv


# ---- no server ----

def test_manifest_names_the_model_not_the_file_name(tmp_path):
    with zipfile.ZipFile(tmp_path / "tiny-9.mar", "w") as mar:
        manifest = {"model": {"modelName": "tiny", "modelVersion": "9"}}
        mar.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest))
    mar = clone_mar(tmp_path / "tiny-9.mar", tmp_path / "anything.mar", "digits", "2.1")
    assert read_manifest(mar) == ("digits", "2.1")
    (tmp_path / "broken.mar").write_bytes(mar.read_bytes()[:200])
    with pytest.raises(errors.Refused, match="not a readable model archive"):
        read_manifest(tmp_path / "broken.mar")


def test_usage_errors_exit_2_without_traceback(tmp_path):
    port = free_ports(1)[0]
    flags = ["--url", f"http://127.0.0.1:{port}", "--token-file", str(tmp_path / "none.json")]
    result = subprocess.run([str(PYTHON), str(MANAGE), "list", *flags], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: --token-file not found")
    (tmp_path / "key_file.json").write_text("{}")
    flags[-1] = str(tmp_path / "key_file.json")
    result = subprocess.run([str(PYTHON), str(MANAGE), "list", *flags], capture_output=True, text=True)
    assert result.returncode == 3 and "server unreachable" in result.stderr  # worth retrying later
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = subprocess.run([str(PYTHON), str(MANAGE), "rollout", "x.mar", "--min-accuracy", "0.9", *flags],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--min-accuracy needs --smoke-dir" in result.stderr


# ---- a real server ----

def test_register_describe_scale_set_default_unregister_round_trip(mserver, tmp_path):
    srv = mserver
    result = run_manage(srv, "register", "trip-1.mar", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "trip 1 (default): workers 1 READY" in result.stdout
    assert predict(srv, "trip").json()[0]["label"] == "red"

    # the errors: a missing archive, one outside the store, a version already registered
    result = run_manage(srv, "register", str(srv.store / "trip-7.mar"))
    assert result.returncode == 2 and "model archive not found" in result.stderr
    outside = clone_mar(srv.source_mar, tmp_path / "trip-3.mar", "trip", "3")
    result = run_manage(srv, "register", str(outside))
    assert result.returncode == 2 and "is not in the model store" in result.stderr
    result = run_manage(srv, "register", str(srv.store / "trip-1.mar"))
    assert result.returncode == 1 and "trip version 1 is already registered" in result.stderr
    assert "Traceback" not in result.stderr

    # name and version come from the manifest, whatever the file is called
    clone_mar(srv.source_mar, srv.store / "renamed.mar", "trip", "2")
    # --workers 2 although the archive's model-config.yaml caps the workers at 1
    result = run_manage(srv, "register", "renamed.mar", "--workers", "2", "--batch-size", "4",
                        "--max-batch-delay", "20")
    assert result.returncode == 0, result.stderr
    both = versions(srv, "trip")
    assert set(both) == {"1", "2"} and default(srv, "trip") == "1"
    assert (both["2"]["batchSize"], both["2"]["maxBatchDelay"]) == (4, 20)
    assert [w["status"] for w in both["2"]["workers"]] == ["READY", "READY"]

    result = run_manage(srv, "list")
    assert result.returncode == 0
    lines = [line for line in result.stdout.splitlines() if line.startswith("trip ")]
    assert lines[0].startswith("trip 1 (default): workers 1 READY") and lines[1].startswith("trip 2: ")
    result = run_manage(srv, "describe", "trip", "2")
    assert result.returncode == 0 and "worker " in result.stdout and ": READY, pid " in result.stdout
    assert "  precision fp32 on cpu (" in result.stdout  # the handler says what it serves, and why
    result = run_manage(srv, "describe", "trip", "--json")
    assert {v["modelVersion"] for v in json.loads(result.stdout)} == {"1", "2"}
    result = run_manage(srv, "describe", "nosuchmodel")
    assert result.returncode == 1 and "describe nosuchmodel: not registered" in result.stderr

    result = run_manage(srv, "scale", "trip", "2", "--min", "1")
    assert result.returncode == 0, result.stderr
    assert len(versions(srv, "trip")["2"]["workers"]) == 1
    result = run_manage(srv, "scale", "trip", "--min", "1", "--max", "3")  # the default version
    assert result.returncode == 0
    assert "scale: trip 1 (default): workers 1 READY (min 1, max 3)" in result.stdout
    result = run_manage(srv, "scale", "trip", "--min", "2", "--max", "1")
    assert result.returncode == 2 and "0 <= --min <= --max" in result.stderr

    result = run_manage(srv, "set-default", "trip", "2")
    assert result.returncode == 0 and default(srv, "trip") == "2"
    result = run_manage(srv, "set-default", "trip", "5")
    assert result.returncode == 1 and "404" in result.stderr and default(srv, "trip") == "2"

    # removing the default while another version exists: refused, and the message says what to do
    result = run_manage(srv, "unregister", "trip", "2")
    assert result.returncode == 1
    assert "trip 2 is the default version" in result.stderr and "set-default" in result.stderr
    assert set(versions(srv, "trip")) == {"1", "2"}
    result = run_manage(srv, "unregister", "trip", "1", "--drain-seconds", "0.2")
    assert result.returncode == 0 and "versions left: 2" in result.stdout
    assert predict(srv, "trip", "blue").json()[0]["label"] == "blue"
    result = run_manage(srv, "unregister", "trip", "1")
    assert result.returncode == 1 and "trip has no version 1" in result.stderr
    result = run_manage(srv, "unregister", "trip", "2", "--drain-seconds", "0.2")  # the last one may go
    assert result.returncode == 0 and versions(srv, "trip") == {}


def test_rollout_under_load_loses_no_request(mserver, tmp_path):
    srv = mserver
    images = tmp_path / "images"
    expected = write_images(images, LOAD_IMAGES)
    smoke = tmp_path / "smoke"
    write_images(smoke, 12)
    result = run_manage(srv, "register", "tiny-1.mar", *THROTTLE)
    assert result.returncode == 0, result.stderr

    output = tmp_path / "rows.jsonl"
    client = subprocess.Popen(
        [str(PYTHON), str(CLIENT), str(images), "--model", "tiny", "--class-folders", "--output", str(output),
         "--concurrency", str(CONCURRENCY), "--retries", "0", "--timeout", "30", *server_flags(srv)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rollout = None
    try:
        assert wait_for(lambda: rows_written(output) >= 100 or client.poll() is not None, 60)
        assert client.poll() is None, "the load finished before the rollout could start"
        rollout = subprocess.Popen(
            manage_args(srv, "rollout", "tiny-2.mar", "--smoke-dir", str(smoke), "--min-accuracy", "1.0",
                        *THROTTLE), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        switched_at, log = None, []
        for line in rollout.stdout:  # progress lines, one per step, flushed as they happen
            log.append(line)
            if switched_at is None and "is the default" in line:
                switched_at = rows_written(output)
        rollout_rc = rollout.wait(timeout=60)
        load_running_after_rollout = client.poll() is None
        out, err = client.communicate(timeout=120)
    finally:
        for proc in (client, rollout):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert rollout_rc == 0, "".join(log) + rollout.stderr.read()
    assert "tiny 1 -> 2 on 1 replica" in log[-1] and "12/12 smoke images ok, accuracy 1.0000" in "".join(log)
    assert client.returncode == 0, out + err
    assert load_running_after_rollout, "the load ended before v1 was unregistered: nothing was tested"

    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["path"] for r in rows) == sorted(expected)  # every file exactly once
    assert [r for r in rows if r["status"] != "ok"] == []
    assert all(r["label"] == r["true_label"] for r in rows)
    assert {r["model_version"] for r in rows} <= {"1", "2"} and rows[0]["model_version"] == "1"
    # At most CONCURRENCY requests were in flight at the switch; every row after them was sent
    # after it, so to the new default.
    after = rows[switched_at + CONCURRENCY:]
    assert len(after) >= 100, f"only {len(after)} rows after the switch"
    assert [r["path"] for r in after if r["model_version"] != "2"] == []
    assert set(versions(srv, "tiny")) == {"2"} and default(srv, "tiny") == "2"


@pytest.fixture
def guard(mserver):
    """Model `guard` serving version 1; removed after the test."""
    result = run_manage(mserver, "register", "guard-1.mar")
    assert result.returncode == 0, result.stderr
    yield mserver
    for version in versions(mserver, "guard"):
        if version != "1":
            run_manage(mserver, "unregister", "guard", version, "--drain-seconds", "0")
    run_manage(mserver, "unregister", "guard", "1", "--drain-seconds", "0")


FAILURES = {  # case -> (archive bytes from the good one, extra flags, what the error must say)
    "wrong-classes": ({"index_to_name.json": json.dumps({str(i): f"c{i}" for i in range(4)}).encode()},
                      False, "Failed to start workers"),
    "corrupt-model": ({"model.pt": b"this is not TorchScript" * 50}, False, "Failed to start workers"),
    "corrupt-zip": (None, False, "not a readable model archive"),
    "low-accuracy": ({}, True, "below --min-accuracy 0.9"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_failed_rollout_leaves_v1_default_and_removes_v2(guard, tmp_path, case):
    srv = guard
    replace, mislabel, reason = FAILURES[case]
    mar = srv.store / f"guard-bad-{case}.mar"
    clone_mar(srv.source_mar, mar, "guard", "2", replace)
    if replace is None:
        mar.write_bytes(mar.read_bytes()[: mar.stat().st_size // 2])
    smoke = tmp_path / "smoke"
    write_images(smoke, 6, mislabel=mislabel)

    result = run_manage(srv, "rollout", mar.name, "--smoke-dir", str(smoke), "--min-accuracy", "0.9")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], result.stderr
    if case != "corrupt-zip":
        assert "was rolled back" in lines[0] and "guard 1 is the default on" in lines[0]
    assert set(versions(srv, "guard")) == {"1"} and default(srv, "guard") == "1"
    answer = predict(srv, "guard", "green")
    assert answer.status_code == 200 and answer.json()[0]["label"] == "green"


def test_expired_management_key_is_renewed_with_the_api_key(mserver):
    srv = mserver
    keys = json.loads(srv.key_file.read_text())
    api_key = keys["API"]["key"]
    keys["management"]["key"] = "expired0"  # what a key older than 60 minutes amounts to
    srv.key_file.write_text(json.dumps(keys))
    result = run_manage(srv, "list")
    assert result.returncode == 0, result.stderr
    keys = json.loads(srv.key_file.read_text())
    assert keys["management"]["key"] != "expired0"  # TorchServe wrote a fresh key into its key file
    try:  # with a wrong API key too, nothing can renew it: one line, exit code 2
        srv.key_file.write_text(json.dumps({**keys, "management": {"key": "expired0"},
                                            "API": {"key": "wrongapi"}}))
        result = run_manage(srv, "list")
        assert result.returncode == 2 and "refused the key" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    finally:
        srv.key_file.write_text(json.dumps({**keys, "API": {"key": api_key}}))
