"""A disk (or quota) that fills up under classify_dir: one line naming the file and "no space left",
exit code 3 (retry later), every row written before kept whole, no temporary file left, and a
--resume after space is freed that finishes with every file exactly once.

No unprivileged test can make a small filesystem (a tmpfs or a loop mount needs root), and /dev/full
refuses every byte, so no row could be kept before it. DiskBudget gives the process a disk that holds
a number of bytes more under one folder, at the operating system's boundary: os.write takes part of
a write, then answers ENOSPC, as write(2) does on a disk that fills; os.fsync answers ENOSPC once the
budget is spent, as filesystems that report late (NFS) do. /dev/full is the kernel's own ENOSPC, for
a writer that must say it as well.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from client import results
from client.summary import write_summary
from core.errors import EXIT_CODES, EXIT_RETRY, NoSpace, UserError
from core.files import save_atomic, write_error
from core.rows import read_rows
from tests.conftest import PYTHON, REPO, write_images


class DiskBudget:
    """A disk that holds `budget` more bytes in the files under `root`, then none (ENOSPC)."""

    def __init__(self, root: Path, budget: int):
        self.root, self.budget = f"{os.path.realpath(root)}{os.sep}", budget
        self.real_write, self.real_fsync = os.write, os.fsync

    def install(self, setattr_: Callable[[object, str, object], None]) -> None:
        setattr_(os, "write", self.write)
        setattr_(os, "fsync", self.fsync)

    def under(self, fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith(self.root)
        except OSError:
            return False

    def write(self, fd: int, data) -> int:
        if not self.under(fd):
            return self.real_write(fd, data)
        if self.budget <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = self.real_write(fd, bytes(memoryview(data)[:self.budget]))  # a short write at the end
        self.budget -= written
        return written

    def fsync(self, fd: int) -> None:
        if self.under(fd) and self.budget <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.real_fsync(fd)


def row(i: int) -> dict:
    return {"path": f"red/{i:04d}.png", "status": "ok", "label": "red", "probability": 0.9,
            "topk": [{"label": "red", "index": 0, "probability": 0.9}], "error": None, "http_status": 200,
            "model": "tiny", "model_version": "1.0", "latency_ms": 1.5, "replica": "127.0.0.1:8080"}


def temporary_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---- no server ----

def test_rows_on_the_kernels_full_device_are_no_space_not_an_oserror(tmp_path):
    out = tmp_path / "results.jsonl"
    out.symlink_to("/dev/full")  # every write(2) there answers ENOSPC
    writer = results.RowWriter(out, results.FIELDS, append=False)
    with pytest.raises(NoSpace) as failure:
        writer.write(row(0))
    writer.close()  # nothing left in a buffer to fail again
    assert str(failure.value) == f"cannot write {out}: no space left on its device"
    assert EXIT_CODES[next(k for k in EXIT_CODES if isinstance(failure.value, k))] == EXIT_RETRY == 3


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_row_the_disk_cannot_hold_is_cut_off_and_the_rows_before_stay(tmp_path, monkeypatch, suffix):
    out = tmp_path / f"results{suffix}"
    probe = tmp_path / f"probe{suffix}"  # how many bytes a header and two rows take
    writer = results.RowWriter(probe, results.FIELDS, append=False)
    writer.write(row(0))
    writer.write(row(1))
    writer.close()
    DiskBudget(tmp_path, probe.stat().st_size + 40).install(monkeypatch.setattr)  # the third row: 40 bytes
    writer = results.RowWriter(out, results.FIELDS, append=False)
    writer.write(row(0))
    writer.write(row(1))
    with pytest.raises(NoSpace, match=rf"^cannot write {out}: no space left on its device$"):
        writer.write(row(2))
    with pytest.raises(NoSpace):  # and again: no half row is left between the rows
        writer.write(row(3))
    writer.close()
    assert out.read_bytes() == probe.read_bytes()
    assert [r["path"] for _, r in read_rows(out, strict=True)] == ["red/0000.png", "red/0001.png"]


def test_resume_on_a_full_disk_leaves_the_output_as_it_was_and_no_temporary_file(tmp_path, monkeypatch):
    out = tmp_path / "results.jsonl"
    writer = results.RowWriter(out, results.FIELDS, append=False)
    for i in range(3):
        writer.write(row(i))
    writer.close()
    before = out.read_bytes()
    DiskBudget(tmp_path, 0).install(monkeypatch.setattr)
    with pytest.raises(NoSpace) as failure:
        results.keep_finished_rows(out, results.FIELDS, results.Stats(), "tiny", "1.0")
    assert str(failure.value) == (f"--resume: cannot rewrite {out} with its finished rows: no space left on its "
                                  f"device ({out} is left as it was)")
    assert out.read_bytes() == before and temporary_files(tmp_path) == []


def test_summary_and_report_writes_on_a_full_disk_are_no_space(tmp_path, monkeypatch):
    summary = tmp_path / "results.summary.json"
    write_summary({"files": 1}, summary)
    DiskBudget(tmp_path, 0).install(monkeypatch.setattr)  # the bytes go in; fsync says the disk is full
    with pytest.raises(NoSpace, match=rf"^cannot write {summary}: no space left on its device$"):
        write_summary({"files": 2}, summary)
    with pytest.raises(NoSpace, match="report.html: no space left"):
        save_atomic(lambda f: f.write(b"<html>"), tmp_path / "report.html")
    assert json.loads(summary.read_text()) == {"files": 1} and temporary_files(tmp_path) == []


def test_a_full_quota_says_so_and_other_write_errors_stay_usage_errors(tmp_path):
    quota = write_error(tmp_path / "r.jsonl", OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))
    assert isinstance(quota, NoSpace) and str(quota).endswith("r.jsonl: no space left in the disk quota")
    other = write_error(tmp_path / "r.jsonl", OSError(errno.EIO, os.strerror(errno.EIO)))
    assert type(other) is UserError and str(other).endswith("r.jsonl: Input/output error")


# ---- the command, against the session's TorchServe ----

RUNNER = """\
import os, sys
sys.path.insert(0, {repo!r})
from tests.test_disk_full import DiskBudget
budget = os.environ.get("DISK_BUDGET")
if budget is not None:
    DiskBudget(os.environ["DISK_ROOT"], int(budget)).install(setattr)
