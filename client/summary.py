"""What a batch run did, from its result rows: the numbers classify_dir prints, as data, and the
numbers the HTML report (client/report.py) shows. One pass over the rows, none kept: counts, the
latencies (O(files) floats, as results.Stats) and the paths seen (a path counts once).

classify_dir writes `<output stem>.summary.json` beside its rows at the end of every run (also one
stopped by an unusable fleet), atomically. Its fields (counts are rows, latencies milliseconds):
  results            the results files read
  files, ok, failed  one row per file; a path met again in a later file (shards given with their
                     merge) counts once, as `duplicates`
  failed_by_reason   {"http 400": n, "timeout": n, "unreadable": n, ...}: reason_of each error row
  latency_ms         {"p50", "p90", "p95", "p99"} over the rows that have one (with --resume, the
                     earlier runs' rows too); null when none has
  replicas           {name: {"files", "errors", "latency_ms"}}: per replica that answered
  models, versions   {name: rows}, {version: rows}
  labels             {label: ok rows with that top-1 label}, most first
  accuracy           null unless the rows carry true_label (--class-folders): {"accuracy",
                     "correct", "classified", "failed_labelled" (error rows, not counted),
                     "classes": {label: {"precision", "recall", "support"}} (null where undefined:
                     a class never predicted, or never true; a class folder whose every file failed
                     is listed, support 0), "confusion": [[true, predicted, n]]
                     (the non-zero cells, largest first)}
  run                classify_dir's own (null elsewhere): {"elapsed_s", "images_per_s" (this run's
                     files, not resumed ones), "resumed", "preprocess", "stopped" (why the run
                     stopped early, else null), "replicas": {name: {"files", "images_per_s",
                     "errors", "taken_out", "out_why", "served_precision"}}}
"""
from __future__ import annotations

import json
import math
from array import array
from collections import Counter
from pathlib import Path
from typing import Iterator

from client.results import class_metrics, percentile
from core.errors import UserError
from core.files import save_atomic, write_error
from core.rows import read_rows, typed_row

LATENCY_PERCENTILES = (50, 90, 95, 99)
# An error row without an HTTP status: the reason the client counted, from the start of its message
# (core/files.NotSent, client/sending.Classifier.send); tests/test_report.py checks they still match.
NO_ANSWER_REASONS = (("no answer within", "timeout"), ("connection failed", "connection"),
                     ("cannot read the file", "unreadable"), ("not a regular file", "not a regular file"),
                     ("file is", "too large"))


def summary_path(results: Path) -> Path:
    """Where a results file's summary lies: beside it, `<stem>.summary.json`."""
    return results.with_name(results.stem + ".summary.json")


def reason_of(row: dict) -> str:
    """An error row's failure reason as the run counted it: "http 400", "timeout", "unreadable", ..."""
    status = row.get("http_status")
    if status == 200:
        return "bad answer"
    if status:
        return f"http {status}"
    error = str(row.get("error") or "")
    return next((reason for prefix, reason in NO_ANSWER_REASONS if error.startswith(prefix)), "error")


def is_ok(row: dict) -> bool:
    """A row with a prediction: the others are failed files."""
    return row["status"] == "ok" and row["label"] is not None


def _text(value) -> str | None:
    return None if value is None or value == "" else str(value)


