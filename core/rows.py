"""Reading back the result rows classify_dir writes (JSONL, or CSV by the extension): the one reader for
--resume, the shard merge and training's check against the served answers.

A kill can cut the last row short; any other unreadable line is damage. The reader says which.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Iterator

from core.errors import UserError


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _records(path: Path) -> Iterator[tuple[int, dict | None]]:
    """(line, row or None when unreadable) of a JSONL or CSV output, in order."""
    # utf-8-sig: a CSV saved by a spreadsheet starts with a byte-order mark, and its header is still ours
    with open(path, encoding="utf-8-sig", newline="", errors="surrogateescape") as f:
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(f)
            try:
                for row in reader:
                    yield reader.line_num, (None if None in row.values() or None in row else row)
            except csv.Error:
                yield reader.line_num, None
            return
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            yield number, row if isinstance(row, dict) and isinstance(row.get("path"), str) else None


def read_rows(path: Path, strict: bool = False) -> Iterator[tuple[int, dict]]:
    """(line, row) of an earlier output. The last row is unfinished unless the file ends with a line
    end (a kill cut it): dropped. Any other unreadable line (cut short, not JSON, not our CSV) is
    skipped, or with `strict` a UserError naming file and line, as is a non-empty file with no row."""
    unfinished = not _ends_with_newline(path)
    previous: tuple[int, dict | None] | None = None
    count = 0
    for record in _records(path):
        if previous is not None:
            count += yield from _checked(path, previous, strict)
        previous = record
    if previous is not None and not unfinished:
        count += yield from _checked(path, previous, strict)
    if strict and count == 0 and path.stat().st_size > 0 and not _header_only(path):
        raise UserError(f"{path}: no readable row (not a classify_dir output?)")


def _header_only(path: Path) -> bool:
    """A CSV output of a run with no files: our header and nothing else."""
    if path.suffix.lower() != ".csv":
        return False
    with open(path, encoding="utf-8-sig", newline="", errors="surrogateescape") as f:
        header = next(csv.reader(f), [])
    return {"path", "status"} <= set(header)


def _checked(path: Path, record: tuple[int, dict | None], strict: bool):
    line, row = record
    if row is None:
        if strict:
            raise UserError(f"{path}:{line}: unreadable row (cut short, or not a classify_dir row); "
                            f"pass --skip-unreadable to count and skip such lines")
        return 0
    yield line, row
    return 1


def typed_row(row: dict, where: str) -> dict:
    """A row read back from CSV (all text) with JSON's types again; JSONL rows pass unchanged."""
    out = {k: (None if v == "" else v) for k, v in row.items()}
    if isinstance(out.get("topk"), str):
        try:
            out["topk"] = json.loads(out["topk"])
        except ValueError:
            raise UserError(f"{where}: topk is not a JSON list: {out['topk'][:60]!r}") from None
    for key, kind in (("probability", float), ("latency_ms", float), ("http_status", int)):
        if isinstance(out.get(key), str):
            try:
                out[key] = kind(float(out[key])) if kind is int else kind(out[key])
            except ValueError:
                pass
    return out
