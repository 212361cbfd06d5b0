"""The run summary (client/summary.py) and the HTML report (client/report.py, scripts/report.py): numbers
from rows, hostile rows escaped, bounded size, readable errors; the report opened in headless Chromium."""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import time
import zlib
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from PIL import Image

from client import results, sending, summary
from client.report import FAILED_SHOWN, MISCLASSIFIED_SHOWN, make_report
from core import files
from tests.browser import chromium, open_page
from tests.conftest import COLORS, PYTHON, REPO, write_images
from tests.test_classify_dir import run_client

REPORT = REPO / "scripts" / "report.py"
SECTIONS = ["summary", "labels", "confidence", "least-confident", "failed", "accuracy", "misclassified"]
needs_chromium = pytest.mark.skipif(chromium() is None,
                                    reason="chromium not found (`make install` installs it)")


def row(path: str, label: str | None, p: float | None = None, true: str | None = None, **extra) -> dict:
    """A row as classify_dir writes it: ok with a top 3 when there is a label, else an error row."""
    base = {"path": path, "model": "digits", "model_version": "1.0", "latency_ms": 10.0, "replica": "r1",
            "true_label": true}
    if label is None:
        failed = results.error_row(base, extra.pop("error", "cannot decode"), extra.pop("http_status", 400))
        return {**failed, **extra}
    answer = [{"label": label, "index": 0, "probability": p},
              {"label": "other", "index": 1, "probability": 1 - p}]
    return {**results.ok_row(base, answer, 3), **extra}


def write_rows(path: Path, rows: list[dict]) -> Path:
    writer = results.RowWriter(path, results.FIELDS + ("true_label",), append=False)
    for r in rows:
        writer.write(r)
    writer.close()
    return path


def huge_png(path: Path, width: int, height: int) -> None:
    """A 1x1 PNG whose header claims width x height pixels: a decompression bomb by its size."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def assert_clean_page(page, sections: list[str]) -> None:
    """Every section there; nothing requested but the page and data: URIs; nothing logged as an error."""
    assert page.sections == sections
    assert page.requests and page.requests[0] == page.url
    assert all(u == page.url or u.startswith("data:") for u in page.requests), page.requests
    assert page.errors == []
    assert page.scripts == 0
    assert page.screenshot.startswith(b"\x89PNG\r\n\x1a\n")


# ---- no server ----

def test_reason_of_reads_back_the_reasons_the_run_counts(tmp_path):
    """The summary's reasons come from the rows: each reason the client gives a file must read back."""
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "big.png").write_bytes(b"x" * 20)
    for path, limit in ((tmp_path / "gone.png", 10), (tmp_path / "pipe.png", 10), (tmp_path / "big.png", 10)):
        with pytest.raises(files.NotSent) as refused:
            files.read_image(path, limit)
        assert summary.reason_of(results.error_row({}, str(refused.value), None)) == refused.value.reason
    for failure in (requests.Timeout(), requests.ConnectionError()):
        def predict(*args, failure=failure, **kwargs):
            raise failure
        server = SimpleNamespace(keys=SimpleNamespace(get=lambda kind: None), predict=predict)
        answer = sending.Classifier(server, "m", "1.0", topk=3, timeout=1).send(b"", "image/png", {})
        assert summary.reason_of(results.error_row({}, answer.error, None)) == answer.reason
    assert summary.reason_of(results.error_row({}, "cannot decode image", 400)) == "http 400"
    assert summary.reason_of(results.error_row({}, "unexpected answer: []", 200)) == "bad answer"


def test_summary_of_jsonl_and_csv_shards_counts_each_file_once(tmp_path):
    a = write_rows(tmp_path / "shard-0.jsonl", [row("red/1.png", "red", 0.9, "red", latency_ms=10.0),
                                                row("red/2.png", "green", 0.6, "red", latency_ms=20.0),
                                                row("green/3.png", None, true="green", latency_ms=30.0)])
    b = write_rows(tmp_path / "shard-1.csv", [row("green/4.png", "green", 0.8, "green", latency_ms=40.0,
                                                  replica="r2"),
                                              row("red/1.png", "red", 0.9, "red")])  # already in shard 0
    got = summary.summary_of(summary.Results([a, b]))
    assert (got["files"], got["ok"], got["failed"], got["duplicates"]) == (4, 3, 1, 1)
    assert got["failed_by_reason"] == {"http 400": 1}
    assert got["labels"] == {"green": 2, "red": 1} and got["versions"] == {"1.0": 4}
    assert got["latency_ms"]["p50"] == 25.0  # statistics.quantiles, inclusive: the mid point of 20 and 30
    assert got["replicas"]["r2"] == {"files": 1, "errors": 0,
                                     "latency_ms": {f"p{q}": 40.0 for q in (50, 90, 95, 99)}}
    accuracy = got["accuracy"]
    assert (accuracy["correct"], accuracy["classified"], accuracy["failed_labelled"]) == (2, 3, 1)
    # red: predicted once, right; true twice, once right. green: predicted twice, once right.
    assert accuracy["classes"] == {"green": {"precision": 0.5, "recall": 1.0, "support": 1},
                                   "red": {"precision": 1.0, "recall": 0.5, "support": 2}}
    summary.write_summary(got, tmp_path / "s.summary.json")
    assert json.loads((tmp_path / "s.summary.json").read_text()) == got


