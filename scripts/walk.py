"""The directory walk: which image files a run covers, and the class folder each one sits in."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

logger = logging.getLogger("classify_dir")
DEFAULT_EXTENSIONS = ".jpg,.jpeg,.png,.bmp,.gif,.webp,.tif,.tiff"


def iter_files(root: Path, extensions: set[str], recursive: bool = True,
               skip: frozenset[Path] = frozenset()) -> Iterator[Path]:
    """Files under root with one of the extensions (any case), in sorted order, each folder once."""
    seen: set[tuple[int, int]] = set()
    stack: list[Iterator[os.DirEntry]] = []

    def enter(directory: str) -> None:
        try:
            st = os.stat(directory)
            if (st.st_dev, st.st_ino) in seen:  # a symlink loop, or a second link to one folder
                return
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            logger.warning("skipping folder %s: %s", directory, e.strerror or e)
            return
        stack.append(iter(entries))

    enter(str(root))
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        try:
            if entry.is_dir():
                if recursive:
                    enter(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in extensions:
                # a broken link is yielded too: it becomes an "unreadable" row, not a silent gap
                if (entry.is_file() or entry.is_symlink()) and Path(entry.path) not in skip:
                    yield Path(entry.path)
        except OSError:
            continue


def true_label_of(rel: str) -> str | None:
    """With class folders, the first folder under DIR names the true label."""
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 else None
