"""Shared fixtures: one real TorchServe (tiny model, free loopback ports) for the whole session."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVE = REPO / "scripts" / "serve.sh"
ARCHIVE = REPO / "scripts" / "archive.sh"
PYTHON = REPO / ".venv" / "bin" / "python"
MODEL, VERSION = "tiny", "1.0"
LABELS = ["red", "green", "blue"]  # TinyNet: class i reacts to channel i

sys.path.insert(0, str(REPO))
from scripts import tsclient  # noqa: E402
from scripts.local_server import free_port_env, read_pid, serve_env, short_tmpdir  # noqa: E402
from tests.tiny_model import make_tiny_run  # noqa: E402


@dataclass
class Server:
    """A TorchServe run by scripts/serve.sh with its own ports, store, logs, TMPDIR and key file."""

    base: Path
    store: Path
    run_dir: Path
    ports: dict[str, int]
    model: str = MODEL
    version: str = VERSION
    mars: list[str] = field(default_factory=list)
    tmpdir: Path | None = None  # TMPDIR of the server; short, since it holds the workers' Unix sockets

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
        return serve_env(self.ports, self.store, self.log_dir, self.key_file.parent,
                         self.tmpdir or self.log_dir / "tmp", 120, **extra)

    def serve(self, *args: str, timeout: float = 150, **extra: str) -> subprocess.CompletedProcess:
        """Run scripts/serve.sh with this server's environment; output captured."""
        return subprocess.run(["bash", str(SERVE), *args], env=self.env(**extra), cwd=self.base,
                              capture_output=True, text=True, timeout=timeout)

    def start(self) -> None:
        result = self.serve("start", *self.mars)
        assert result.returncode == 0, f"serve.sh start failed:\n{result.stdout}\n{result.stderr}"

    def stop(self) -> None:
        result = self.serve("stop", timeout=120)
        assert result.returncode == 0, f"serve.sh stop failed:\n{result.stdout}\n{result.stderr}"

    def pid(self) -> int | None:
        """The frontend's pid from serve.sh's state file, None when not running."""
        return read_pid(self.log_dir)

    def keys(self) -> tsclient.Keys:
        return tsclient.Keys(self.key_file, self.management_url)

    def workers(self) -> list[dict]:
        """The default version's workers from the management API."""
        return tsclient.describe(self.management_url, self.keys(), self.model, self.version)[0]["workers"]

    def remove_tmpdir(self) -> None:
        """Remove a TMPDIR made outside `base` (after the server stopped)."""
        if self.tmpdir and self.base not in self.tmpdir.parents:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def kill(self) -> None:
        """Last resort after a failed stop: SIGKILL the frontend by its recorded pid."""
        pid = self.pid()
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @contextmanager
    def running(self) -> Iterator["Server"]:
        """Started for the block; stopped by its pid afterwards, even when the block fails."""
        try:
            self.start()
            yield self
        finally:
            try:
                self.stop()
            except (AssertionError, subprocess.TimeoutExpired):
                self.kill()
            self.remove_tmpdir()


def make_server(base: Path, store: Path, run_dir: Path, mars: list[str]) -> Server:
    """A Server description on six fresh ports (not started)."""
    (base / "keys").mkdir(parents=True, exist_ok=True)
    tmpdir = short_tmpdir(base / "logs" / "tmp")
    return Server(base=base, store=store, run_dir=run_dir, ports=free_port_env(),
                  mars=mars, tmpdir=tmpdir)


def archive(run_dir: Path, store: Path, name: str, version: str) -> Path:
    """scripts/archive.sh into `store`."""
    env = {**os.environ, "MODEL_STORE": str(store)}
    result = subprocess.run(["bash", str(ARCHIVE), str(run_dir), name, version, "--force"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"archive.sh failed:\n{result.stdout}\n{result.stderr}"
    return store / f"{name}-{version}.mar"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder with the tiny model of fixed weights and labels red/green/blue."""
    return make_tiny_run(tmp_path_factory.mktemp("run"), labels=LABELS)


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_run) -> Server:
    """The session's TorchServe serving tiny 1.0; stopped by pid at the end, even on failure."""
    # Fail, never skip: `make install` provides both, and these are core tests.
    if shutil.which("java") is None:
        pytest.fail("java not found: TorchServe's frontend needs Java >= 11 (run `make install`)")
    if not (REPO / ".venv" / "bin" / "torchserve").exists():
        pytest.fail(".venv/bin/torchserve not found: run `make install`")
    base = tmp_path_factory.mktemp("ts")
    store = base / "store"
    store.mkdir()
    archive(tiny_run, store, MODEL, VERSION)
    with make_server(base, store, tiny_run, [f"{MODEL}-{VERSION}.mar"]).running() as srv:
        yield srv


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
