"""Regression probes of classify_dir.py against hostile input and server states: non-regular and
oversize files, a version without workers, its own outputs inside a relative DIR, Ctrl-C with requests
in flight, and the X-Model-Version header as the only source of a row's version."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from client import sending
from client.local_server import free_ports
from core.http import new_session
from core.keys import request_with_key
from core.torchserve import TorchServe, ping as ts_ping
from tests.conftest import archive, popen, rows_written, wait_for, write_images
from tests.test_classify_dir import client_args, read_rows, run_client

pytestmark = pytest.mark.integration
LIMIT = 64 * 1024 * 1024  # config.properties' max_request_size
SPARE_VERSION = "7.0"  # registered beside the shared server's 1.0 and removed again


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_fifo_device_and_oversize_files_get_error_rows_without_being_read(server, tmp_path):
    root = tmp_path / "imgs"
    good = write_images(root, 3)
    os.mkfifo(tmp_path / "pipe")
    (root / "fifo link.png").symlink_to(tmp_path / "pipe")  # no writer: opening it would block
    os.mkfifo(root / "fifo.png")
    (root / "zero.png").symlink_to("/dev/zero")  # endless: reading it would exhaust memory
    with open(root / "big.png", "wb") as f:
        f.truncate(LIMIT + 1)  # sparse: costs no disk, and must be refused before it is read
    output = tmp_path / "rows.jsonl"
    result = run_client(server, root, output, timeout=120)
    assert result.returncode == 1, result.stderr
    rows = {r["path"]: r for r in read_rows(output)}
    assert Counter(r["path"] for r in read_rows(output)) == Counter(
        good + ["fifo link.png", "fifo.png", "zero.png", "big.png"])
    assert all(rows[p]["status"] == "ok" for p in good)
    for path, kind in (("fifo link.png", "a FIFO"), ("fifo.png", "a FIFO"),
                       ("zero.png", "a character device")):
        assert rows[path]["status"] == "error" and rows[path]["http_status"] is None
        assert rows[path]["error"] == f"not a regular file ({kind}): not sent", rows[path]
    big = rows["big.png"]
    assert big["status"] == "error" and big["http_status"] is None  # the server's 413 never came into it
    assert f"{LIMIT + 1} bytes" in big["error"] and f"limit of {LIMIT} bytes" in big["error"]
    assert "not a regular file: 3" in result.stdout and "too large: 1" in result.stdout

    small = run_client(server, root, tmp_path / "small.jsonl", "--max-request-size", "10", timeout=120)
    assert small.returncode == 1, small.stderr
    refused = [r for r in read_rows(tmp_path / "small.jsonl") if r["path"] in good]
    assert len(refused) == 3 and all("limit of 10 bytes" in r["error"] for r in refused)


def _manage(server, method: str, path: str, **params) -> None:
    response = request_with_key(new_session(), method, f"{server.management_url}{path}",
                                         server.keys(), "management", params=params, timeout=120)
    assert response.status_code == 200, response.text


@pytest.fixture
def spare_version(server):
    """tiny 7.0 beside the shared 1.0 (which stays the default), with one worker; removed afterwards."""
    archive(server.run_dir, server.store, server.model, SPARE_VERSION)
    _manage(server, "POST", "/models", url=f"{server.model}-{SPARE_VERSION}.mar", initial_workers="1",
            synchronous="true")
    try:
        yield SPARE_VERSION
    finally:
        _manage(server, "DELETE", f"/models/{server.model}/{SPARE_VERSION}")


def test_version_scaled_to_zero_workers_exits_3_up_front(server, spare_version, tmp_path):
    root = tmp_path / "imgs"
    write_images(root, 20)
    _manage(server, "PUT", f"/models/{server.model}/{spare_version}", min_worker="0", max_worker="0",
            synchronous="true")
    output = tmp_path / "rows.jsonl"
    result = run_client(server, root, output, "--version", spare_version)
    assert result.returncode == 3, result.stdout + result.stderr  # an operator's fix; worth retrying later
    line = one_line(result.stderr)
    assert f"version {spare_version} has no worker" in line and "manage.py scale" in line
    assert rows_written(output) == 0  # nothing was sent

    # the check inside a run: a last 503 while no worker is READY stops the run
    keys = server.keys()
    api = TorchServe(server.inference_url, server.management_url, keys)
    classifier = sending.Classifier(api, server.model, spare_version, topk=3, timeout=30)
    answer = classifier.send((root / "red" / "0000.png").read_bytes(), "application/octet-stream", {"path": "x"})
    assert answer.status == 503
    assert re.search("has no READY worker .* and answers 503", classifier.no_ready_worker())
    assert ts_ping(server.inference_url, server.keys()) is None  # the shared 1.0 still serves


def test_workers_removed_mid_run_exit_3_with_rows_kept(server, spare_version, many_images, tmp_path):
    directory, paths = many_images
    output = tmp_path / "rows.jsonl"
    with popen(client_args(server, directory, output, "--version", spare_version, "--concurrency", "1",
                           "--timeout", "10", "--give-up-after", "10")) as proc:
        assert wait_for(lambda: rows_written(output) >= 20, timeout=60)
        _manage(server, "PUT", f"/models/{server.model}/{spare_version}", min_worker="0", max_worker="0",
                synchronous="true")
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stdout + stderr
    line = one_line(stderr)
    assert "has no READY worker" in line and "--resume" in line
    kept = read_rows(output)
    assert 20 <= len(kept) < len(paths) and len({r["path"] for r in kept}) == len(kept)
    assert sum(r["http_status"] == 503 for r in kept) <= 1  # not one 503 row per remaining file


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> tuple[Path, list[str]]:
    directory = tmp_path_factory.mktemp("many")
    return directory, write_images(directory, 300)


def test_outputs_inside_a_relative_dir_are_never_classified(server, tmp_path):
    write_images(tmp_path / "val", 6)
    args = client_args(server, Path("val"), Path("val/results.jsonl"), "--class-folders",
                       "--extensions", "png,jsonl")
    for _ in range(2):  # the second run finds the first one's confusion matrix in DIR
        result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        paths = [r["path"] for r in read_rows(tmp_path / "val" / "results.jsonl")]
        assert len(paths) == 6 and not any(p.startswith("results") for p in paths), paths
    assert (tmp_path / "val" / "results.confusion.png").is_file()


class _Unanswering(BaseHTTPRequestHandler):
    """Healthy /ping; answers the first `answered` predictions, then holds every request open."""

    answered = 3

    def do_GET(self):
        self._send(200, {"status": "Healthy"})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        server = self.server
        with server.lock:
            server.posts += 1
            answer = server.posts <= self.answered
        if answer:
            self._send(200, [{"label": "red", "index": 0, "probability": 1.0}])
        else:
            server.release.wait()

    def _send(self, status: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Model-Version", "1.0")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_ctrl_c_stops_at_once_with_requests_in_flight_and_keeps_rows(tmp_path):
    root = tmp_path / "imgs"
    write_images(root, 12)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Unanswering)
    httpd.daemon_threads = True
    httpd.lock, httpd.posts, httpd.release = threading.Lock(), 0, threading.Event()
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({k: {"key": "k"} for k in ("inference", "management", "API")}))
    output = tmp_path / "rows.jsonl"
    args = client_args(type("S", (), {"model": "m", "inference_url": f"http://127.0.0.1:{httpd.server_port}",
                                      "management_url": f"http://127.0.0.1:{free_ports(1)[0]}",
                                      "key_file": key_file}),
                       root, output, "--concurrency", "2", "--retries", "0", "--timeout", "600")
    try:
        with popen(args) as proc:
            assert wait_for(lambda: rows_written(output) >= 3 and httpd.posts >= 5, timeout=60)
            proc.send_signal(signal.SIGINT)
            # without the fix it waits --timeout (600 s) for the held requests
            stdout, stderr = proc.communicate(timeout=60)
    finally:
        httpd.release.set()
        httpd.shutdown()
        httpd.server_close()
    assert proc.returncode == 130, stdout + stderr
    assert "interrupted: 3 rows kept" in stderr and "--resume" in stderr and "Traceback" not in stderr
    rows = read_rows(output)
    assert len(rows) == 3 and all(r["status"] == "ok" and r["model_version"] == "1.0" for r in rows)


def test_model_version_comes_from_the_header_alone(server, tmp_path):
    root = tmp_path / "imgs"
    write_images(root, 4)
    args = client_args(server, root, tmp_path / "rows.jsonl")
    # a dead management port: no default-version lookup, only the handler's X-Model-Version can say
    args[args.index("--management-url") + 1] = f"http://127.0.0.1:{free_ports(1)[0]}"
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = read_rows(tmp_path / "rows.jsonl")
    assert len(rows) == 4 and {r["model_version"] for r in rows} == {server.version}


@pytest.mark.parametrize("resume", [False, True])
def test_an_extensions_typo_refuses_before_touching_the_previous_results(server, tmp_path, resume):
    images = tmp_path / "images"
    write_images(images, 3)
    output = tmp_path / "results.jsonl"
    first = run_client(server, images, output)
    assert first.returncode == 0, first.stderr
    before = output.read_bytes()
    typo = run_client(server, images, output, "--extensions", ".pgn", *(["--resume"] if resume else []))
    assert typo.returncode == 2 and "no files with extensions .pgn under" in typo.stderr
    assert "left as it was" in typo.stderr and "Traceback" not in typo.stderr
    assert output.read_bytes() == before

