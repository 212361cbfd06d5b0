"""Shared fixtures: one real TorchServe (tiny model, free loopback ports) for the whole session."""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from PIL import Image

from client.fleet import write_fleet
from client.local_server import LocalServer, free_port_env
from tests.tiny_model import make_tiny_run

REPO = Path(__file__).resolve().parent.parent
SERVE = REPO / "scripts" / "serve.sh"
ARCHIVE = REPO / "scripts" / "archive.sh"
PYTHON = REPO / ".venv" / "bin" / "python"
MODEL, VERSION = "tiny", "1.0"
LABELS = ["red", "green", "blue"]  # TinyNet: class i reacts to channel i
COLORS = {"red": (230, 20, 30), "green": (10, 220, 40), "blue": (25, 15, 240)}  # class i <- channel i


@dataclass
class Server(LocalServer):
    """The tests' TorchServe: a LocalServer that knows the run folder and model it serves."""

    run_dir: Path | None = None
    model: str = MODEL
    version: str = VERSION
    source_mar: Path | None = None  # an archive outside the store, to clone versions from

    def workers(self) -> list[dict]:
        """The served version's workers from the management API."""
        return self.api().describe(self.model, self.version)[0]["workers"]


def tiny_store(base: Path, tiny_run: Path) -> Path:
    """base/store holding tiny 1.0's archive."""
    store = base / "store"
    store.mkdir()
    archive(tiny_run, store, MODEL, VERSION)
    return store


def make_server(base: Path, store: Path, run_dir: Path, mars: list[str]) -> Server:
    """A Server description on six fresh ports (not started)."""
    return Server(base=base, store=store, run_dir=run_dir, mars=mars)


def server_without_models(base: Path, tiny_run: Path) -> Server:
    """A Server (not started) that starts with no model and an empty store, so a module can change its
    model set freely; `source_mar`, the tiny archive kept outside the store, is what it clones."""
    store = base / "store"
    store.mkdir()
    server = make_server(base, store, tiny_run, [])
    server.source_mar = archive(tiny_run, base, "tiny", "source")
    return server


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
    store = tiny_store(base, tiny_run)
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


def write_images(directory: Path, count: int, mislabel: bool = False) -> list[str]:
    """`count` 8x8 PNGs in red/green/blue class folders (each in the wrong one with mislabel)."""
    paths = []
    for i in range(count):
        color = LABELS[i % 3]
        folder = LABELS[(i + 1) % 3] if mislabel else color
        path = directory / folder / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), COLORS[color]).save(path)
        paths.append(path.relative_to(directory).as_posix())
    return paths


def rows_written(output: Path) -> int:
    """Lines in a classify_dir.py output so far (0 before it exists)."""
    try:
        return output.read_text(encoding="utf-8").count("\n")
    except FileNotFoundError:
        return 0


@contextmanager
def popen(args: list[str], **kwargs) -> Iterator[subprocess.Popen]:
    """A command running for the block (output captured as text), killed and reaped if the block
    leaves it running; `kwargs` go to subprocess.Popen."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@contextmanager
def running_fleet(servers: list[Server], fleet_file: Path) -> Iterator[Path]:
    """Start the servers side by side, write their fleet file (replicas ts-0, ts-1, ...); at the end
    stop each by its pid, and kill workers a test's kill of their frontend left behind."""
    used: set[int] = set()
    for server in servers:  # free ports are picked one server at a time: two may draw the same
        while used & set(server.ports.values()):
            server.ports = free_port_env()
        used |= set(server.ports.values())
    errors: list[Exception] = []

    def start(server: Server) -> None:
        try:
            server.start()
        except Exception as e:  # noqa: BLE001 - reported below, after every start has ended
            errors.append(e)

    workers: list[int] = []
    try:
        threads = [threading.Thread(target=start, args=(s,)) for s in servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        workers = [p.pid for s in servers if s.pid() for p in psutil.Process(s.pid()).children(recursive=True)]
        if errors:
            pytest.fail(f"a fleet server failed to start: {errors[0]}")
        write_fleet(fleet_file, [{"name": f"ts-{i}", "inference_url": s.inference_url,
                                  "management_url": s.management_url, "key_file": s.key_file}
                                 for i, s in enumerate(servers)])
        yield fleet_file
    finally:
        closers = [threading.Thread(target=s.close) for s in servers]
        for t in closers:
            t.start()
        for t in closers:
            t.join()
        for pid in workers:
            if psutil.pid_exists(pid):
                psutil.Process(pid).kill()


class FakeHTTP:
    """A loopback HTTP server standing in for a server a test must see misbehave: `routes` maps a
    path to (status, body bytes), or to a function of the path giving them; records each request."""

    def __init__(self, routes: dict):
        import http.server

        owner = self
        self.routes, self.requests = routes, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                owner.requests.append((self.command, self.path, self.headers.get("Authorization")))
                route = owner.routes.get(self.path.split("?")[0], (404, b'{"type": "x"}'))
                status, body = route(self.path) if callable(route) else route
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