def _number(value, high: float = math.inf) -> float | None:
    """A finite float in [0, high], None for anything else (text, NaN, a list)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if 0.0 <= number <= high else None


def clean_row(row: dict) -> dict:
    """The fields the summary and the report read, each of its type or None: a hand-edited or
    foreign row is shown as it is, never a crash."""
    topk = row.get("topk") if isinstance(row.get("topk"), list) else []
    return {"path": row["path"], "status": _text(row.get("status")), "label": _text(row.get("label")),
            "probability": _number(row.get("probability"), 1.0), "error": _text(row.get("error")),
            "http_status": row.get("http_status"), "latency_ms": _number(row.get("latency_ms")),
            "model": _text(row.get("model")), "model_version": _text(row.get("model_version")),
            "replica": _text(row.get("replica")), "true_label": _text(row.get("true_label")),
            "topk": [(_text(a.get("label")), _number(a.get("probability"), 1.0))
                     for a in topk[:3] if isinstance(a, dict)]}


class Results:
    """The rows of results files (JSONL or CSV; shards' outputs, their merge), cleaned, each path once."""

    def __init__(self, paths: list[Path], strict: bool = True):
        self.paths, self.strict = paths, strict
        self.duplicates = 0
        self.rows_in: Counter[Path] = Counter()  # rows read from each file, duplicates included

    def __iter__(self) -> Iterator[dict]:
        seen: set[str] = set()
        for path in self.paths:
            if not path.is_file():  # also never opens a FIFO
                raise UserError(f"{path}: results file not found")
            try:
                for line, row in read_rows(path, self.strict):
                    if not isinstance(row.get("path"), str) or not row["path"]:
                        if self.strict:
                            raise UserError(f"{path}:{line}: a row without a path")
                        continue
                    self.rows_in[path] += 1
                    if row["path"] in seen:
                        self.duplicates += 1
                        continue
                    seen.add(row["path"])
                    yield clean_row(typed_row(row, f"{path}:{line}"))
            except OSError as e:
                raise UserError(f"{path}: cannot read: {e.strerror or e}") from None


def latency(values) -> dict | None:
    """{"p50", "p90", "p95", "p99"} of `values` in ms, None when there are none."""
    if not len(values):
        return None
    return {f"p{q}": round(percentile(values, q), 2) for q in LATENCY_PERCENTILES}


class Tally:
    """The summary of rows given one at a time."""

    def __init__(self):
        self.files = self.ok = 0
        self.failed: Counter[str] = Counter()
        self.latencies = array("f")
        self.replicas: dict[str, dict] = {}
        self.models: Counter[str] = Counter()
        self.versions: Counter[str] = Counter()
        self.labels: Counter[str] = Counter()
        self.pairs: Counter[tuple[str, str]] = Counter()  # (true, predicted) of classified labelled rows
        self.failed_labelled = 0
        self.true_labels: set[str] = set()  # a class folder whose every file failed is a class too

    def add(self, row: dict) -> None:
        """Account for one cleaned row."""
        self.files += 1
        ok = is_ok(row)
        self.ok += ok
        if not ok:
            self.failed[reason_of(row)] += 1
        replica = self.replicas.setdefault(row["replica"], {"files": 0, "errors": 0, "latencies": array("f")})
        replica["files"] += 1
        replica["errors"] += not ok
        if row["latency_ms"] is not None:
            self.latencies.append(row["latency_ms"])
            replica["latencies"].append(row["latency_ms"])
        self.models[row["model"]] += 1
        self.versions[row["model_version"]] += 1
        if ok:
            self.labels[row["label"]] += 1
        if row["true_label"] is not None:
            self.true_labels.add(row["true_label"])
            if ok:
                self.pairs[(row["true_label"], row["label"])] += 1
            else:
                self.failed_labelled += 1

    def summary(self, results: list[Path], duplicates: int = 0) -> dict:
        """The summary.json fields but `run`."""
        return {"results": [str(p) for p in results], "files": self.files, "ok": self.ok,
                "failed": sum(self.failed.values()), "failed_by_reason": dict(self.failed.most_common()),
                "duplicates": duplicates, "latency_ms": latency(self.latencies),
                "replicas": {name: {"files": r["files"], "errors": r["errors"],
                                    "latency_ms": latency(r["latencies"])}
                             for name, r in sorted(self.replicas.items(), key=lambda kv: str(kv[0])) if name},
                "models": _named(self.models), "versions": _named(self.versions),
                "labels": dict(self.labels.most_common()),
                "accuracy": class_metrics(self.pairs, self.failed_labelled, self.true_labels), "run": None}


def _named(counts: Counter) -> dict:
    return dict(sorted((name, n) for name, n in counts.items() if name is not None))


def summary_of(results: Results) -> dict:
    """Read every row once -> the summary."""
    tally = Tally()
    for row in results:
        tally.add(row)
    return tally.summary(results.paths, results.duplicates)


def write_summary(summary: dict, path: Path) -> None:
    """summary.json, atomically (a kill leaves the previous one whole); ASCII, so any label is valid JSON."""
    text = json.dumps(summary, indent=2) + "\n"
    try:
        save_atomic(lambda f: f.write(text.encode("ascii")), path)
    except OSError as e:
        raise write_error(path, e) from None


RUN_FIELDS = ("elapsed_s", "images_per_s", "resumed", "preprocess", "stopped")
RUN_REPLICA_FIELDS = ("files", "images_per_s", "errors", "taken_out", "out_why", "served_precision")


def read_run(results: Path, rows: int) -> dict | None:
    """The `run` of the summary.json beside `results` when it describes these `rows` (a stale or
    damaged one, or none: None); only its known fields, each a number, a text or None."""
    path = summary_path(results)
    try:
        summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None  # never a FIFO
    except (OSError, ValueError):
        return None
    fits = isinstance(summary, dict) and summary.get("files") == rows and isinstance(summary.get("run"), dict)
    if not fits:
        return None
    replicas = summary["run"].get("replicas")
    return {**_scalars(summary["run"], RUN_FIELDS),
            "replicas": {str(name): _scalars(r, RUN_REPLICA_FIELDS)
                         for name, r in (replicas.items() if isinstance(replicas, dict) else ())}}


def _scalars(fields: object, names: tuple[str, ...]) -> dict:
    fields = fields if isinstance(fields, dict) else {}
    return {k: fields.get(k) if isinstance(fields.get(k), (str, int, float)) else None for k in names}
