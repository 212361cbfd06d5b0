"""Result rows of classify_dir.py: building, writing and reading them back, resuming, run statistics.

One row per file (JSONL, or CSV by the output's extension), flushed as it is written; with class
folders, the accuracy, per-class precision/recall and a confusion-matrix PNG come from the rows.
"""
from __future__ import annotations

import csv
import json
import os
import socket
import statistics
from array import array
from collections import Counter
from pathlib import Path

from core.errors import UserError
from core.files import true_label_of
from core.rows import read_rows

# replica: the fleet entry's name that answered, or HOST:PORT of a single --url
FIELDS = ("path", "status", "label", "probability", "topk", "error", "http_status", "model",
          "model_version", "latency_ms", "replica")


def ok_row(row: dict, answer: list, topk: int) -> dict:
    """Fill a row from the handler's top-k list (highest first)."""
    top = [{"label": a["label"], "index": int(a["index"]), "probability": float(a["probability"])}
           for a in answer[:topk]]
    return {**row, "status": "ok", "label": top[0]["label"], "probability": top[0]["probability"],
            "topk": top, "error": None, "http_status": 200}


def error_row(row: dict, message: str, http_status: int | None) -> dict:
    """Fill a row for a file that got no prediction."""
    return {**row, "status": "error", "label": None, "probability": None, "topk": None,
            "error": message, "http_status": http_status}


class RowWriter:
    """Appends rows to JSONL or CSV, one flush per row."""

    def __init__(self, path: Path, fields: tuple[str, ...], append: bool, as_csv: bool | None = None):
        self.fields = fields
        self.csv = path.suffix.lower() == ".csv" if as_csv is None else as_csv
        exists = append and path.exists() and path.stat().st_size > 0
        # surrogateescape: a file name that is not valid UTF-8 is written back byte for byte
        try:
            self.file = open(path, "a" if append else "w", encoding="utf-8", newline="",
                             errors="surrogateescape")
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
        if self.csv:
            self.writer = csv.DictWriter(self.file, fieldnames=fields, extrasaction="ignore")
            if not exists:
                self.writer.writeheader()

    def write(self, row: dict) -> None:
        """Write one row and flush it to the operating system."""
        row = {f: row.get(f) for f in self.fields}
        if self.csv:
            if row.get("topk") is not None:
                row["topk"] = json.dumps(row["topk"], ensure_ascii=False)
            self.writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
        else:
            self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        """Close the file."""
        self.file.close()


def keep_finished_rows(path: Path, fields: tuple[str, ...], stats: "Stats", model: str | None = None,
                       version: str | None = None) -> set[str]:
    """--resume: rewrite the output with only its ok rows (first per path); return their paths.

    Rows of another model, or of another version than `version` (None: any), are refused: a run
    after a rollout must not mix versions silently (--allow-mixed-versions passes None).
    """
    done: set[str] = set()
    if not path.exists():
        return done
    # a name of this process's own: two pods resuming one output never write one temporary file
    partial = path.with_name(f".{path.name}.resume-{socket.gethostname()}-{os.getpid()}.tmp")
    writer = RowWriter(partial, fields, append=False, as_csv=path.suffix.lower() == ".csv")
    try:
        for line, row in read_rows(path):
            if row.get("status") != "ok" or row["path"] in done:
                continue
            if model is not None and row.get("model") not in (None, model):
                raise UserError(f"{path}:{line}: a row of model {row.get('model')!r}, and this run uses "
                                f"{model!r}: give the run its own --output")
            if version is not None and row.get("model_version") not in (None, "", version):
                raise UserError(f"{path}:{line}: a row of {model} version {row.get('model_version')}, and this "
                                f"run's version is {version}: give the run its own --output, or pass "
                                f"--allow-mixed-versions to keep both")
            done.add(row["path"])
            if isinstance(row.get("topk"), str):  # CSV: back to a list
                row["topk"] = json.loads(row["topk"]) if row["topk"] else None
            if "true_label" in fields and not row.get("true_label"):
                row["true_label"] = true_label_of(row["path"])
            writer.write(row)
            stats.add(row, None, resumed=True)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(partial, path)
    return done


