"""scripts/classify_dir.py: helpers without a server, then the CLI against the session's TorchServe."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from client import results, sending
from client.local_server import free_ports
from core import files as walk
from core.http import management_url_for, new_session
from core.keys import request_with_key
from core.torchserve import TorchServe, ping as ts_ping
from tests.conftest import COLORS, PYTHON, REPO, archive, popen, rows_written, wait_for, write_images
from tests.image_zoo import write_zoo

CLIENT = REPO / "scripts" / "classify_dir.py"
ZOO_EXTENSIONS = "jpg,jpeg,png,gif,webp,txt,html,pdf"


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def client_args(server, directory: Path, output: Path, *extra: str) -> list[str]:
    return [str(PYTHON), str(CLIENT), str(directory), "--model", server.model, "--url", server.inference_url,
            "--management-url", server.management_url, "--token-file", str(server.key_file),
            "--output", str(output), *extra]


def run_client(server, directory: Path, output: Path, *extra: str, timeout: float = 60):
    """Run the CLI from an unrelated folder (paths must not depend on the cwd)."""
    return subprocess.run(client_args(server, directory, output, *extra), cwd=output.parent,
                          capture_output=True, text=True, timeout=timeout)


def classified_once(server, tmp_path: Path, count: int) -> tuple[Path, Path]:
    """`count` images classified once into rows.jsonl: (their folder, the output)."""
    root, output = tmp_path / "imgs", tmp_path / "rows.jsonl"
    write_images(root, count)
    assert run_client(server, root, output).returncode == 0
    return root, output


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> tuple[Path, list[str]]:
    """600 images: enough for a run at concurrency 1 to be stopped half-way."""
    directory = tmp_path_factory.mktemp("many")
    return directory, write_images(directory, 600)


# ---- helpers, no server ----

def test_iter_files_sorted_any_case_and_safe_from_symlink_loops(tmp_path):
    for rel in ("b/2.PNG", "b/1.jpg", "a.JpEg", "c/d/e.png", "notes.md", "b/x.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "c" / "d" / "loop").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "missing.jpg")
    found = [p.relative_to(tmp_path).as_posix()
             for p in walk.iter_files(tmp_path, {".jpg", ".jpeg", ".png"})]
    assert found == ["a.JpEg", "b/1.jpg", "b/2.PNG", "c/d/e.png", "dangling.jpg"]
    flat = list(walk.iter_files(tmp_path, {".jpg", ".jpeg", ".png"}, recursive=False))
    assert [p.name for p in flat] == ["a.JpEg", "dangling.jpg"]


def test_iter_files_yields_fifos_and_skips_outputs_by_identity_from_a_relative_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "val").mkdir()
    for name in ("a.png", "results.jsonl", "results.confusion.png"):
        (tmp_path / "val" / name).write_bytes(b"x")
    os.mkfifo(tmp_path / "val" / "pipe.png")
    (tmp_path / "val" / "link.png").symlink_to(tmp_path / "val" / "results.confusion.png")
    skip = frozenset({Path("val/results.jsonl"), Path("val/results.confusion.png"), Path("val/new.png")})
    found = [p.name for p in walk.iter_files(Path("val"), {".png", ".jsonl"}, skip=skip)]
    assert found == ["a.png", "pipe.png"]  # a link to an output is that output


def test_read_image_refuses_non_regular_and_oversize_files_without_blocking(tmp_path):
    exact = tmp_path / "exact.png"
    exact.write_bytes(b"x" * 10)
    assert walk.read_image(exact, 10) == b"x" * 10
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "pipe.png").symlink_to(tmp_path / "pipe")
    cases = [(exact, 9, "too large", "file is 10 bytes, over the request size limit of 9 bytes"),
             (tmp_path / "pipe.png", 10, "not a regular file", "(a FIFO)"),
             (Path("/dev/zero"), 10, "not a regular file", "(a character device)"),
             (tmp_path / "gone.png", 10, "unreadable", "cannot read the file"),
             # a regular file whose size says 0: only at most limit + 1 bytes are read
             (Path("/proc/self/status"), 10, "too large", "over 10 bytes")]
    for path, limit, reason, message in cases:
        with pytest.raises(walk.NotSent, match=re.escape(message)) as refused:
            walk.read_image(path, limit)
        assert refused.value.reason == reason


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_resume_keeps_first_ok_row_per_file_and_drops_the_rest(tmp_path, suffix):
    output = tmp_path / f"results{suffix}"
    writer = results.RowWriter(output, results.FIELDS, append=False)
    ok = {"status": "ok", "label": "red", "probability": 0.9, "http_status": 200, "model": "m",
          "topk": [{"label": "red", "index": 0, "probability": 0.9}], "latency_ms": 1.0}
    writer.write({"path": "a.png", **ok})
    writer.write({"path": "b.png", "status": "error", "error": "bad", "http_status": 400})
    writer.write({"path": "a.png", **ok})
    writer.write({"path": "c.png", **ok})
    writer.close()
    with open(output, "a", encoding="utf-8") as f:
        cut = '{"path": "d.png", "status": "o' if suffix == ".jsonl" else 'd.png,ok,"[{""la'
        f.write(cut)  # a row cut short by a kill
    stats = results.Stats()
    done = results.keep_finished_rows(output, results.FIELDS, stats)
    assert done == {"a.png", "c.png"} and stats.ok == 2 and stats.resumed == 2
    rows = read_rows(output)
    assert [r["path"] for r in rows] == ["a.png", "c.png"]


def test_management_url_is_the_next_port():
    assert management_url_for("http://127.0.0.1:8080") == "http://127.0.0.1:8081"


def test_usage_errors_exit_2_without_traceback(tmp_path):
    for args in (["/no/such/folder"], [str(tmp_path), "--concurrency", "0"]):
        result = subprocess.run([str(PYTHON), str(CLIENT), *args], capture_output=True, text=True, timeout=30,
                                cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.startswith("error: ")
        assert "Traceback" not in result.stderr


def test_unreachable_server_exits_3_worth_retrying(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    port = free_ports(1)[0]
    result = subprocess.run([str(PYTHON), str(CLIENT), str(tmp_path), "--url", f"http://127.0.0.1:{port}",
                             "--retries", "1", "--output", str(tmp_path / "out.jsonl")],
                            capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode == 3 and "unreachable" in result.stderr and "Traceback" not in result.stderr


# ---- against the session's TorchServe ----

@pytest.mark.integration
def test_zoo_nested_with_odd_names_one_row_each_right_statuses(server, tmp_path):
    root = tmp_path / "images"
    nested = root / "level one" / "nïveau deux"
    expected = {}
    for name, status in write_zoo(nested).items():
        stem, ext = os.path.splitext(name)
        new = f"{stem} ü{ext.upper()}" if len(expected) % 2 else name  # upper-case ext, space, non-ASCII
        (nested / name).rename(nested / new)
        expected[f"level one/nïveau deux/{new}"] = status
    Image.new("RGB", (8, 8), COLORS["green"]).save(root / "Grün Bild.PNG")
    expected["Grün Bild.PNG"] = 200
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")
    expected["dangling.jpg"] = None  # the client cannot read it
    (root / "level one" / "loop").symlink_to(root, target_is_directory=True)
    (root / "readme.md").write_text("not listed")
    pid_before = [w["pid"] for w in server.workers()]

    output = tmp_path / "zoo.jsonl"
    result = run_client(server, root, output, "--extensions", ZOO_EXTENSIONS)
    assert result.returncode == 1, result.stderr
    rows = read_rows(output)
    assert Counter(r["path"] for r in rows) == Counter(expected.keys())
    for row in rows:
        status = expected[row["path"]]
        assert row["status"] == ("ok" if status == 200 else "error"), row
        assert row["http_status"] == status, row
        assert row["model"] == "tiny" and (row["latency_ms"] is not None) == (status is not None)
        if status == 200:
            assert row["label"] == row["topk"][0]["label"] and row["model_version"] == "1.0"
        else:
            assert row["error"] and row["label"] is None
    assert "failed 7" in result.stdout and "http 400: 5" in result.stdout and "http 413: 1" in result.stdout
    assert "unreadable: 1" in result.stdout and "images/s" in result.stdout and "p99" in result.stdout
    assert ts_ping(server.inference_url, server.keys()) is None
    assert [w["pid"] for w in server.workers()] == pid_before
    assert all(w["status"] == "READY" for w in server.workers())


@pytest.mark.integration
def test_class_folders_accuracy_and_confusion_matrix_csv(server, tmp_path):
    root = tmp_path / "val"
    write_images(root, 12)
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    output = tmp_path / "val results.csv"
    result = run_client(server, root, output, "--class-folders", "--topk", "2", "--version", "1.0")
    assert result.returncode == 1, result.stderr
    assert "accuracy 1.0000, error rate 0.0000 (12/12 classified files right)" in result.stdout
    assert "1/13 files failed and are not counted" in result.stdout
    assert (tmp_path / "val results.confusion.png").stat().st_size > 1000
    rows = read_rows(output)
    assert len(rows) == 13 and all(r["true_label"] == r["path"].split("/")[0] for r in rows)
    good = [r for r in rows if r["status"] == "ok"]
    assert all(r["label"] == r["true_label"] and len(json.loads(r["topk"])) == 2 for r in good)
    assert all(r["model_version"] == "1.0" for r in rows)


@pytest.mark.integration
def test_exit_codes_0_and_2(server, tmp_path):
    root = tmp_path / "good"
    write_images(root, 5)
    assert run_client(server, root, tmp_path / "ok.jsonl").returncode == 0
    args = client_args(server, root, tmp_path / "x.jsonl")
    args[args.index("--model") + 1] = "nope"
    unknown = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "not registered" in unknown.stderr
    version = run_client(server, root, tmp_path / "v.jsonl", "--version", "9.9")
    assert version.returncode == 2 and "no version '9.9'" in version.stderr


@pytest.mark.integration
def test_wrong_key_is_a_clear_error_and_loses_no_rows(server, tmp_path):
    root, output = classified_once(server, tmp_path, 3)
    before = output.read_text(encoding="utf-8")
    wrong = tmp_path / "wrong_key_file.json"
    wrong.write_text(json.dumps({kind: {"key": "nottheke"} for kind in ("management", "inference", "API")}))
    for extra in ((), ("--resume",)):
        args = client_args(server, root, output, *extra)
        args[args.index("--token-file") + 1] = str(wrong)
        result = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert "refused the inference key" in result.stderr and "Traceback" not in result.stderr
        assert output.read_text(encoding="utf-8") == before


@pytest.mark.integration
def test_inference_key_renewed_through_the_api_key_is_picked_up(server, tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (8, 8), COLORS["red"]).save(path)
    keys = server.keys()
    old = keys.get("inference")
    # renew the inference key with the API key: the server rewrites key_file.json, the old key dies
    renewed = new_session().get(f"{server.management_url}/token", params={"type": "inference"},
                                         headers={"Authorization": f"Bearer {keys.get('API')}"}, timeout=10)
    assert renewed.status_code == 200
    api = TorchServe(server.inference_url, server.management_url, keys)
    classifier = sending.Classifier(api, server.model, None, topk=3, timeout=30)
    answer = classifier.send(path.read_bytes(), "application/octet-stream", {"path": "red.png"})
    row = answer.row
    assert answer.reason is None and row["label"] == "red" and row["model_version"] == "1.0"
    assert keys.get("inference") != old


@pytest.mark.integration
def test_resume_after_the_client_is_killed_mid_run(server, many, tmp_path):
    directory, paths = many
    output = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(client_args(server, directory, output, "--concurrency", "1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: rows_written(output) >= 30, timeout=30)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert rows_written(output) < len(paths)
    result = run_client(server, directory, output, "--resume")
    assert result.returncode == 0, result.stderr
    rows = read_rows(output)
    assert Counter(r["path"] for r in rows) == Counter(paths)  # every file exactly once
    assert all(r["status"] == "ok" for r in rows)
    assert "already done, resumed" in result.stdout


@pytest.mark.integration
def test_server_stopped_mid_run_exit_3_then_resume_after_restart(server, many, tmp_path):
    directory, paths = many
    output = tmp_path / "stopped.jsonl"
    old_keys = server.keys()
    assert old_keys.get("inference")  # read now, before the restart rotates them
    try:
        with popen(client_args(server, directory, output, "--concurrency", "1", "--retries", "1",
                               "--give-up-after", "5")) as proc:
            assert wait_for(lambda: rows_written(output) >= 30, timeout=30)
            server.stop()
            _, stderr = proc.communicate(timeout=60)
    finally:
        if server.pid() is None:
            server.start()  # leave the shared server running for the other tests
    assert proc.returncode == 3, stderr  # worth retrying later: a batch scheduler retries it
    assert "unreachable" in stderr and "--resume" in stderr and "Traceback" not in stderr
    kept = read_rows(output)
    assert 30 <= len(kept) < len(paths) and len({r["path"] for r in kept}) == len(kept)

    # the restart rotated the keys: a client holding the old ones re-reads the file and goes on
    assert old_keys.get("inference") != server.keys().get("inference")
    api = TorchServe(server.inference_url, server.management_url, old_keys)
    classifier = sending.Classifier(api, server.model, None, topk=3, timeout=30)
    answer = classifier.send((directory / paths[0]).read_bytes(), "application/octet-stream", {"path": paths[0]})
    assert answer.reason is None and answer.row["status"] == "ok"

    result = run_client(server, directory, output, "--resume")
    assert result.returncode == 0, result.stderr
    rows = read_rows(output)
    assert Counter(r["path"] for r in rows) == Counter(paths)
    assert all(r["status"] == "ok" for r in rows)


@pytest.mark.integration
def test_client_with_retries_rides_through_a_server_restart(server, many, tmp_path):
    directory, paths = many
    output = tmp_path / "restart.jsonl"
    try:
        with popen(client_args(server, directory, output, "--concurrency", "2", "--retries", "7")) as proc:
            assert wait_for(lambda: rows_written(output) >= 30, timeout=30)
            server.stop()
            server.start()  # new keys: the client re-reads key_file.json when the old one is refused
            stdout, stderr = proc.communicate(timeout=90)
    finally:
        if server.pid() is None:
            server.start()
    rows = read_rows(output)
    assert Counter(r["path"] for r in rows) == Counter(paths)
    failed = [r for r in rows if r["status"] != "ok"]
    # a request in flight when the frontend shut down may have been answered with an error
    assert proc.returncode in (0, 1), stderr
    assert len(failed) <= 2, failed


@pytest.mark.integration
def test_rows_report_the_version_that_was_default_when_sent(server, tmp_path):
    root = tmp_path / "imgs"
    write_images(root, 6)
    archive(server.run_dir, server.store, server.model, "2.0")
    session, keys = new_session(), server.keys()

    def manage(method: str, path: str, **params):
        response = request_with_key(session, method, f"{server.management_url}{path}", keys,
                                             "management", params=params, timeout=60)
        assert response.status_code == 200, response.text

    manage("POST", "/models", url="tiny-2.0.mar", initial_workers="1", synchronous="true")
    try:
        manage("PUT", "/models/tiny/2.0/set-default")
        result = run_client(server, root, tmp_path / "v2.jsonl")
        assert result.returncode == 0, result.stderr
        assert {r["model_version"] for r in read_rows(tmp_path / "v2.jsonl")} == {"2.0"}
        pinned = run_client(server, root, tmp_path / "v1.jsonl", "--version", "1.0")
        assert {r["model_version"] for r in read_rows(tmp_path / "v1.jsonl")} == {"1.0"}, pinned.stderr
    finally:
        manage("PUT", "/models/tiny/1.0/set-default")
        manage("DELETE", "/models/tiny/2.0")


@pytest.mark.integration
def test_exit_codes_a_batch_scheduler_acts_on(server, tmp_path):
    """A shard with one corrupt image succeeds (0) with its error row; more bad files than
    --max-failed-share fail the run (1); a usage error is never worth a retry (2)."""
    root = tmp_path / "imgs"
    paths = write_images(root, 30)
    (root / "red" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    output = tmp_path / "shard-0.jsonl"
    result = run_client(server, root, output, "--shard", "0/1")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {r["path"]: r for r in read_rows(output)}
    assert set(rows) == {*paths, "red/corrupt.png"}
    assert rows["red/corrupt.png"]["status"] == "error" and rows["red/corrupt.png"]["http_status"] == 400
    strict = run_client(server, root, tmp_path / "strict.jsonl", "--max-failed-share", "0")
    assert strict.returncode == 1 and "more than --max-failed-share 0" in strict.stderr, strict.stderr
    usage = run_client(server, root, tmp_path / "u.jsonl", "--max-failed-share", "2")
    assert usage.returncode == 2 and usage.stderr.startswith("error: --max-failed-share must be between")


@pytest.mark.integration
def test_resume_refuses_the_rows_of_another_model_version(server, tmp_path):
    root, output = classified_once(server, tmp_path, 6)
    rows = output.read_text().replace(f'"model_version": "{server.version}"', '"model_version": "0.9"')
    output.write_text(rows)  # as if written before a rollout
    result = run_client(server, root, output, "--resume")
    assert result.returncode == 2 and "a row of tiny version 0.9, and this run's version is" in result.stderr
    assert output.read_text() == rows  # refused before anything was rewritten
    assert run_client(server, root, output, "--resume", "--allow-mixed-versions").returncode == 0
