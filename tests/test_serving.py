"""TorchServe through scripts/serve.sh and config.properties: a real server on loopback ports."""
from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import threading
import warnings

import pytest
import requests
import torch
from PIL import Image

from core.http import is_auth_error, new_session
from core.keys import request_with_key
from core.torchserve import ping as ts_ping
from handler.preprocessing import PreprocessConfig, load_tensor
from tests.conftest import REPO, make_server, wait_for
from tests.image_zoo import zoo_files

pytestmark = pytest.mark.integration


def png(color: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def predict(server, data: bytes, session: requests.Session | None = None) -> requests.Response:
    return request_with_key(session or new_session(), "POST",
                                     f"{server.inference_url}/predictions/{server.model}", server.keys(),
                                     "inference", data=data, timeout=30,
                                     headers={"Content-Type": "application/octet-stream"})


def in_process_topk(run_dir, data: bytes) -> list[dict]:
    """The same model.pt and preprocessing in this process: the answer the server must give."""
    cfg = PreprocessConfig.load(run_dir / "preprocess.json")
    labels = json.loads((run_dir / "index_to_name.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(str(run_dir / "model.pt")).eval()
    with torch.inference_mode():
        probs = torch.softmax(model(load_tensor(data, cfg).unsqueeze(0)), dim=1)[0]
    values, indices = torch.sort(probs, descending=True)
    return [{"label": labels[str(i)], "index": i, "probability": p}
            for p, i in zip(values.tolist(), indices.tolist())]


def test_config_properties_binds_loopback_and_keeps_token_auth():
    props = dict(line.split("=", 1) for line in (REPO / "config.properties").read_text().splitlines()
                 if line and not line.startswith("#"))
    assert props["inference_address"] == "http://127.0.0.1:8080"
    assert props["management_address"] == "http://127.0.0.1:8081"
    assert props["metrics_address"] == "http://127.0.0.1:8082"
    assert props["enable_model_api"] == "true" and props["disable_token_authorization"] == "false"
    assert props["metrics_mode"] == "prometheus" and props["model_store"] == "model_store"
    assert int(props["max_request_size"]) >= 64 * 2**20 and int(props["max_response_size"]) >= 64 * 2**20
    lines = (REPO / "config.properties").read_text().splitlines()
    for i, line in enumerate(lines):  # every setting has its reason on the line above
        if line and not line.startswith("#"):
            assert lines[i - 1].startswith("#"), f"no comment above {line}"


def test_status_lists_model_version_default_and_workers(server):
    result = server.serve("status")
    assert result.returncode == 0, result.stderr
    assert "tiny 1.0 (default)" in result.stdout and "READY" in result.stdout
    assert server.inference_url in result.stdout


def test_ping_needs_the_key_and_auth_stays_on(server):
    assert ts_ping(server.inference_url, server.keys()) is None
    bad = requests.get(f"{server.inference_url}/ping", headers={"Authorization": "Bearer wrong"}, timeout=5)
    assert is_auth_error(bad)


def test_second_start_refuses_busy_ports(server, tmp_path):
    again = server.serve("start")  # same log folder: the running server is named
    assert again.returncode == 1 and "already running" in again.stderr
    clash = make_server(tmp_path, server.store, server.run_dir, [])
    clash.ports["TS_METRICS_PORT"] = server.ports["TS_METRICS_PORT"]
    result = clash.serve("start")
    assert result.returncode == 1
    assert f"port {server.ports['TS_METRICS_PORT']}" in result.stderr and "in use" in result.stderr


def test_allowed_urls_refuse_remote_archives(server):
    for url in ("http://127.0.0.1:9/evil.mar", "file:///etc/passwd.mar"):
        response = request_with_key(new_session(), "POST",
                                             f"{server.management_url}/models", server.keys(), "management",
                                             params={"url": url}, timeout=10)
        assert response.status_code == 404 and "does not match any allowed URL" in response.text


def test_allowed_urls_admit_only_plain_file_names_of_the_store(server, tmp_path):
    # TorchServe refuses a literal "..", but Java decodes %2e%2e%2f after the regex matched: the
    # regex itself must admit nothing but a plain file name (no "%", no "/", no leading dot).
    outside = server.store.parent / "outside-the-store.mar"
    shutil.copyfile(server.store / f"{server.model}-{server.version}.mar", outside)
    try:
        for name in ("%2e%2e%2foutside-the-store.mar", "%2E%2E%2Foutside-the-store.mar", ".hidden.mar"):
            response = request_with_key(new_session(), "POST",
                                                   f"{server.management_url}/models", server.keys(), "management",
                                                   params={"url": f"file://{server.store}/{name}"}, timeout=60)
            assert response.status_code == 404 and "does not match any allowed URL" in response.text, name
    finally:
        outside.unlink()


def test_prometheus_metrics_on_the_metrics_port(server):
    predict(server, png((200, 0, 0)))
    response = request_with_key(new_session(), "GET", f"{server.metrics_url}/metrics",
                                         server.keys(), "inference", timeout=10)
    assert response.status_code == 200 and "# TYPE" in response.text


def test_served_predictions_equal_in_process(server):
    files = {name: data for name, (data, status) in zoo_files().items() if status == 200}
    files.update({"red.png": png((230, 30, 10)), "mixed.png": png((120, 130, 125), (40, 24))})
    session = new_session()
    for name, data in files.items():
        response = predict(server, data, session)
        assert response.status_code == 200, (name, response.text)
        served = response.json()
        expected = in_process_topk(server.run_dir, data)[: len(served)]
        assert [a["index"] for a in served] == [e["index"] for e in expected], name
        assert [a["label"] for a in served] == [e["label"] for e in expected], name
        for a, e in zip(served, expected):
            assert abs(a["probability"] - e["probability"]) < 1e-5, name


def test_answers_carry_the_x_model_version_header_good_or_bad(server):
    for data, status in ((png((230, 30, 10)), 200), (b"not an image", 400)):
        response = predict(server, data)
        assert response.status_code == status, response.text
        assert response.headers.get("X-Model-Version") == server.version


def test_mixed_batch_gets_per_image_statuses_and_worker_survives(server):
    pid_before = [w["pid"] for w in server.workers()]
    zoo = zoo_files()
    bad = [(name, data, status) for name, (data, status) in zoo.items() if status != 200]
    good = [(f"good{i}.png", png(((i * 40) % 256, 90, 200 - i * 10)), 200) for i in range(len(bad))]
    requests_ = [item for pair in zip(good, bad) for item in pair]  # alternate good and bad
    model_log = server.log_dir / "model_log.log"
    log_offset = model_log.stat().st_size
    batched = False
    for _ in range(3):  # concurrent requests land in one batch; retry if the scheduler split them
        barrier = threading.Barrier(len(requests_))
        results: dict[str, requests.Response] = {}

        def send(name: str, data: bytes) -> None:
            session = new_session()
            barrier.wait(timeout=10)
            results[name] = predict(server, data, session)

        threads = [threading.Thread(target=send, args=(n, d)) for n, d, _ in requests_]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        for name, _, status in requests_:
            assert results[name].status_code == status, (name, results[name].text)
            body = results[name].json()
            if status == 200:
                assert body[0]["label"] in ("red", "green", "blue") and len(body) == 3
            else:
                assert body["code"] == status and body["error"]
        # the handler logs "request N of the batch refused": N >= 1 means a refusal shared a batch
        batched = wait_for(lambda: any(
            f"request {i} of the batch refused" in model_log.read_text(errors="replace")[log_offset:]
            for i in range(1, 8)), timeout=3)
        if batched:
            break
    assert batched, "no batch mixed several requests"
    assert [w["pid"] for w in server.workers()] == pid_before
    assert all(w["status"] == "READY" for w in server.workers())


def test_start_gives_up_with_the_log_lines_that_explain_it(server, tmp_path):
    """A worker that dies at import: start gives up once TorchServe's retries die alike (however slow
    the machine: no deadline is involved, TS_START_TIMEOUT is far away), prints the traceback's lines
    and leaves nothing running."""
    handler = tmp_path / "broken_handler.py"
    handler.write_text("import module_that_does_not_exist  # noqa\n")
    store = tmp_path / "store"
    store.mkdir()
    subprocess.run([str(REPO / ".venv/bin/torch-model-archiver"), "--model-name", "broken", "--version", "1",
                    "--handler", str(handler), "--export-path", str(store)], check=True, timeout=60)
    broken = make_server(tmp_path / "srv", store, server.run_dir, ["broken.mar"])
    try:
        result = broken.serve("start", "broken.mar", TS_START_TIMEOUT="900", timeout=960)
    finally:
        if broken.pid() is not None:
            broken.kill()
        broken.remove_tmpdir()
    assert result.returncode == 1
    assert "module_that_does_not_exist" in result.stderr or "ModuleNotFoundError" in result.stderr
    assert "did not become ready" in result.stderr
    assert re.search(r"the workers of broken died [3-9] times while loading it", result.stderr)
    assert broken.pid() is None  # stopped again
    assert broken.serve("status").returncode == 3