class Stats:
    """Counts, latencies and (with class folders) the confusion counts; O(files) floats at most."""

    def __init__(self):
        self.files = self.ok = self.resumed = 0
        self.failed: Counter[str] = Counter()
        self.latencies = array("f")
        self.confusion: Counter[tuple[str, str]] = Counter()
        self.true_counts: Counter[str] = Counter()
        self.errors_with_label = 0
        self.versions: Counter[str] = Counter()  # rows per model version that answered

    def add(self, row: dict, reason: str | None, resumed: bool = False) -> None:
        """Account for one row."""
        self.files += 1
        self.resumed += resumed
        if not resumed and row.get("latency_ms") is not None:
            self.latencies.append(float(row["latency_ms"]))
        if row.get("model_version"):
            self.versions[str(row["model_version"])] += 1
        true = row.get("true_label")
        if true:
            self.true_counts[true] += 1
        if row.get("status") == "ok":
            self.ok += 1
            if true:
                self.confusion[(true, row["label"])] += 1
        else:
            self.failed[reason or "error"] += 1
            self.errors_with_label += bool(true)

    def percentile(self, q: float) -> float:
        """The q-th percentile of this run's latencies, 0 when none."""
        return percentile(self.latencies, q)


def percentile(values, q: float) -> float:
    """The q-th percentile of `values` (statistics.quantiles, inclusive), 0 when there are none."""
    if not len(values):
        return 0.0
    if len(values) == 1:
        return float(values[0])
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[min(98, max(0, round(q) - 1))]


def report_class_metrics(stats: Stats, png: Path) -> str:
    """Print accuracy, error rate, per-class precision/recall; write the confusion matrix PNG."""
    classified = sum(stats.confusion.values())
    correct = sum(n for (t, p), n in stats.confusion.items() if t == p)
    labelled = sum(stats.true_counts.values())
    labels = sorted({t for t, _ in stats.confusion} | {p for _, p in stats.confusion}
                    | set(stats.true_counts))
    lines = [f"accuracy {correct / max(1, classified):.4f}, error rate {1 - correct / max(1, classified):.4f} "
             f"({correct}/{classified} classified files right); "
             f"{stats.errors_with_label}/{labelled} files failed and are not counted",
             f"{'class':<24} {'precision':>9} {'recall':>9} {'support':>8}"]
    for label in labels:
        tp = stats.confusion[(label, label)]
        predicted = sum(n for (_, p), n in stats.confusion.items() if p == label)
        actual = sum(n for (t, _), n in stats.confusion.items() if t == label)
        precision = f"{tp / predicted:.4f}" if predicted else "-"
        recall = f"{tp / actual:.4f}" if actual else "-"
        lines.append(f"{label[:24]:<24} {precision:>9} {recall:>9} {actual:>8}")
    if labels:
        plot_confusion(labels, stats.confusion, png)
        lines.append(f"confusion matrix: {png}")
    return "\n".join(lines)


def plot_confusion(labels: list[str], confusion: Counter, png: Path) -> None:
    """Rows: true class, columns: predicted class; counts written in the cells when few."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = {label: i for i, label in enumerate(labels)}
    grid = [[0] * len(labels) for _ in labels]
    for (true, pred), n in confusion.items():
        grid[index[true]][index[pred]] = n
    size = min(20.0, 2.5 + 0.45 * len(labels))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(grid, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (class folder)")
    if len(labels) <= 30:
        peak = max(max(r) for r in grid) or 1
        for i, r in enumerate(grid):
            for j, n in enumerate(r):
                ax.text(j, i, n, ha="center", va="center", color="white" if n > peak / 2 else "black")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
