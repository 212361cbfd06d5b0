"""What a second TorchServe beside a demo server needs: free loopback ports, serve.sh's
environment, a short TMPDIR, its pid. Shared by the test fixtures and the benchmark."""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

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
