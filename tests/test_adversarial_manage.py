"""Regression probes of manage.py found by review, each through a real TorchServe of its own.

Every server here is started by a fixture's `running()` block, which stops it by its pid.
"""
from __future__ import annotations

import json
import re
import subprocess
import threading
import zipfile
from pathlib import Path

import pytest
import requests

from client.local_server import free_ports
from core.http import new_session
from core.keys import request_with_key
from tests.conftest import PYTHON, server_without_models, wait_for, write_images
from tests.test_manage import MANAGE, clone_mar, default, predict, server_flags, versions

pytestmark = pytest.mark.integration

SLOW_S = 3.0  # how long the slow handler holds each batch: far beyond the drain's quiet period
SLOW_HANDLER = f'''"""Test handler: the project's handler, every batch held {SLOW_S} s (a slow model)."""
import time

from classifier_handler import ClassifierHandler


class SlowHandler(ClassifierHandler):
    def handle(self, data, context):
        time.sleep({SLOW_S})
        return super().handle(data, context)
'''
SHIFTED = {"index_to_name.json": json.dumps({"0": "green", "1": "blue", "2": "red"}).encode()}  # off by one
FOUR_LABELS = {"index_to_name.json": json.dumps({str(i): f"c{i}" for i in range(4)}).encode()}


def slow_mar(source: Path, target: Path, name: str, version: str) -> Path:
    """A clone of `source` whose manifest names slow_handler.py, added to the archive."""
    clone_mar(source, target, name, version)
    with zipfile.ZipFile(target) as mar:
        entries = {info.filename: mar.read(info) for info in mar.infolist()}
    manifest = json.loads(entries["MAR-INF/MANIFEST.json"])
    manifest["model"]["handler"] = "slow_handler.py"
    entries["MAR-INF/MANIFEST.json"] = json.dumps(manifest, indent=2).encode()
    entries["slow_handler.py"] = SLOW_HANDLER.encode()
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as mar:
        for filename, data in entries.items():
            mar.writestr(filename, data)
    return target


