"""What a local server's logs add to the management API: a worker's reason to fail, the batches
workers hold. Only for a server whose log folder this machine can read (serve.sh's logs/)."""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path


def worker_thread(name: str, version: str) -> str:
    """A regex of the frontend's thread name for the workers of NAME VERSION (W-<id>-NAME_VERSION)."""
    return rf"W-(\d+)-{re.escape(name)}_{re.escape(version)}"


class LogTail:
    """The complete lines a server log gets after a point, read as they come (rotation restarts it)."""

    def __init__(self, path: Path, from_end: bool = True):
        self.path = path
        self.inode, size = self._stat()
        self.offset = size if from_end else 0

    def _stat(self) -> tuple[int | None, int]:
        try:
            st = self.path.stat()
        except OSError:
            return None, 0
        return st.st_ino, st.st_size

    def size(self) -> int:
        return self._stat()[1]

    def new_lines(self) -> Iterator[str]:
        """Lines written since the last call; a partial last line waits for the next call."""
        inode, size = self._stat()
        if inode != self.inode or size < self.offset:  # rotated: another file now, or one cut back
            self.inode, self.offset = inode, 0
        try:
            with open(self.path, "rb") as log:
                log.seek(self.offset)
                for raw in log:
                    if not raw.endswith(b"\n"):
                        return
                    self.offset += len(raw)
                    yield raw.decode("utf-8", "replace")
        except OSError:
            return


EXCEPTION_LINE = re.compile(r"^(?:\w+\.)*\w*(?:Error|Exception|Exit|Interrupt)\b(?::.*)?$")
# TorchServe's own words for a failed load, raised after it logged the load's real exception
# (ts/model_service_worker.py: `raise RuntimeError("{code} - {result}")`). It says "507 - System
# out of memory" for any RuntimeError that mentions CUDA (fp16 refused on a CPU, say) and
# "500 - Unknown exception" for the others: the line before it is the cause.
WORKER_WRAPPER = re.compile(r"^RuntimeError: \d{3} - ")


def worker_failure(log: LogTail, name: str, version: str) -> str | None:
    """The exception that made a worker of NAME VERSION fail, from model_log.log since `log`'s offset:
    the last one, unless it is TorchServe's wrapper of a failed load, whose cause came just before."""
    thread = re.compile(worker_thread(name, version) + r"-std(?:out|err) MODEL_LOG - (.*)$")
    reason = cause = None  # cause: the last exception line since the last wrapper
    for line in log.new_lines():
        match = thread.search(line.rstrip("\n"))
        text = match.group(2).strip() if match else ""
        if not EXCEPTION_LINE.match(text):
            continue
        if WORKER_WRAPPER.match(text):
            reason, cause = cause or text, None
        else:
            cause = text
    return cause or reason


SERVER_START = "Torchserve version:"  # the frontend's line at each start


class BatchWatch:
    """Which workers of NAME VERSION hold a batch, from the frontend's ts_log.log.

    TorchServe's WorkerThread logs "Looping backend response" once it has sent a batch to its
    worker and "Backend response time" once every answer of it is out; the management API shows
    neither (a batch a worker holds has left pendingRequests). The log is the certain signal.
    TorchServe appends to ts_log.log across restarts and reuses worker ids: what a worker did
    before the server's last start ("Torchserve version: ..." begins each start) is forgotten.
    """

    def __init__(self, log_dir: Path, name: str, version: str):
        self.log = LogTail(log_dir / "ts_log.log", from_end=False)
        self.pattern = re.compile(worker_thread(name, version)
                                  + r" org\.pytorch\.serve\.wlm\.WorkerThread - "
                                    r"(Looping backend response|Backend response time)")
        self.holding: dict[str, bool] = {}  # worker id -> between the two lines

    def busy(self, worker_ids: list[str]) -> set[str] | None:
        """The workers among `worker_ids` inside a batch; None when the log never mentions any of them."""
        for line in self.log.new_lines():
            if line.startswith(SERVER_START):
                self.holding.clear()
                continue
            match = self.pattern.search(line)
            if match:
                self.holding[match.group(1)] = match.group(2).startswith("Looping")
        if not any(w in self.holding for w in worker_ids):
            return None
        return {w for w in worker_ids if self.holding.get(w)}