sys.argv[0] = "classify_dir.py"
from client.classify_dir import cli
cli()
"""


@pytest.mark.integration
def test_classify_dir_on_a_disk_that_fills_exits_3_and_resume_finishes_once_space_is_freed(server, tmp_path):
    images, outputs = tmp_path / "images", tmp_path / "outputs"
    outputs.mkdir()
    paths = write_images(images, 12)
    out = outputs / "results.jsonl"
    runner = tmp_path / "classify_on_a_full_disk.py"
    runner.write_text(RUNNER.format(repo=str(REPO)))

    def classify(*extra: str, budget: int | None) -> subprocess.CompletedProcess:
        env = {**os.environ, "DISK_ROOT": str(outputs)}
        if budget is not None:
            env["DISK_BUDGET"] = str(budget)
        return subprocess.run([str(PYTHON), str(runner), str(images), "--model", server.model, "--url",
                               server.inference_url, "--management-url", server.management_url, "--token-file",
                               str(server.key_file), "--output", str(out), "--concurrency", "2", *extra],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    def one_line(result: subprocess.CompletedProcess) -> str:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        return lines[0]

    # the disk holds about four rows: the run stops there, every whole row kept
    first = classify(budget=1500)
    assert first.returncode == 3, first.stdout + first.stderr
    kept = [r["path"] for _, r in read_rows(out, strict=True)]
    assert 0 < len(kept) < len(paths) and out.read_bytes().endswith(b"\n")
    line = one_line(first)
    assert line.startswith(f"error: cannot write {out}: no space left on its device")
    assert line.endswith(f"{len(kept)} rows kept in {out}: rerun with --resume to finish")
    assert temporary_files(outputs) == []

    # --resume while the disk is still full: the output untouched, no temporary copy left behind
    before = out.read_bytes()
    second = classify("--resume", budget=0)
    assert second.returncode == 3, second.stdout + second.stderr
    assert one_line(second) == (f"error: --resume: cannot rewrite {out} with its finished rows: no space left "
                                f"on its device ({out} is left as it was)")
    assert out.read_bytes() == before and temporary_files(outputs) == []

    # space freed: --resume finishes, every file exactly once
    third = classify("--resume", budget=None)
    assert third.returncode == 0, third.stdout + third.stderr
    rows = [r for _, r in read_rows(out, strict=True)]
    assert sorted(r["path"] for r in rows) == sorted(paths)
    assert all(r["status"] == "ok" for r in rows)
    assert f"files {len(paths)} ({len(kept)} already done, resumed)" in third.stdout
    assert temporary_files(outputs) == []
