"""A batch run's report: one self-contained HTML file made from its results files (JSONL or CSV, shards'
outputs together, or their merge), readable from disk with no server and no network.

Sections: the summary (client/summary.py's numbers; images/s from the summary.json beside a results
file), the label distribution, a top-1 probability histogram, the least confident images as
thumbnails with their top 3, the failed files by reason, and with true labels (--class-folders)
accuracy, per-class precision/recall, the confusion matrix and the misclassified images.

Bounded whatever the run's size: one pass over the rows, none kept (client/summary.py's Tally, and
Picks here); at most --least-confident + MISCLASSIFIED_SHOWN thumbnails (JPEG, at most THUMBNAIL_PX a
side: about 3 KB of base64 for a photo, 6 KB for noise, the worst case), FAILED_SHOWN files a reason,
LABEL_BARS bars, a matrix of MATRIX_LABELS classes. Charts are inline SVG drawn by the template (no
matplotlib, no font cache, crisp at any zoom); everything the rows say (file names, labels, messages)
goes through jinja2's autoescape, and a Content-Security-Policy forbids any script or request.

    .venv/bin/python scripts/report.py RESULTS [RESULTS ...] --output report.html [--root DIR]
"""
from __future__ import annotations

import argparse
import base64
import heapq
import io
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path, PurePath

import jinja2

from client.summary import Results, Tally, is_ok, read_run, reason_of
from core.errors import UserError, command
from core.files import DEFAULT_MAX_BYTES, NotSent, read_image, save_atomic, write_error
from handler.preprocessing import BadImage, open_image

DEFAULT_LEAST_CONFIDENT = 48
MISCLASSIFIED_SHOWN = 48  # the most confident mistakes first
FAILED_SHOWN = 20  # files listed per failure reason; the rest counted
LABEL_BARS = 40  # labels drawn; the rest summed in one bar
MATRIX_LABELS = 30  # a confusion matrix of more classes is shown as its most frequent mistakes
HISTOGRAM_BINS = 20
THUMBNAIL_PX = 96
JPEG_QUALITY = 70
BAR_PX, HISTOGRAM_PX = 420, 160  # the longest bar, the tallest bin


def _keep(heap: list, item: tuple, size: int) -> None:
    """Keep the `size` largest items of a heap (heapq is a min-heap)."""
    if len(heap) < size:
        heapq.heappush(heap, item)
    elif size:
        heapq.heappushpop(heap, item)


class Picks:
    """The single rows the report shows, and the histogram: bounded, given one row at a time."""

    def __init__(self, least_confident: int):
        self.size = least_confident
        self.least: list = []  # (-probability, n, row): the largest probability leaves first
        self.wrong: list = []  # (probability, n, row): the least confident mistake leaves first
        self.failed: dict[str, list[dict]] = {}
        self.bins = [0] * HISTOGRAM_BINS
        self.seen = 0  # ties never compare two rows

    def add(self, row: dict) -> None:
        self.seen += 1
        if not is_ok(row):
            shown = self.failed.setdefault(reason_of(row), [])
            if len(shown) < FAILED_SHOWN:
                shown.append(row)
            return
        p = row["probability"]
        if p is None:
            return
        self.bins[min(HISTOGRAM_BINS - 1, int(p * HISTOGRAM_BINS))] += 1
        _keep(self.least, (-p, self.seen, row), self.size)
        if row["true_label"] is not None and row["true_label"] != row["label"]:
            _keep(self.wrong, (p, self.seen, row), MISCLASSIFIED_SHOWN)


def image_path(rel: str, root: Path | None) -> Path | None:
    """The image a row names: under `root`, or as written without one; None for a path that leaves root."""
    if root is None:
        return Path(rel)
    pure = PurePath(rel)
    return None if pure.is_absolute() or ".." in pure.parts else root / pure


def thumbnail(path: Path | None) -> tuple[str | None, str | None]:
    """(a data: URI of a small JPEG of the image, None) or (None, why not); never raises.

    The file is read as the run reads it (a regular file only, never a FIFO, at most the request
    size) and decoded under the handler's limits (pixels, decoded bytes: a bomb is refused unread).
    """
    if path is None:
        return None, "the path leaves --root"
    try:
        img = open_image(read_image(path, DEFAULT_MAX_BYTES), size=(THUMBNAIL_PX, THUMBNAIL_PX))
        img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=JPEG_QUALITY)
    except (NotSent, BadImage) as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - a decoder bug on one file is its placeholder, not a lost report
        return None, f"cannot make a thumbnail: {type(e).__name__}"
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), None


class Thumbnails:
    """Each image's thumbnail made once (an image may be both unsure and wrong)."""

    def __init__(self, root: Path | None):
        self.root, self.made = root, {}

    def item(self, row: dict) -> dict:
        if row["path"] not in self.made:
            self.made[row["path"]] = thumbnail(image_path(row["path"], self.root))
        uri, why = self.made[row["path"]]
        return {**row, "thumbnail": uri, "why": why}


def label_bars(labels: dict[str, int]) -> list[dict]:
    """The bars of the label chart, largest first; past LABEL_BARS, one bar for the rest."""
    shown = list(labels.items())[:LABEL_BARS]
    rest = list(labels.values())[LABEL_BARS:]
    if rest:
        shown.append((f"({len(rest)} more labels)", sum(rest)))
    peak = max((n for _, n in shown), default=1)
    return [{"label": label, "count": n, "width": round(BAR_PX * n / peak, 1)} for label, n in shown]