def test_the_printed_class_table_and_the_summary_are_one_computation(tmp_path):
    # classify_dir's table and PNG (results.Stats) and summary.json (summary.Tally) from the same rows:
    # red right once of twice, green right, blue's only file failed (a class with nothing defined)
    rows = [row("red/1.png", "red", 0.9, "red"), row("red/2.png", "green", 0.6, "red"),
            row("green/3.png", "green", 0.8, "green"), row("blue/4.png", None, true="blue")]
    stats = results.Stats()
    for r in rows:
        stats.add(r, None if r["status"] == "ok" else "http 400")
    png = tmp_path / "c.confusion.png"
    printed = results.report_class_metrics(stats, png).splitlines()
    assert printed[0] == ("accuracy 0.6667, error rate 0.3333 (2/3 classified files right); "
                          "1/4 files failed and are not counted")
    assert [line.split() for line in printed[2:5]] == [["blue", "-", "-", "0"],
                                                       ["green", "0.5000", "1.0000", "1"],
                                                       ["red", "1.0000", "0.5000", "2"]]
    assert printed[5] == f"confusion matrix: {png}"
    with Image.open(png) as image:  # 3 classes: min(20, 2.5 + 0.45 * 3) inches at 100 dpi
        assert image.format == "PNG" and image.size == (385, 385)
    accuracy = summary.summary_of(summary.Results([write_rows(tmp_path / "r.jsonl", rows)]))["accuracy"]
    assert accuracy["classes"] == {"blue": {"precision": None, "recall": None, "support": 0},
                                   "green": {"precision": 0.5, "recall": 1.0, "support": 1},
                                   "red": {"precision": 1.0, "recall": 0.5, "support": 2}}
    assert accuracy["confusion"] == [["red", "red", 1], ["red", "green", 1], ["green", "green", 1]]


HOSTILE = "<script>alert(1)</script>.png"  # a folder "<script>alert(1)<" and a file "script>.png"
HOSTILE_LABEL = 'say "hi" <b>'


@pytest.fixture
def hostile_report(tmp_path) -> Path:
    """A report of rows naming a hostile file and label, and images missing, bomb-sized, a FIFO, outside."""
    root = tmp_path / "imgs"
    (root / HOSTILE).parent.mkdir(parents=True)
    Image.new("RGB", (40, 30), COLORS["red"]).save(root / HOSTILE, format="PNG")
    huge_png(root / "bomb.png", 10_000, 8_000)  # over the handler's limit (50 MP)
    huge_png(root / "pillow-bomb.png", 100_000, 100_000)  # over Pillow's own
    os.mkfifo(root / "fifo.png")
    rows = [row(HOSTILE, HOSTILE_LABEL, 0.2), row("missing.png", "red", 0.3), row("bomb.png", "red", 0.4),
            row("pillow-bomb.png", "red", 0.4), row("fifo.png", "red", 0.5),
            row("../outside.png", "red", 0.6),
            row('<img src="http://example.com/x">.png', None, error='<b>bad</b> "quoted"')]
    output = tmp_path / "report.html"
    make_report([write_rows(tmp_path / "rows.jsonl", rows)], output, root=root)
    return output


def test_hostile_names_and_labels_are_escaped_and_bad_images_are_placeholders(hostile_report):
    html = hostile_report.read_text(encoding="utf-8")
    for raw in ("<script>", HOSTILE_LABEL, '<img src="http', "<b>bad</b>"):
        assert raw not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.png" in html and "say &#34;hi&#34; &lt;b&gt;" in html
    assert html.count('src="data:image/jpeg;base64,') == 1  # the hostile name's real image
    assert html.count('class="placeholder"') == 5
    for why in ("cannot read the file: No such file or directory", "80,000,000 pixels, over the limit of",
                "could be decompression bomb", "not a regular file (a FIFO)", "the path leaves --root"):
        assert why in html


@needs_chromium
def test_hostile_report_runs_no_script_and_requests_nothing_in_chromium(hostile_report):
    assert_clean_page(open_page(hostile_report.as_uri()), SECTIONS[:5])


