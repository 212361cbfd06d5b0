"""A TorchServe of its own beside a demo server, started by scripts/serve.sh: free loopback ports,
serve.sh's environment, a short TMPDIR, its pid, start and stop. Used by the tests and the benchmark."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from core.keys import REPO_ROOT, Keys
from core.torchserve import TorchServe

SERVE = REPO_ROOT / "scripts" / "serve.sh"

DEFAULT_PORTS = {8080, 8081, 8082, 7070, 7071, 9000}  # a demo server's; never take them
PORT_NAMES = ("TS_INFERENCE_PORT", "TS_MANAGEMENT_PORT", "TS_METRICS_PORT",
              "TS_GRPC_INFERENCE_PORT", "TS_GRPC_MANAGEMENT_PORT", "TS_WORKER_PORT")
MAX_TMPDIR_CHARS = 70  # the workers' Unix socket paths under TMPDIR must stay under 108 bytes


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1, none of TorchServe's defaults."""
    sockets, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            port = s.getsockname()[1]
            if port not in DEFAULT_PORTS and port not in ports:
                ports.append(port)
    finally:
        for s in sockets:
            s.close()
    return ports


def free_port_env() -> dict[str, int]:
    """serve.sh's six port variables, each on a fresh free port."""
    return dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))


def short_tmpdir(preferred: Path, prefix: str = "ts-") -> Path:
    """`preferred`, or a new folder under /tmp when its path is too long for the workers' sockets."""
    if len(str(preferred)) > MAX_TMPDIR_CHARS and Path("/tmp").is_dir():
        return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    return preferred


def serve_env(ports: dict[str, int], store: Path, log_dir: Path, key_dir: Path, tmpdir: Path,
              start_timeout: int, **extra: str) -> dict[str, str]:
    """The caller's environment with every serve.sh setting of one server, none inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TS_") and k != "MODEL_STORE"}
    env.update({k: str(v) for k, v in ports.items()})
    env.update(MODEL_STORE=str(store), TS_LOG_DIR=str(log_dir), TS_KEY_DIR=str(key_dir),
               TS_TMPDIR=str(tmpdir), TS_START_TIMEOUT=str(start_timeout))
    env.update(extra)
    return env


def read_pid(log_dir: Path) -> int | None:
    """The frontend's pid from serve.sh's state file in `log_dir`, None when not running."""
    state = log_dir / "serve.state"
    for line in state.read_text().splitlines() if state.exists() else []:
        if line.startswith("pid="):
            return int(line.split("=", 1)[1])
    return None


@dataclass
class LocalServer:
    """A TorchServe run by scripts/serve.sh on its own ports, store, logs, TMPDIR and key file."""

    base: Path
    store: Path
    mars: list[str] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=free_port_env)
    config: Path | None = None  # another config.properties (serve.sh's TS_CONFIG)
    extra_env: dict[str, str] = field(default_factory=dict)
    start_timeout: int = 120
    tmpdir: Path | None = None  # short: it holds the workers' Unix sockets

    def __post_init__(self):
        (self.base / "keys").mkdir(parents=True, exist_ok=True)
        if self.tmpdir is None:
            self.tmpdir = short_tmpdir(self.base / "logs" / "tmp")

    @property
    def log_dir(self) -> Path:
        return self.base / "logs"

    @property
    def key_file(self) -> Path:
        return self.base / "keys" / "key_file.json"

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['TS_INFERENCE_PORT']}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['TS_MANAGEMENT_PORT']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['TS_METRICS_PORT']}"

    def env(self, **extra: str) -> dict[str, str]:
        """serve.sh's environment for this server."""
        config = {"TS_CONFIG": str(self.config)} if self.config else {}
        return serve_env(self.ports, self.store, self.log_dir, self.key_file.parent, self.tmpdir,
                         self.start_timeout, **config, **self.extra_env, **extra)

    def serve(self, *args: str, timeout: float = 240, **extra: str) -> subprocess.CompletedProcess:
        """Run scripts/serve.sh with this server's environment; output captured."""
        return subprocess.run(["bash", str(SERVE), *args], env=self.env(**extra), cwd=self.base,
                              capture_output=True, text=True, timeout=timeout)

    def start(self) -> None:
        """serve.sh start; raises with serve.sh's explanation when it fails."""
        result = self.serve("start", *self.mars)
        if result.returncode != 0:
            raise RuntimeError(f"serve.sh start {' '.join(self.mars)} failed:\n{result.stdout}{result.stderr}")

    def stop(self) -> None:
        """serve.sh stop (by the pid it recorded); raises when it fails."""
        result = self.serve("stop", timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"serve.sh stop failed:\n{result.stdout}{result.stderr}")

    def pid(self) -> int | None:
        """The frontend's pid from serve.sh's state file, None when not running."""
        return read_pid(self.log_dir)

    def kill(self) -> None:
        """Last resort after a failed stop: SIGKILL the frontend by its recorded pid."""
        pid = self.pid()
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove_tmpdir(self) -> None:
        """Remove a TMPDIR made outside `base` (after the server stopped)."""
        if self.tmpdir and self.base not in self.tmpdir.parents:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def keys(self) -> Keys:
        return Keys(self.key_file, self.management_url)

    def api(self) -> TorchServe:
        """This server's management and inference APIs, with its keys."""
        return TorchServe(self.inference_url, self.management_url, self.keys())

    def close(self) -> None:
        """Stop by the recorded pid (SIGKILL when the stop fails) and remove a TMPDIR made elsewhere."""
        try:
            self.stop()
        except (RuntimeError, subprocess.TimeoutExpired):
            self.kill()
        self.remove_tmpdir()

    @contextmanager
    def running(self) -> Iterator["LocalServer"]:
        """Started for the block; stopped by its pid afterwards, even when the block fails."""
        try:
            self.start()
            yield self
        finally:
            self.close()
