"""merge_shards.py: --shards N checks every shard is there once, one model only, a CSV's bad topk named."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from client.results import FIELDS, RowWriter
from client.shards import merge_shards, shard_of
from core.errors import UserError
from tests.conftest import PYTHON, REPO

MERGE = REPO / "scripts" / "merge_shards.py"
PATHS = [f"a/f{i}.png" for i in range(12)]


def ok(rel: str, model: str = "tiny") -> dict:
    return {"path": rel, "status": "ok", "label": "red", "probability": 0.9,
            "topk": [{"label": "red", "index": 0, "probability": 0.9}], "error": None, "http_status": 200,
            "model": model, "model_version": "1.0", "latency_ms": 3.0, "replica": "ts-0"}


def shard_outputs(tmp_path: Path, shards: int, model_of=lambda k: "tiny") -> list[Path]:
    """One JSONL output per shard K of `shards`, holding the rows of PATHS that hash to K."""
    outputs = []
    for k in range(shards):
        rows = [ok(p, model_of(k)) for p in PATHS if shard_of(p, shards) == k]
        out = tmp_path / f"s{k}.jsonl"
        out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        outputs.append(out)
    return outputs


def run_merge(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYTHON), str(MERGE), *map(str, args)], capture_output=True, text=True,
                          timeout=60)


def test_shards_n_refuses_a_left_out_shard_output_and_writes_nothing(tmp_path):
    outputs = shard_outputs(tmp_path, 3)
    done = run_merge(tmp_path / "merged.jsonl", outputs[0], outputs[2], "--shards", 3)
    assert done.returncode == 2, done.stdout
    assert done.stderr.strip() == "error: --shards 3 needs 3 shard outputs, got 2"
    assert not (tmp_path / "merged.jsonl").exists()


def test_shards_n_refuses_an_output_with_rows_of_two_shards(tmp_path):
    outputs = shard_outputs(tmp_path, 3)
    stray = next(p for p in PATHS if shard_of(p, 3) == 1)
    with open(outputs[0], "a", encoding="utf-8") as f:  # shard 1's file also in shard 0's output
        f.write(json.dumps(ok(stray)) + "\n")
    outputs[1].write_text("")
    with pytest.raises(UserError, match=r"more than one shard of 3: .*s0\.jsonl \(shards 0, 1\)"):
        merge_shards(outputs, tmp_path / "merged.jsonl", shards=3)


def test_shards_n_refuses_one_shard_given_twice(tmp_path):
    outputs = shard_outputs(tmp_path, 3)
    lines = outputs[0].read_text().splitlines(keepends=True)
    twice = tmp_path / "s0b.jsonl"  # shard 0 split over two outputs, shard 2 left out: 3 outputs still
    twice.write_text(lines[0])
    outputs[0].write_text("".join(lines[1:]))
    with pytest.raises(UserError, match=r"shards in more than one output: shard 0 "):
        merge_shards([outputs[0], outputs[1], twice], tmp_path / "merged.jsonl", shards=3)


def test_shards_n_merges_all_shards_and_says_which_had_no_files(tmp_path):
    outputs = shard_outputs(tmp_path, len(PATHS) * 2)  # more shards than files: some outputs empty
    empty = [k for k, out in enumerate(outputs) if out.stat().st_size == 0]
    assert empty
    done = run_merge(tmp_path / "merged.jsonl", *outputs, "--shards", len(outputs))
    assert done.returncode == 0, done.stderr
    assert f"{len(PATHS)} files" in done.stdout and f"each of {len(outputs)} shards once" in done.stdout
    assert f"shards {', '.join(map(str, empty))} with no files" in done.stdout
    assert "NOT checked" not in done.stdout
    assert len((tmp_path / "merged.jsonl").read_text().splitlines()) == len(PATHS)


def test_merge_without_dir_or_shards_says_completeness_was_not_checked(tmp_path):
    outputs = shard_outputs(tmp_path, 3)
    done = run_merge(tmp_path / "merged.jsonl", outputs[0], outputs[1])
    assert done.returncode == 0, done.stderr
    assert "completeness NOT checked: give --dir DIR or --shards N" in done.stdout


def test_merge_refuses_rows_of_two_models_naming_models_and_files(tmp_path):
    outputs = shard_outputs(tmp_path, 3, model_of=lambda k: "other" if k == 0 else "tiny")
    done = run_merge(tmp_path / "merged.jsonl", *outputs, "--shards", 3)
    assert done.returncode == 2, done.stdout
    assert done.stderr.strip() == (f"error: rows of more than one model: other ({outputs[0]}); "
                                   f"tiny ({outputs[1]}, {outputs[2]})")
    assert not (tmp_path / "merged.jsonl").exists()


def test_csv_shard_with_malformed_topk_is_a_user_error_naming_file_and_line(tmp_path):
    csv_out = tmp_path / "s0.csv"
    writer = RowWriter(csv_out, FIELDS, append=False)
    writer.write(ok("a.png"))
    writer.close()
    with open(csv_out, "a", encoding="utf-8") as f:
        f.write("b.png,ok,red,0.5,[{bad,,200,tiny,1.0,3,ts-0\r\n")
    done = run_merge(tmp_path / "merged.jsonl", csv_out)
    assert done.returncode == 2, done.stdout
    assert done.stderr.strip() == f"error: {csv_out}:3: topk is not a JSON list: '[{{bad'"
    assert "Traceback" not in done.stderr