def test_ten_thousand_rows_make_a_report_of_bounded_size(tmp_path):
    """100 classes, 5 % failed, noise images (JPEG's largest thumbnails): every list stays capped."""
    rng = random.Random(0)
    root = tmp_path / "imgs"
    noise = []
    for i in range(20):
        noise.append(tmp_path / f"noise-{i}.png")
        Image.frombytes("RGB", (128, 128), rng.randbytes(128 * 128 * 3)).save(noise[-1])
    rows, failed = [], Counter()
    for i in range(10_000):
        true = f"class-{i % 100:03d}"
        path = f"{true}/{i:05d}.png"
        (root / true).mkdir(parents=True, exist_ok=True)
        os.link(noise[i % 20], root / path)
        if i % 20 == 0:
            rows.append(row(path, None, true=true, error=f"cannot decode #{i}", http_status=400 + i % 3))
            failed[400 + i % 3] += 1
        else:
            predicted = true if rng.random() < 0.9 else f"class-{rng.randrange(100):03d}"
            rows.append(row(path, predicted, rng.random(), true, latency_ms=rng.uniform(5, 50)))
    results_file = write_rows(tmp_path / "results.jsonl", rows)
    started = time.perf_counter()
    done = subprocess.run([str(PYTHON), str(REPORT), str(results_file), "--output", str(tmp_path / "r.html"),
                           "--root", str(root)], capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    size = (tmp_path / "r.html").stat().st_size
    print(f"\n10,000 rows: report in {took:.1f} s (the whole command), {size:,} bytes")
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert html.count("<figure>") == html.count('src="data:image/jpeg') == 48 + MISCLASSIFIED_SHOWN
    assert "(60 more labels)" in html
    assert all(f"and {n - FAILED_SHOWN} more" in html for n in failed.values())
    # 96 thumbnails of at most ~6 KB, and 100 classes of tables
    assert size < 96 * 6_500 + 150_000


def test_unreadable_results_files_are_one_line_and_exit_2(tmp_path):
    damaged = tmp_path / "damaged.jsonl"
    good = json.dumps(row("a.png", "red", 0.5)), json.dumps(row("b.png", "red", 0.5))
    damaged.write_text(f"{good[0]}\nnot json\n{good[1]}\n", encoding="utf-8")
    cases = [(tmp_path / "missing.jsonl", "missing.jsonl: results file not found"),
             (tmp_path, f"{tmp_path}: results file not found"),
             (damaged, "damaged.jsonl:2: unreadable row")]
    for path, message in cases:
        done = subprocess.run([str(PYTHON), str(REPORT), str(path), "--output", str(tmp_path / "r.html")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    skipped = subprocess.run([str(PYTHON), str(REPORT), str(damaged), "--skip-unreadable", "--output",
                              str(tmp_path / "r.html")], capture_output=True, text=True, timeout=60)
    assert skipped.returncode == 0 and "report: 2 files, ok 2, failed 0" in skipped.stdout


# ---- a real run: classify_dir.py against the session's TorchServe ----

@pytest.mark.integration
@needs_chromium
def test_classify_dir_writes_summary_and_a_report_chromium_loads_cleanly(server, tmp_path):
    root = tmp_path / "val"
    write_images(root, 12)
    for i in range(3):  # red images in the green folder: misclassified
        Image.new("RGB", (8, 8), COLORS["red"]).save(root / "green" / f"wrong-{i}.png")
    (root / "blue" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    output, report = tmp_path / "out" / "val.jsonl", tmp_path / "out" / "val.html"
    output.parent.mkdir()
    done = run_client(server, root, output, "--class-folders", "--report", str(report),
                      "--max-failed-share", "0.5")
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "out" / "val.summary.json").read_text(encoding="utf-8"))
    assert (saved["files"], saved["ok"], saved["failed_by_reason"]) == (16, 15, {"http 400": 1})
    assert (saved["accuracy"]["correct"], saved["accuracy"]["classified"]) == (12, 15)
    assert saved["models"] == {server.model: 16} and saved["versions"] == {server.version: 16}
    (replica,) = saved["run"]["replicas"].values()
    assert replica["served_precision"] == "fp32" and replica["files"] == 16
    assert saved["run"]["images_per_s"] > 0 and saved["latency_ms"]["p99"] >= saved["latency_ms"]["p50"] > 0
    page = open_page(report.as_uri())
    assert_clean_page(page, SECTIONS)
    (tmp_path / "report.png").write_bytes(page.screenshot)
    html = report.read_text(encoding="utf-8")
    assert html.count('src="data:image/jpeg;base64,') == 15 + 3  # every ok image, and the 3 mistakes again