def histogram(bins: list[int]) -> list[dict]:
    """The bins of the top-1 probability chart: [low, high), count and height."""
    peak = max(bins) or 1
    return [{"low": i / HISTOGRAM_BINS, "high": (i + 1) / HISTOGRAM_BINS, "count": n,
             "height": round(HISTOGRAM_PX * n / peak, 1)} for i, n in enumerate(bins)]


def confusion(accuracy: dict | None) -> dict | None:
    """The confusion matrix's labels and cells (count, shade 0-1), or None past MATRIX_LABELS classes."""
    if not accuracy or len(accuracy["classes"]) > MATRIX_LABELS:
        return None
    labels = list(accuracy["classes"])
    counts = {(t, p): n for t, p, n in accuracy["confusion"]}
    peak = max(counts.values(), default=1)
    return {"labels": labels, "rows": [[(counts.get((t, p), 0), counts.get((t, p), 0) / peak) for p in labels]
                                       for t in labels]}


def replica_rows(summary: dict, runs: list[tuple[str, dict]]) -> list[dict]:
    """Each replica's rows (files, errors, latency) with, for a single run, what the run saw of it."""
    seen = runs[0][1]["replicas"] if len(runs) == 1 else {}
    return [{"name": name, **numbers, "run": seen.get(name)} for name, numbers in summary["replicas"].items()]


def render(context: dict) -> str:
    """The HTML of report.html.j2 with autoescape on: every value is text, never markup."""
    source = resources.files("client").joinpath("report.html.j2").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, finalize=lambda value: "" if value is None else value)
    return env.from_string(source).render(context)


def make_report(paths: list[Path], output: Path, *, root: Path | None = None,
                least_confident: int = DEFAULT_LEAST_CONFIDENT, strict: bool = True) -> dict:
    """Read the rows once, write the report atomically; the summary it shows."""
    results, tally, picks = Results(paths, strict), Tally(), Picks(least_confident)
    for row in results:
        tally.add(row)
        picks.add(row)
    summary = tally.summary(paths, results.duplicates)
    runs = [(p.name, run) for p in paths if (run := read_run(p, results.rows_in[p])) is not None]
    thumbnails = Thumbnails(root)
    context = {
        "summary": summary, "runs": runs, "replicas": replica_rows(summary, runs),
        "made": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "bars": label_bars(summary["labels"]), "histogram": histogram(picks.bins),
        "least": [thumbnails.item(r) for _, _, r in sorted(picks.least, reverse=True)],
        "wrong": [thumbnails.item(r) for _, _, r in sorted(picks.wrong, reverse=True)],
        "failed": picks.failed, "matrix": confusion(summary["accuracy"]),
        "limits": {"least": least_confident, "wrong": MISCLASSIFIED_SHOWN, "failed": FAILED_SHOWN,
                   "matrix": MATRIX_LABELS, "thumbnail": THUMBNAIL_PX, "bar": BAR_PX, "bin": HISTOGRAM_PX},
    }
    # a name that is not UTF-8 (kept by surrogateescape in the rows) shows as U+FFFD, not as bad bytes
    html = render(context).encode("utf-8", "replace")
    try:
        save_atomic(lambda f: f.write(html), output)
    except OSError as e:
        raise write_error(output, e) from None
    return summary


def get_args_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", metavar="RESULTS", nargs="+",
                        help="classify_dir.py outputs, JSONL or CSV (shards' outputs together, or their "
                             "merge)")
    parser.add_argument("--output", default="report.html", help="the HTML file (default: %(default)s)")
    parser.add_argument("--root", default=None, metavar="DIR",
                        help="the classified DIR, for the thumbnails: rows name files relative to it "
                             "(default: each path as written, from the current folder)")
    parser.add_argument("--least-confident", type=int, default=DEFAULT_LEAST_CONFIDENT, metavar="N",
                        help=f"the N least confident images shown as thumbnails with their top 3; each adds "
                             f"about 3 KB to the report, 6 KB at most (with class folders, up to "
                             f"{MISCLASSIFIED_SHOWN} misclassified ones too) (default: %(default)s)")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="skip lines that cannot be read (cut short, not rows) instead of refusing")
    return parser


def check_output(output: Path, inputs: list[Path]) -> None:
    """UserError when the report cannot be written where asked, or would overwrite an input."""
    if not output.parent.is_dir():
        raise UserError(f"report folder not found: {output.parent}")
    if output.is_dir():
        raise UserError(f"{output} is a folder: name the report's file (report.html)")
    if any(output.resolve() == p.resolve() for p in inputs):
        raise UserError(f"the report {output} is also a results file: name another file")


def main(args: argparse.Namespace) -> int:
    """Make the report; exit 0, or 2 with one line naming a missing or unreadable results file (and line)."""
    paths, output = [Path(p) for p in args.results], Path(args.output)
    if args.least_confident < 0:
        raise UserError(f"--least-confident must be >= 0, not {args.least_confident}")
    check_output(output, paths)
    root = Path(args.root) if args.root else None
    if root is not None and not root.is_dir():
        raise UserError(f"--root: not a folder: {root}")
    summary = make_report(paths, output, root=root, least_confident=args.least_confident,
                          strict=not args.skip_unreadable)
    print(f"report: {summary['files']} files, ok {summary['ok']}, failed {summary['failed']} -> {output} "
          f"({output.stat().st_size:,} bytes)")
    return 0


cli = command(main, get_args_parser)