def manage(srv, command: str, *args: str, log_dir: Path | None = None,
           timeout: float = 180) -> subprocess.CompletedProcess:
    """manage.py against `srv`, with its log folder unless told another."""
    extra = ["--model-store", str(srv.store)] if command in ("register", "rollout") else []
    if command in ("register", "unregister", "rollout"):
        extra += ["--log-dir", str(log_dir or srv.log_dir)]
    return subprocess.run([str(PYTHON), str(MANAGE), command, *args, *server_flags(srv), *extra],
                          cwd=srv.base, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def aserver(tmp_path_factory, tiny_run):
    """A TorchServe of this module alone, started with no model; the archives are clones of tiny."""
    srv = server_without_models(tmp_path_factory.mktemp("ts-adv-manage"), tiny_run)
    source, store = srv.source_mar, srv.store
    clone_mar(source, store / "acc-1.mar", "acc", "1")
    clone_mar(source, store / "acc-2.mar", "acc", "2", SHIFTED)
    clone_mar(source, store / "acc-3.mar", "acc", "3", FOUR_LABELS)
    clone_mar(source, store / "acx-1.mar", "acx", "1")
    slow_mar(source, store / "slow-1.mar", "slow", "1")
    clone_mar(source, store / "slow-2.mar", "slow", "2")
    with srv.running():
        yield srv


@pytest.fixture
def acc(aserver):
    """Model `acc` serving version 1 (right labels); every version removed after the test."""
    result = manage(aserver, "register", "acc-1.mar")
    assert result.returncode == 0, result.stderr
    yield aserver
    for version in sorted(versions(aserver, "acc"), key=lambda v: v == default(aserver, "acc")):
        manage(aserver, "unregister", "acc", version, "--drain-seconds", "0")


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stdout + result.stderr
    return lines[0]


# ---- no server ----

@pytest.mark.parametrize("flag", ["--workers", "--batch-size"])
def test_zero_workers_or_batch_size_is_a_usage_error(tmp_path, flag):
    (tmp_path / "key_file.json").write_text("{}")
    flags = ["--url", f"http://127.0.0.1:{free_ports(1)[0]}", "--token-file", str(tmp_path / "key_file.json")]
    for command in ("register", "rollout"):
        result = subprocess.run([str(PYTHON), str(MANAGE), command, "x.mar", flag, "0", *flags],
                                capture_output=True, text=True)
        assert result.returncode == 2
        assert one_error_line(result) == f"error: {flag} must be >= 1, not 0"


# ---- a real server ----

def test_rollout_refuses_a_version_less_accurate_than_the_default(acc, tmp_path):
    srv = acc
    smoke = tmp_path / "smoke"
    write_images(smoke, 9)
    # acc 2 answers every image (200) with the label of the next class: accuracy 0, no --min-accuracy
    result = manage(srv, "rollout", "acc-2.mar", "--smoke-dir", str(smoke))
    assert result.returncode == 1, result.stdout + result.stderr
    line = one_error_line(result)
    assert "accuracy 0.0000 of acc 2 is 1.0000 below acc 1's 1.0000 on the same 9 images" in line
    assert "was rolled back" in line and "acc 1 is the default on" in line
    assert set(versions(srv, "acc")) == {"1"} and default(srv, "acc") == "1"

    # said explicitly, the worse version goes out
    result = manage(srv, "rollout", "acc-2.mar", "--smoke-dir", str(smoke), "--max-accuracy-drop", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "9/9 smoke images ok, accuracy 0.0000 on the 9 in class folders (acc 1: 1.0000)" in result.stdout
    assert default(srv, "acc") == "2"


def test_failed_register_says_the_workers_reason(acc):
    reason = "ValueError: model.pt outputs 3 classes but index_to_name.json names 4"
    result = manage(acc, "register", "acc-3.mar")
    assert result.returncode == 1
    line = one_error_line(result)
    assert "Failed to start workers" in line and line.endswith(f"the worker said: {reason}")
    result = manage(acc, "rollout", "acc-3.mar")
    assert result.returncode == 1 and reason in one_error_line(result)
    assert set(versions(acc, "acc")) == {"1"}


def test_rollout_of_another_models_name_is_refused(acc):
    srv = acc
    result = manage(srv, "rollout", "acx-1.mar")
    assert result.returncode == 1
    line = one_error_line(result)
    assert "acx-1.mar is model acx, which the server does not serve (it serves acc)" in line
    assert "--new-model" in line and "nothing changed" in line
    assert versions(srv, "acx") == {}
    try:
        result = manage(srv, "rollout", "acx-1.mar", "--new-model")
        assert result.returncode == 0, result.stderr
        assert set(versions(srv, "acx")) == {"1"} and default(srv, "acc") == "1"
    finally:
        manage(srv, "unregister", "acx", "1", "--drain-seconds", "0")


def test_rollout_waits_for_the_batch_a_worker_holds(aserver):
    """v1 holds each batch SLOW_S s; the drain's quiet period is 0.2 s: only the worker's state can
    tell that v1 is still busy once its queue is empty."""
    srv = aserver
    result = manage(srv, "register", "slow-1.mar", "--max-batch-delay", "50")
    assert result.returncode == 0, result.stderr
    answers: list[tuple[int | str, str | None]] = []
    stop = threading.Event()

    def client() -> None:  # keeps one request in flight on the default version
        session = new_session(1)
        while not stop.is_set():
            try:
                response = request_with_key(
                    session, "POST", f"{srv.inference_url}/predictions/slow", srv.keys(), "inference",
                    data=(srv.base / "red.png").read_bytes(), timeout=4 * SLOW_S + 30)
                answers.append((response.status_code, response.headers.get("X-Model-Version")))
            except requests.RequestException as e:
                answers.append((type(e).__name__, None))

    predict(srv, "slow")  # writes red.png; also the first batch
    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        assert wait_for(lambda: len(answers) >= 8, 4 * SLOW_S + 30)
        result = manage(srv, "rollout", "slow-2.mar", "--drain-seconds", "0.2")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=4 * SLOW_S + 60)
        for version in sorted(versions(srv, "slow"), key=lambda v: v == default(srv, "slow")):
            manage(srv, "unregister", "slow", version, "--drain-seconds", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "slow 1 -> 2" in result.stdout and "slow 1 unregistered" in result.stdout
    assert not any(thread.is_alive() for thread in threads), "a request of v1 was never answered"
    assert [a for a in answers if a[0] != 200] == []
    assert {v for _, v in answers} == {"1", "2"}


def test_drain_without_the_servers_log_waits_for_the_response_timeout(aserver, tmp_path):
    """No ts_log.log to read (a remote server): the drain waits the version's responseTimeout."""
    srv = aserver
    with zipfile.ZipFile(srv.source_mar) as mar:
        config = mar.read("model-config.yaml").decode()
    config, count = re.subn(r"(?m)^responseTimeout: \d+", "responseTimeout: 3", config)
    assert count == 1
    clone_mar(srv.source_mar, srv.store / "quick-1.mar", "quick", "1", {"model-config.yaml": config.encode()})
    result = manage(srv, "register", "quick-1.mar")
    assert result.returncode == 0, result.stderr
    result = manage(srv, "unregister", "quick", "1", "--drain-seconds", "0", log_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"no ts_log.log of its workers in {tmp_path}" in result.stdout
    assert "waiting 3s of empty queue (its responseTimeout)" in result.stdout
    assert versions(srv, "quick") == {}
