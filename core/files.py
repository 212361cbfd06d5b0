"""Image files on disk, for training's lists and the client's runs alike: which extensions are images,
the one directory walk, reading a file without blocking, the class folder a file sits in; and the one
atomic write (checkpoints, exported models, run summaries, resumed results), and what a write that
finds the disk full raises (NoSpace, exit code 3: worth retrying once space is freed).

The walk's link policy, everywhere: a link to a folder is followed, each folder is entered once (by
device and inode), so a link loop or two links to one folder cannot repeat or hang a walk; a link to
a file is yielded like the file, and so are broken links, FIFOs and devices with an image extension,
so that a caller can name each one instead of skipping it silently.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from core.errors import NoSpace, UserError

logger = logging.getLogger("classify_dir")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_EXTENSIONS = ",".join(IMAGE_EXTENSIONS)  # the --extensions flags' default
DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # config.properties' max_request_size: the server answers 413 above it
FILE_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
              stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


class NotSent(Exception):
    """A file the client does not send; `reason` counts it in the summary, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def parse_extensions(text: str, flag: str = "--extensions") -> set[str]:
    """'jpg, .PNG' -> {'.jpg', '.png'}; UserError when it names none."""
    extensions = {("." + e.strip().lstrip(".")).lower() for e in text.split(",") if e.strip().lstrip(".")}
    if not extensions:
        raise UserError(f"{flag} names no extension: {text!r}")
    return extensions


def _identity(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)  # follows links: a file reached by any path or link has one identity
    except OSError:
        return None
    return st.st_dev, st.st_ino


def iter_files(root: Path, extensions: set[str], recursive: bool = True,
               skip: frozenset[Path] = frozenset()) -> Iterator[Path]:
    """Files under root with one of the extensions (any case), in sorted order, each folder once.

    Every non-folder entry is yielded (links, broken ones, FIFOs, devices), so each becomes a row; the
    files in `skip` (the run's own outputs) are recognised by identity, however DIR was written.
    """
    skip_ids = {i for i in map(_identity, skip) if i is not None}
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
                # a broken link or a FIFO is yielded too: it becomes an error row, not a silent gap
                if not skip_ids or _identity(entry.path) not in skip_ids:
                    yield Path(entry.path)
        except OSError:
            continue


def read_image(path: Path, max_bytes: int) -> bytes:
    """A regular file's bytes (links resolved), at most `max_bytes`; NotSent otherwise; never blocks."""
    try:
        # stat first: opening a FIFO blocks for a writer and opening a device can act on it
        _check_regular(os.stat(path), max_bytes)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise NotSent("unreadable", f"cannot read the file: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        try:
            _check_regular(os.fstat(fd), max_bytes)  # the path may name another file since the stat
            data = f.read(max_bytes + 1)  # a file can grow, and /proc files say size 0
        except OSError as e:
            raise NotSent("unreadable", f"cannot read the file: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise NotSent("too large", f"file is over {max_bytes} bytes, the request size limit "
                                   f"(--max-request-size)")
    return data


def _check_regular(st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = FILE_KINDS.get(stat.S_IFMT(st.st_mode), "unknown kind")
        raise NotSent("not a regular file", f"not a regular file ({kind}): not sent")
    if st.st_size > max_bytes:
        raise NotSent("too large", f"file is {st.st_size} bytes, over the request size limit of "
                                   f"{max_bytes} bytes (--max-request-size)")


def true_label_of(rel: str) -> str | None:
    """With class folders, the first folder under DIR names the true label."""
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 else None


NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})  # the disk is full; the user's quota is full


def write_error(path: str | Path, error: OSError) -> UserError:
    """The one-line error of a failed write to `path`: NoSpace (exit 3) for a full disk or quota, else
    UserError (exit 2, as an unwritable output at the start)."""
    if error.errno in NO_SPACE:
        where = "in the disk quota" if error.errno == errno.EDQUOT else "on its device"
        return NoSpace(f"cannot write {path}: no space left {where}")
    return UserError(f"cannot write {path}: {error.strerror or error}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write; renamed over `path` when the block ends without an
    exception, removed otherwise: for writers that take a path (TorchScript, a row writer).

    A kill or a full disk mid-write leaves the previous file whole: os.replace is atomic on one
    filesystem, and fsync makes the new bytes durable before the rename. The name is this host's
    and process's own, so two pods writing one output on a shared volume never share it.
    A full disk or quota is NoSpace naming `path` (the temporary file is gone): some filesystems say
    so only at fsync.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in NO_SPACE:
            raise write_error(path, e) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def save_atomic(save: Callable[[BinaryIO], object], path: str | Path) -> None:
    """Call `save(file)` on a binary file at a temporary path beside `path`, then rename it over
    `path` (atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        save(f)
