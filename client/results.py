"""Result rows of classify_dir.py: building, writing and reading them back, resuming, run statistics.

One row per file (JSONL, or CSV by the output's extension), flushed as it is written; with class
folders, the accuracy, per-class precision/recall and a confusion-matrix PNG come from the rows.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from array import array
from collections import Counter
from pathlib import Path
from typing import Iterable

from core.errors import NoSpace, UserError
from core.files import atomic_path, save_atomic, true_label_of, write_error
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
    """Appends rows to JSONL or CSV, each written to the operating system as it comes, whole or not at
    all: a write that fails (a full disk) is cut back off the file, so that every row before it stays
    readable and --resume redoes the rest; the failure is NoSpace (exit 3) or UserError naming the file."""

    def __init__(self, path: Path, fields: tuple[str, ...], append: bool, as_csv: bool | None = None):
        self.path, self.fields = path, fields
        self.csv = path.suffix.lower() == ".csv" if as_csv is None else as_csv
        exists = append and path.exists() and path.stat().st_size > 0
        try:  # unbuffered: nothing is left in a buffer to fail again at close
            self.file = open(path, "ab" if append else "wb", buffering=0)
            self.size = os.fstat(self.file.fileno()).st_size  # bytes of whole rows
        except OSError as e:
            raise write_error(path, e) from None
        if self.csv:
            self.text = io.StringIO(newline="")
            self.writer = csv.DictWriter(self.text, fieldnames=fields, extrasaction="ignore")
            if not exists:
                self.writer.writeheader()
                self._emit(self._take())

    def write(self, row: dict) -> None:
        """Write one row to the operating system (no buffer of ours), or raise with the file as it was."""
        row = {f: row.get(f) for f in self.fields}
        if self.csv:
            if row.get("topk") is not None:
                row["topk"] = json.dumps(row["topk"], ensure_ascii=False)
            self.writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
            self._emit(self._take())
        else:
            self._emit(json.dumps(row, ensure_ascii=False) + "\n")

    def _take(self) -> str:
        text = self.text.getvalue()
        self.text.seek(0)
        self.text.truncate()
        return text

    def _emit(self, text: str) -> None:
        # surrogateescape: a file name that is not valid UTF-8 is written back byte for byte
        data = text.encode("utf-8", "surrogateescape")
        fd, rest = self.file.fileno(), memoryview(data)
        try:
            while rest:  # the system call itself: a nearly full disk takes part of a row, then none
                rest = rest[os.write(fd, rest):]
        except OSError as e:
            try:  # the part that got in is cut off: the file ends on a whole row again
                os.ftruncate(fd, self.size)
                os.lseek(fd, self.size, os.SEEK_SET)
            except OSError:
                pass  # not a regular file (/dev/full, a pipe): nothing to cut
            raise write_error(self.path, e) from None
        self.size += len(data)

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
    # the previous file stays whole until the kept rows are written (a temporary name of this process's own)
    try:
        with atomic_path(path) as partial:
            writer = RowWriter(partial, fields, append=False, as_csv=path.suffix.lower() == ".csv")
            try:
                for line, row in read_rows(path):
                    if row.get("status") != "ok" or row["path"] in done:
                        continue
                    if model is not None and row.get("model") not in (None, model):
                        raise UserError(f"{path}:{line}: a row of model {row.get('model')!r}, and this run "
                                        f"uses {model!r}: give the run its own --output")
                    if version is not None and row.get("model_version") not in (None, "", version):
                        raise UserError(f"{path}:{line}: a row of {model} version "
                                        f"{row.get('model_version')}, and this run's version is {version}: give "
                                        f"the run its own --output, or pass --allow-mixed-versions to keep both")
                    done.add(row["path"])
                    if isinstance(row.get("topk"), str):  # CSV: back to a list
                        row["topk"] = json.loads(row["topk"]) if row["topk"] else None
                    if "true_label" in fields and not row.get("true_label"):
                        row["true_label"] = true_label_of(row["path"])
                    writer.write(row)
                    stats.add(row, None, resumed=True)
            finally:
                writer.close()
    except NoSpace as e:  # the temporary copy is gone (atomic_path): name the output, not it
        raise NoSpace(f"--resume: cannot rewrite {path} with its finished rows: {str(e).rsplit(': ', 1)[-1]} "
                      f"({path} is left as it was)") from None
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


def class_metrics(pairs: Counter, failed_labelled: int, labels: Iterable[str] = ()) -> dict | None:
    """Accuracy and per-class precision/recall (sklearn.metrics) of (true, predicted) counts, for the
    classes of the pairs and `labels` (a class folder whose every file failed); None without true labels.

    The summary's `accuracy` field (client/summary.py) and classify_dir's printed table alike."""
    if not pairs and not failed_labelled:
        return None
    classified = sum(pairs.values())
    correct = sum(n for (true, predicted), n in pairs.items() if true == predicted)
    labels = sorted({*labels, *(label for pair in pairs for label in pair)})
    metrics = {"accuracy": round(correct / classified, 6) if classified else None, "correct": correct,
               "classified": classified, "failed_labelled": failed_labelled,
               "classes": {label: {"precision": None, "recall": None, "support": 0} for label in labels},
               "confusion": [[t, p, n] for (t, p), n in pairs.most_common()]}
    if classified:
        # scikit-learn loads in ~1.5 s: only runs with class folders pay for it
        import numpy as np
        from sklearn.metrics import precision_recall_fscore_support

        true, predicted = zip(*pairs, strict=True)
        precision, recall, _, support = precision_recall_fscore_support(
            true, predicted, labels=labels, sample_weight=list(pairs.values()), zero_division=np.nan)
        metrics["classes"] = {label: {"precision": _finite(p), "recall": _finite(r), "support": int(n)}
                              for label, p, r, n in zip(labels, precision, recall, support, strict=True)}
    return metrics


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 6)


def report_class_metrics(stats: Stats, png: Path) -> str:
    """Print accuracy, error rate, per-class precision/recall; write the confusion matrix PNG."""
    metrics = class_metrics(stats.confusion, stats.errors_with_label, stats.true_counts)
    if metrics is None:
        return "accuracy: no file under a class folder"
    classified, correct = metrics["classified"], metrics["correct"]
    accuracy = metrics["accuracy"] or 0.0
    lines = [f"accuracy {accuracy:.4f}, error rate {1 - accuracy:.4f} "
             f"({correct}/{classified} classified files right); "
             f"{metrics['failed_labelled']}/{sum(stats.true_counts.values())} files failed and are not counted",
             f"{'class':<24} {'precision':>9} {'recall':>9} {'support':>8}"]
    for label, numbers in metrics["classes"].items():
        precision, recall = (f"{numbers[k]:.4f}" if numbers[k] is not None else "-" for k in ("precision", "recall"))
        lines.append(f"{label[:24]:<24} {precision:>9} {recall:>9} {numbers['support']:>8}")
    if classified:
        plot_confusion(stats.confusion, list(metrics["classes"]), png)
        lines.append(f"confusion matrix: {png}")
    return "\n".join(lines)


def plot_confusion(pairs: Counter, labels: list[str], png: Path) -> None:
    """Rows: true class, columns: predicted class (sklearn's ConfusionMatrixDisplay); counts written
    in the cells when few."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

    true, predicted = zip(*pairs, strict=True)
    grid = confusion_matrix(true, predicted, labels=labels, sample_weight=list(pairs.values()))
    size = min(20.0, 2.5 + 0.45 * len(labels))
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(grid, display_labels=labels).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation="vertical", include_values=len(labels) <= 30)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (class folder)")
    fig.tight_layout()
    try:  # whole or not at all, as the rows: a full disk is NoSpace (exit 3) naming the file
        save_atomic(lambda f: fig.savefig(f, dpi=100, format="png"), png)
    except OSError as e:
        raise write_error(png, e) from None
    finally:
        plt.close(fig)
