"""scripts/front_proxy.sh: a real nginx (deploy/nginx's one configuration) in front of a real TorchServe
whose own token authorization is off, attacked as a client on the network would: wrong tokens, the
wrong port, request targets shaped for request forgery, bodies over the limit, ambiguous framing and
slow clients. Malformed requests go out on raw sockets: an HTTP library would refuse to send them."""
from __future__ import annotations

import contextlib
import json
import io
import os
import re
import secrets
import select
import shutil
import socket
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests
from PIL import Image

from client.local_server import free_ports
from core.readiness import pid_alive as alive
from tests.conftest import MODEL, REPO, VERSION, Server, archive, make_server, tiny_store, wait_for

FRONT_PROXY = REPO / "scripts" / "front_proxy.sh"
RENDER = REPO / "deploy" / "nginx" / "render.sh"
MAX_BODY = 65536  # the proxied server's max_request_size: nginx must take its limit from there
TIMEOUT_S = 1  # PROXY_HEADER_TIMEOUT and PROXY_BODY_TIMEOUT here: slow clients are cut quickly


def png(color: tuple[int, int, int], pad_to: int = 0) -> bytes:
    """An 8x8 PNG, padded with trailing bytes (which decoders ignore) to `pad_to` bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    data = buffer.getvalue()
    return data + b"\0" * max(0, pad_to - len(data))


@dataclass
class Proxy:
    """One front_proxy.sh instance: its environment, ports and tokens."""

    env: dict[str, str]
    port: int
    management_port: int
    token: str
    management_token: str

    @property
    def dir(self) -> Path:
        return Path(self.env["PROXY_DIR"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def run(self, *args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(FRONT_PROXY), *args], env={**self.env, **extra},
                              capture_output=True, text=True, timeout=60)

    def pid(self) -> int | None:
        pid_file = self.dir / "nginx.pid"
        return int(pid_file.read_text().split()[0]) if pid_file.exists() else None


def new_proxy(base: Path, backend: Server | None, ts_config: Path) -> Proxy:
    """A Proxy (not started) with fresh tokens and ports, its folder under `base`."""
    token, management_token = secrets.token_hex(24), secrets.token_urlsafe(32)
    (base / "inference.token").write_text(token + "\n")
    (base / "management.token").write_text(management_token + "\n")
    port, management_port, *dead = free_ports(4)
    inference_backend = backend.inference_url if backend else f"http://127.0.0.1:{dead[0]}"
    management_backend = backend.management_url if backend else f"http://127.0.0.1:{dead[1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "TS_"))}
    env.update(PROXY_LISTEN=f"127.0.0.1:{port}", PROXY_BACKEND=inference_backend,
               PROXY_TOKEN_FILE=str(base / "inference.token"),
               PROXY_MANAGEMENT_LISTEN=f"127.0.0.1:{management_port}",
               PROXY_MANAGEMENT_BACKEND=management_backend,
               PROXY_MANAGEMENT_TOKEN_FILE=str(base / "management.token"),
               PROXY_DIR=str(base / "run"), PROXY_TS_CONFIG=str(ts_config),
               PROXY_HEADER_TIMEOUT=str(TIMEOUT_S), PROXY_BODY_TIMEOUT=str(TIMEOUT_S))
    return Proxy(env, port, management_port, token, management_token)


def proxy_base() -> Path:
    """A folder for a proxy: run as root, nginx's workers (nobody) must reach its temp folder, which
    pytest's private base folder would deny, so it lives directly under the system's temp folder."""
    base = Path(tempfile.mkdtemp(prefix="front-proxy-"))
    base.chmod(0o711)
    return base


@pytest.fixture(scope="module")
def ts_config(tmp_path_factory) -> Path:
    """config.properties with a small max_request_size (the last value of a key wins)."""
    path = tmp_path_factory.mktemp("proxy-config") / "config.properties"
    path.write_text((REPO / "config.properties").read_text() + f"\nmax_request_size={MAX_BODY}\n")
    return path


@pytest.fixture(scope="module")
def backend(tmp_path_factory, tiny_run, ts_config) -> Server:
    """TorchServe serving tiny 1.0 on loopback with its own token authorization off."""
    base = tmp_path_factory.mktemp("proxied")
    store = tiny_store(base, tiny_run)
    server = make_server(base, store, tiny_run, [f"{MODEL}-{VERSION}.mar"])
    server.config = ts_config
    server.extra_env = {"TS_TOKEN_AUTH": "off"}
    with server.running() as srv:
        yield srv


@pytest.fixture(scope="module")
def proxy(backend, ts_config) -> Proxy:
    """front_proxy.sh started in front of `backend`; stopped by its pid at the end."""
    base = proxy_base()
    front = new_proxy(base, backend, ts_config)
    try:
        result = front.run("start")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "TorchServe answers /ping" in result.stdout
        yield front
    finally:
        pid = front.pid()
        result = front.run("stop")
        if pid and alive(pid):
            os.kill(pid, 9)
        shutil.rmtree(base, ignore_errors=True)
    assert result.returncode == 0, result.stdout + result.stderr


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def raw_request(method: str, target: str, token: str | None = None, body: bytes = b"",
                headers: tuple[str, ...] = (), length: bool = True) -> bytes:
    """One HTTP/1.1 request as bytes, with Connection: close; Content-Length unless `length` is False."""
    lines = [f"{method} {target} HTTP/1.1", "Host: torchserve"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if length and (body or method in ("POST", "PUT")):
        lines.append(f"Content-Length: {len(body)}")
    lines += [*headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def exchange(port: int, data: bytes, timeout: float = 30) -> bytes:
    """Send `data` on a fresh connection and read until the server closes it."""
    received = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received.append(chunk)
    return b"".join(received)


def statuses(answer: bytes) -> list[int]:
    """The status codes of every response in `answer`, in order."""
    return [int(code) for code in re.findall(rb"^HTTP/1\.[01] (\d{3}) ", answer, re.MULTILINE)]


def status_of(port: int, data: bytes) -> int:
    codes = statuses(exchange(port, data))
    assert len(codes) == 1, f"expected one response, got {codes}"
    return codes[0]


def access_log_lines(server: Server) -> list[str]:
    """TorchServe's access log: one line a request it received, on either port."""
    path = server.log_dir / "access_log.log"
    return path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []


# --- what passes ---------------------------------------------------------------------------------

def test_ping_and_predictions_pass_with_the_inference_token(proxy):
    session = requests.Session()
    session.trust_env = False
    ping = session.get(f"{proxy.url}/ping", headers=bearer(proxy.token), timeout=30)
    assert ping.status_code == 200 and ping.json()["status"] == "Healthy"
    for path in (f"/predictions/{MODEL}", f"/predictions/{MODEL}/{VERSION}"):
        answer = session.post(f"{proxy.url}{path}", data=png((230, 20, 30)), headers=bearer(proxy.token),
                              timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()[0]["label"] == "red"


def test_describe_with_either_token_on_the_management_port(proxy):
    for token in (proxy.token, proxy.management_token):
        listing = requests.get(f"{proxy.management_url}/models", params={"limit": 100}, headers=bearer(token),
                               timeout=30)
        assert listing.status_code == 200 and [m["modelName"] for m in listing.json()["models"]] == [MODEL]
        described = requests.get(f"{proxy.management_url}/models/{MODEL}/{VERSION}",
                                 params={"customized": "true"}, headers=bearer(token), timeout=60)
        assert described.status_code == 200, described.text
        assert described.json()[0]["modelVersion"] == VERSION
        assert "customizedMetadata" in described.json()[0]  # the handler's describe_handle answered


def test_body_limit_is_max_request_size(proxy):
    """A body of exactly max_request_size reaches the model; one byte more is nginx's 413, whether
    its length is announced or it comes chunked."""
    exact = png((10, 220, 40), pad_to=MAX_BODY)
    answer = exchange(proxy.port, raw_request("POST", f"/predictions/{MODEL}", proxy.token, exact))
    assert statuses(answer) == [200] and b'"green"' in answer
    over = png((10, 220, 40), pad_to=MAX_BODY + 1)
    assert status_of(proxy.port, raw_request("POST", f"/predictions/{MODEL}", proxy.token, over)) == 413
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                       for part in (over[i:i + 8192] for i in range(0, len(over), 8192))) + b"0\r\n\r\n"
    request = raw_request("POST", f"/predictions/{MODEL}", proxy.token, chunked, length=False,
                          headers=("Transfer-Encoding: chunked",))
    assert status_of(proxy.port, request) == 413


@pytest.mark.parametrize("content_type", [
    "multipart/form-data; boundary=x", "application/x-www-form-urlencoded", "Multipart/Mixed; boundary=y"])
def test_form_bodies_are_refused(proxy, content_type):
    """TorchServe decodes forms with an old Netty decoder; this project never sends them."""
    body = b"--x\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\nabc\r\n--x--\r\n"
    headers = (f"Content-Type: {content_type}",)
    request = raw_request("POST", f"/predictions/{MODEL}", proxy.token, body, headers)
    assert status_of(proxy.port, request) == 415


# --- who may call what ---------------------------------------------------------------------------

@pytest.mark.parametrize("authorization", [
    None, "Bearer", "Bearer wrong-token-of-the-right-size-0123456789abcdef01234567",
    "Bearer {token}x", "Bearer x{token}", "Basic {token}", "Bearer {management_token}",
], ids=["none", "empty", "wrong", "suffix", "prefix", "basic", "management-token"])
def test_inference_port_wants_the_inference_token(proxy, authorization):
    value = (authorization or "").format(token=proxy.token, management_token=proxy.management_token)
    headers = (f"Authorization: {value}",) if authorization else ()
    answer = exchange(proxy.port, raw_request("POST", f"/predictions/{MODEL}", None, png((1, 2, 3)), headers))
    assert statuses(answer) == [401]
    assert b"WWW-Authenticate: Bearer" in answer


def test_management_port_wants_a_token(proxy):
    for token in (None, "not-a-token-but-long-enough-0123456789abcdef"):
        assert status_of(proxy.management_port, raw_request("GET", "/models", token)) == 401


@pytest.mark.parametrize("method,target", [
    ("POST", f"/models?url={MODEL}-{VERSION}.mar&model_name=again"),  # register
    ("PUT", f"/models/{MODEL}/{VERSION}?min_worker=0&synchronous=true"),  # scale
    ("PUT", f"/models/{MODEL}/{VERSION}/set-default"),
    ("DELETE", f"/models/{MODEL}/{VERSION}"),  # unregister
    ("GET", "/token?type=management"),  # key renewal
], ids=["register", "scale", "set-default", "unregister", "token"])
def test_management_writes_refuse_the_inference_token(proxy, method, target):
    assert status_of(proxy.management_port, raw_request(method, target, proxy.token)) == 403


def test_management_token_writes(proxy):
    """Writes reach TorchServe with the management token: set-default of the default version, and an
    unregister of a version that does not exist (TorchServe's own 404, not the proxy's)."""
    headers = bearer(proxy.management_token)
    answer = requests.put(f"{proxy.management_url}/models/{MODEL}/{VERSION}/set-default", headers=headers,
                          timeout=30)
    assert answer.status_code == 200, answer.text
    missing = requests.delete(f"{proxy.management_url}/models/{MODEL}/9.9", headers=headers, timeout=30)
    assert missing.status_code == 404 and "not a management call" not in missing.text


@pytest.mark.parametrize("method,target", [
    ("OPTIONS", "/"), ("GET", "/api-description"), ("GET", "/metrics"), ("POST", "/workflows?url=x.war"),
    ("POST", "/models/tiny/1.0/predictions"), ("GET", "/models/tiny/1.0/set-default"),
])
def test_management_port_serves_only_the_model_api(proxy, method, target):
    assert status_of(proxy.management_port, raw_request(method, target, proxy.management_token)) == 404


# --- request targets shaped for request forgery ------------------------------------------------------

def forged_targets(backend: Server) -> list[tuple[str, str]]:
    management = backend.management_url.removeprefix("http://")
    return [
        ("GET", f"@{management}/models"),  # userinfo trick: 127.0.0.1:PORT@host in a naive join
        ("GET", f"http://{management}/models"),  # absolute form
        ("POST", f"http://127.0.0.1:1/predictions/{MODEL}"),  # absolute form of an allowed path
        ("GET", "http://169.254.169.254/latest/meta-data/"),
        ("POST", "/predictions/../models?url=x.mar"),
        ("POST", f"/models/../predictions/{MODEL}"),  # normalises to an allowed path
        ("POST", "/predictions/%2e%2e/models?url=x.mar"),
        ("POST", f"/predictions/{MODEL}/%2E%2E/%2E%2E/models"),
        ("POST", f"/predictions/{MODEL}%2f..%2fmodels"),
        ("GET", f"//{management}/models"),
        ("POST", f"/predictions//{MODEL}"),
        ("POST", f"/predictions/{MODEL}\\..\\..\\models"),
        ("OPTIONS", "*"),
        ("CONNECT", management),
    ]


def test_forged_targets_are_refused_on_both_ports(proxy, backend):
    for port, token in ((proxy.port, proxy.token), (proxy.management_port, proxy.management_token)):
        for method, target in forged_targets(backend):
            answer = exchange(port, raw_request(method, target, token))
            assert statuses(answer) == [400], f"{method} {target} on :{port}: {answer[:200]!r}"


def test_management_calls_on_the_inference_port_never_reach_torchserve(proxy, backend):
    """Every management call, with either token, is a 404 on the inference port; TorchServe's access
    log shows none of them, and the model set is unchanged."""
    before = len(access_log_lines(backend))
    calls = [("GET", "/models"), ("GET", f"/models/{MODEL}?customized=true"),
             ("POST", f"/models?url={MODEL}-{VERSION}.mar&model_name=intruder&initial_workers=1"),
             ("PUT", f"/models/{MODEL}/{VERSION}?min_worker=0"),
             ("PUT", f"/models/{MODEL}/{VERSION}/set-default"),
             ("DELETE", f"/models/{MODEL}/{VERSION}"), ("GET", "/token?type=management"), ("GET", "/metrics"),
             ("GET", "/api-description"), ("OPTIONS", "/"), ("POST", f"/explanations/{MODEL}"),
             ("POST", f"/v2/models/{MODEL}/infer"), ("GET", f"/predictions/{MODEL}")]
    for token in (proxy.token, proxy.management_token):
        for method, target in calls:
            code = status_of(proxy.port, raw_request(method, target, token))
            assert code == (404 if token == proxy.token else 401), f"{method} {target}"
    for method, target in forged_targets(backend):
        status_of(proxy.port, raw_request(method, target, proxy.token))
    # a request that passes, so the log is known to be written by now
    assert status_of(proxy.port, raw_request("GET", "/ping", proxy.token)) == 200
    assert wait_for(lambda: any('"GET /ping ' in line for line in access_log_lines(backend)[before:]), 10)
    received = [re.search(r'"(\S+ \S+) HTTP', line) for line in access_log_lines(backend)[before:]]
    received = [m.group(1) for m in received if m]
    assert received and set(received) <= {"GET /ping"}, received
    models = requests.get(f"{backend.management_url}/models", timeout=30).json()["models"]
    assert [m["modelName"] for m in models] == [MODEL]
    versions = requests.get(f"{backend.management_url}/models/{MODEL}/all", timeout=30).json()
    assert [v["modelVersion"] for v in versions] == [VERSION] and versions[0]["workers"]


# --- framing: request smuggling and lengths --------------------------------------------------------

@pytest.mark.parametrize("headers,body,expected", [
    (("Content-Length: -1",), b"", 400),
    (("Content-Length: abc",), b"", 400),
    (("Content-Length: 1e3",), b"", 400),
    (("Content-Length: 4", "Content-Length: 5"), b"abcde", 400),
    (("Content-Length: 4", "Transfer-Encoding: chunked"), b"0\r\n\r\nGET /models HTTP/1.1\r\n\r\n", 400),
    (("Transfer-Encoding: chunked", "Content-Length: 4"), b"0\r\n\r\nGET /models HTTP/1.1\r\n\r\n", 400),
    (("Transfer-Encoding: gzip, chunked",), b"0\r\n\r\n", 501),
    (("Transfer-Encoding: xchunked",), b"0\r\n\r\n", 501),
], ids=["negative", "non-numeric", "exponent", "two-lengths", "cl-te", "te-cl", "te-list", "te-unknown"])
def test_ambiguous_framing_is_refused(proxy, headers, body, expected):
    request = raw_request("POST", f"/predictions/{MODEL}", proxy.token, body, headers, length=False)
    assert status_of(proxy.port, request) == expected


def test_an_unread_body_never_becomes_the_next_request(proxy):
    """A refused request's body holding a second request: nginx reads it as a body, so the only answers
    on the keep-alive connection are the refusal and the next real request's."""
    hidden = raw_request("GET", "/ping", proxy.token).replace(b"Connection: close\r\n", b"")
    first = (f"POST /predictions/{MODEL} HTTP/1.1\r\nHost: torchserve\r\n"
             f"Content-Length: {len(hidden)}\r\n\r\n").encode() + hidden
    last = raw_request("GET", "/ping")  # no token: 401, and Connection: close ends the exchange
    assert statuses(exchange(proxy.port, first + last)) == [401, 401]


# --- slow clients ------------------------------------------------------------------------------------

def closed_while_trickling(port: int, head: bytes, trickle: bytes, pause: float = 0.25) -> bool:
    """Send `head`, then `trickle` a byte at a time; True when the server closes the connection before
    the last byte (the trickle lasts many times the proxy's timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head)
        for byte in trickle:
            readable, _, _ = select.select([s], [], [], pause)
            if readable:
                try:
                    if not s.recv(65536):
                        return True
                except ConnectionResetError:
                    return True
            try:
                s.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                return True
    return False


def test_a_header_sent_slowly_is_cut_off(proxy):
    trickle = b"X-Slow: " + b"a" * int(TIMEOUT_S * 40) + b"\r\n\r\n"  # 10x the header timeout
    assert closed_while_trickling(proxy.port, b"GET /ping HTTP/1.1\r\nHost: torchserve\r\n", trickle)


def test_a_body_sent_slowly_is_cut_off(proxy):
    body = b"b" * int(TIMEOUT_S * 40)
    head = raw_request("POST", f"/predictions/{MODEL}", proxy.token, body)[:-len(body)]
    # One pause longer than the body timeout between two bytes: the connection is closed.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as s:
        s.sendall(head + body[:1])
        readable, _, _ = select.select([s], [], [], TIMEOUT_S * 10)
        assert readable, "nginx kept waiting for a body that stopped"
        try:
            answer = s.recv(65536)
        except ConnectionResetError:
            answer = b""
        assert b"HTTP/1.1 200" not in answer


# --- front_proxy.sh itself ------------------------------------------------------------------------------

def test_token_maps_are_private_and_the_config_holds_no_token(proxy):
    tokens = proxy.dir / "tokens.map"
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    config = (proxy.dir / "nginx.conf").read_text()
    assert proxy.token not in config and proxy.management_token not in config
    assert f"client_max_body_size {MAX_BODY};" in config
    assert proxy.run("status").returncode == 0


def test_rotation_with_reload(proxy):
    """Both tokens in the file during a rotation, then only the new one: no restart, no drop."""
    token_file = Path(proxy.env["PROXY_TOKEN_FILE"])
    new = secrets.token_hex(24)
    ping = lambda token: status_of(proxy.port, raw_request("GET", "/ping", token))  # noqa: E731
    try:
        token_file.write_text(f"{proxy.token}\n{new}\n")
        assert proxy.run("reload").returncode == 0
        assert wait_for(lambda: ping(new) == 200, 20) and ping(proxy.token) == 200
        token_file.write_text(f"{new}\n")
        assert proxy.run("reload").returncode == 0
        assert wait_for(lambda: ping(proxy.token) == 401, 20) and ping(new) == 200
    finally:
        token_file.write_text(f"{proxy.token}\n")
        proxy.run("reload")
        assert wait_for(lambda: ping(proxy.token) == 200, 20)


def test_the_documented_rotation_refuses_no_request_of_a_running_client(proxy):
    """docs/security.md's steps (old+new, new+old, new; a reload after each) while a client sends
    /ping with the token file: the client follows the file's first line, nginx never answers 401."""
    import threading

    from core.http import new_session
    from core.keys import Keys, request_with_key

    token_file = Path(proxy.env["PROXY_TOKEN_FILE"])
    old, new = proxy.token, secrets.token_hex(24)
    keys, session, statuses, stop = Keys(token_file=token_file), new_session(1), [], threading.Event()
    session.hooks["response"].append(lambda r, *a, **k: statuses.append(r.status_code))

    def client():
        while not stop.is_set():
            try:
                request_with_key(session, "GET", f"{proxy.url}/ping", keys, "inference", timeout=10)
            except requests.ConnectionError:  # a keep-alive connection closed by a worker leaving on
                pass  # reload, as the request went out: sent again, as classify_dir does

    def step(text: str) -> None:
        staged = token_file.with_name(token_file.name + ".new")
        staged.write_text(text)
        staged.replace(token_file)
        assert proxy.run("reload").returncode == 0
        sent = len(statuses)
        assert wait_for(lambda: len(statuses) > sent + 20, 30)  # the client kept going through it

    sender = threading.Thread(target=client)
    sender.start()
    try:
        for text in (f"{old}\n{new}\n", f"{new}\n{old}\n", f"{new}\n"):
            step(text)
        assert keys.get("inference") == new
    finally:
        stop.set()
        sender.join(30)
        session.close()
        token_file.write_text(f"{old}\n")
        proxy.run("reload")
    assert len(statuses) > 60 and set(statuses) == {200}, sorted(set(statuses))


def test_a_token_refused_mid_run_exits_2_with_rows_kept(proxy, tmp_path):
    """nginx's token changes mid-run and the client's token file keeps the old one: the client re-reads
    it, is refused again and stops: a configuration error (exit 2, not worth retrying as it is), not the
    server being away (3), with the rows written so far kept."""
    from tests.conftest import popen, rows_written, write_images
    token_file = Path(proxy.env["PROXY_TOKEN_FILE"])
    client_token = tmp_path / "inference.token"
    client_token.write_text(f"{proxy.token}\n")
    paths = write_images(tmp_path / "images", 200)
    output = tmp_path / "rows.jsonl"
    args = [str(REPO / ".venv" / "bin" / "python"), str(REPO / "scripts" / "classify_dir.py"), str(tmp_path / "images"),
            "--model", MODEL, "--url", proxy.url, "--management-url", proxy.management_url,
            "--inference-token-file", str(client_token), "--output", str(output), "--concurrency", "1",
            "--preprocess", "server"]
    try:
        with popen(args) as proc:
            assert wait_for(lambda: rows_written(output) >= 10, 60)
            token_file.write_text(f"{secrets.token_hex(24)}\n")
            assert proxy.run("reload").returncode == 0
            stdout, stderr = proc.communicate(timeout=120)
    finally:
        token_file.write_text(f"{proxy.token}\n")
        proxy.run("reload")
    assert proc.returncode == 2, stdout + stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    kept = [json.loads(line) for line in output.read_text().splitlines()]
    assert 10 <= len(kept) < len(paths) and len({r["path"] for r in kept}) == len(kept)


def test_the_worst_case_of_uploads_cannot_fill_the_spool_past_its_budget(tmp_path):
    """Every class of body nginx spools to disk, each sent past its cap at once and held (the
    upstream never answers: a listening socket stands in for TorchServe, which cannot be made to
    hold a request): what is on disk stays within PROXY_SPOOL_BYTES, the rest get 429 at once. The
    bodies come from two addresses in turn, as one address may hold only half of a class's places."""
    max_body, budget = 2_000_000, 20_000_000
    config = tmp_path / "config.properties"
    config.write_text(f"max_request_size={max_body}\n")
    hold = socket.socket()
    hold.bind(("127.0.0.1", 0))
    hold.listen(256)
    base = proxy_base()
    front = new_proxy(base, None, config)
    front.env.update(PROXY_BACKEND=f"http://127.0.0.1:{hold.getsockname()[1]}", PROXY_SPOOL_BYTES=str(budget),
                     PROXY_BODY_TIMEOUT="60")
    held, spool = [], base / "run" / "tmp" / "client_body"
    sizes = [300_000] * 8 + [max_body] * 8  # small class (under 1 MB) and medium (7 digits)
    try:
        started = front.run("start")
        assert started.returncode == 0, started.stdout + started.stderr
        rendered = (base / "run" / "nginx.conf").read_text()
        caps = [int(re.search(rf"limit_conn spool_{c} (\d+);", rendered).group(1)) for c in ("small", "medium", "large")]
        assert caps == [budget // 4 // 1_000_000, budget // 4 // max_body, budget // 2 // max_body]  # 5, 2, 5
        sources = iter(("127.0.0.1", "127.0.0.2") * len(sizes) * 2)
        for size in sizes:
            conn = socket.create_connection(("127.0.0.1", front.port), 30, (next(sources), 0))
            conn.sendall(raw_request("POST", f"/predictions/{MODEL}", front.token, b"\x00" * size))
            held.append(conn)
        chunked = (f"POST /predictions/{MODEL} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {front.token}\r\n"
                   f"Transfer-Encoding: chunked\r\n\r\n{max_body:x}\r\n").encode() + b"\x00" * max_body + b"\r\n0\r\n\r\n"
        for _ in range(8):  # no declared size: the large class
            conn = socket.create_connection(("127.0.0.1", front.port), 30, (next(sources), 0))
            conn.sendall(chunked)
            held.append(conn)
        workers = psutil.Process(front.pid()).children()

        def on_disk() -> int:
            """Bytes of the spool's files: nginx unlinks each at once, so they are seen as its workers' fds."""
            total = 0
            for worker in workers:
                for fd in Path(f"/proc/{worker.pid}/fd").iterdir():
                    with contextlib.suppress(OSError):
                        if os.readlink(fd).startswith(str(spool)):
                            total += os.stat(fd).st_size
            return total
        held_large = (2 + 5) * max_body  # the medium and large bodies held stay on disk until answered
        assert wait_for(lambda: on_disk() >= held_large, 60), on_disk()
        refused = []
        for conn in held:
            conn.settimeout(0.5)
            try:
                refused.append(statuses(conn.recv(4096)))
            except TimeoutError:
                refused.append("held")
        assert refused.count("held") == 5 + 2 + 5 and refused.count([429]) == len(held) - 12, refused
        assert held_large <= on_disk() <= 5 * 300_000 + held_large <= budget  # small ones may be in memory
    finally:
        for conn in held:
            conn.close()
        hold.close()
        front.run("stop")
        shutil.rmtree(base, ignore_errors=True)


def test_start_fails_with_the_reason(ts_config):
    base = proxy_base()
    try:
        front = new_proxy(base, None, ts_config)
        missing = front.run("start", PROXY_TOKEN_FILE=str(base / "absent.token"))
        assert missing.returncode == 2 and f"{base}/absent.token: token file not found" in missing.stderr
        (base / "empty.token").write_text("\n# no token yet\n")
        empty = front.run("start", PROXY_MANAGEMENT_TOKEN_FILE=str(base / "empty.token"))
        assert empty.returncode == 2 and "empty.token: the file holds no token" in empty.stderr
        (base / "short.token").write_text("short\n")
        short = front.run("start", PROXY_TOKEN_FILE=str(base / "short.token"))
        assert short.returncode == 2 and "at least 32 are needed" in short.stderr
        same = front.run("start", PROXY_MANAGEMENT_TOKEN_FILE=front.env["PROXY_TOKEN_FILE"])
        assert same.returncode == 2 and "must differ" in same.stderr
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            taken = front.run("start", PROXY_LISTEN=f"127.0.0.1:{busy.getsockname()[1]}")
        assert taken.returncode == 1 and "already in use" in taken.stderr
        assert front.pid() is None
        assert front.run("status").returncode == 3
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_start_without_torchserve_then_stop_by_pid(ts_config):
    """start returns once nginx answers even with nothing behind it (and says so); stop ends that pid."""
    base = proxy_base()
    front = new_proxy(base, None, ts_config)
    try:
        started = front.run("start")
        assert started.returncode == 0, started.stderr
        assert "TorchServe does not answer yet" in started.stdout
        pid = front.pid()
        assert pid and alive(pid)
        assert status_of(front.port, raw_request("GET", "/ping", front.token)) == 502
        again = front.run("start")
        assert again.returncode == 1 and "already running" in again.stderr
        stopped = front.run("stop")
        assert stopped.returncode == 0 and f"stopped nginx pid {pid}" in stopped.stdout
        assert not alive(pid)
    finally:
        pid = front.pid()
        if pid and alive(pid):
            os.kill(pid, 9)
        shutil.rmtree(base, ignore_errors=True)


def test_foreground_with_a_metrics_port(backend, ts_config):
    """A pod's way: render.sh --foreground execs nginx, logs on stdout/stderr; the metrics port passes
    GET /metrics without a token and nothing else."""
    base = proxy_base()
    front = new_proxy(base, backend, ts_config)
    metrics_port = free_ports(1)[0]
    env = {**front.env, "PROXY_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
           "PROXY_METRICS_BACKEND": backend.metrics_url,
           "PROXY_ACCESS_LOG": "/dev/stdout", "PROXY_ERROR_LOG": "/dev/stderr"}
    nginx = subprocess.Popen(["sh", str(RENDER), "--foreground"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        def metrics_answer() -> bool:
            try:
                return statuses(exchange(metrics_port, raw_request("GET", "/metrics"))) == [200]
            except ConnectionRefusedError:
                return False

        assert wait_for(metrics_answer, 20) or nginx.poll() is None, nginx.stderr.read()
        assert metrics_answer(), "nginx answered no GET /metrics on the metrics port"
        assert b"ts_inference_requests_total" in exchange(metrics_port, raw_request("GET", "/metrics"))
        for method, target in (("GET", "/models"), ("GET", "/ping"), ("POST", f"/predictions/{MODEL}")):
            assert status_of(metrics_port, raw_request(method, target, front.token)) == 404
        assert status_of(front.port, raw_request("GET", "/ping", front.token)) == 200
        assert nginx.poll() is None  # still in the foreground: the pid a container runtime watches
    finally:
        nginx.terminate()
        nginx.wait(timeout=30)
        shutil.rmtree(base, ignore_errors=True)


def test_render_refuses_unsafe_settings(tmp_path, ts_config):
    env = new_proxy(tmp_path, None, ts_config).env
    cases = {"PROXY_BACKEND": "http://127.0.0.1:8080/models",
             "PROXY_MANAGEMENT_BACKEND": "http://user@host:1",
             "PROXY_LISTEN": "127.0.0.1:8090;evil", "PROXY_DIR": str(tmp_path / "a b"),
             "PROXY_HEADER_TIMEOUT": "0", "PROXY_CONNECTIONS_PER_ADDRESS": "0"}
    for name, value in cases.items():
        result = subprocess.run(["sh", str(RENDER)], env={**env, name: value}, capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 2 and name in result.stderr, (name, result.stderr)
    (tmp_path / "bad.token").write_text("a" * 40 + '";\n')
    result = subprocess.run(["sh", str(RENDER)], env={**env, "PROXY_TOKEN_FILE": str(tmp_path / "bad.token")},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "bad.token: line 1: a token may hold only" in result.stderr


def test_render_sets_the_connections_one_address_may_hold(tmp_path, ts_config):
    """Behind an ingress every client comes from one address: the operator raises the limit."""
    env = new_proxy(tmp_path, None, ts_config).env
    for value, expected in ((None, "limit_conn per_address 512;"), ("4096", "limit_conn per_address 4096;")):
        extra = {} if value is None else {"PROXY_CONNECTIONS_PER_ADDRESS": value}
        result = subprocess.run(["sh", str(RENDER)], env={**env, **extra}, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert expected in (Path(env["PROXY_DIR"]) / "nginx.conf").read_text()


# ---- the project's own client through the proxy: a fleet entry holding only the proxy's tokens ----

CLIENT = REPO / "scripts" / "classify_dir.py"
MANAGE = REPO / "scripts" / "manage.py"


def proxy_fleet(path: Path, front: Proxy, management: bool) -> Path:
    from client.fleet import write_fleet

    entry = {"name": "front", "inference_url": front.url, "management_url": front.management_url,
             "token_file": front.env["PROXY_TOKEN_FILE"]}
    if management:
        entry["management_token_file"] = front.env["PROXY_MANAGEMENT_TOKEN_FILE"]
    return write_fleet(path, [entry])


@pytest.mark.parametrize("mode", ["client", "server"])
def test_a_classify_run_through_the_proxy_with_only_the_inference_token_gets_every_file(proxy, tmp_path, mode):
    from tests.conftest import PYTHON, write_images

    paths = write_images(tmp_path / "images", 30)
    fleet_file = proxy_fleet(tmp_path / "fleet.yaml", proxy, management=False)
    output = tmp_path / "rows.jsonl"
    done = subprocess.run([str(PYTHON), str(CLIENT), str(tmp_path / "images"), "--fleet", str(fleet_file),
                           "--model", MODEL, "--output", str(output), "--preprocess", mode, "--class-folders"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    import json

    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["path"] for r in rows) == sorted(paths)
    assert all(r["status"] == "ok" and r["replica"] == "front" and r["label"] == r["true_label"] for r in rows)
    assert f"(preprocess {mode}" in done.stdout


def test_a_fleet_rollout_through_the_management_port_needs_the_management_token(proxy, backend, tmp_path):
    from tests.conftest import PYTHON, write_images

    archive(backend.run_dir, backend.store, MODEL, "2.0")
    write_images(tmp_path / "smoke", 6)
    readers = proxy_fleet(tmp_path / "readers.yaml", proxy, management=False)
    command = [str(PYTHON), str(MANAGE), "rollout", f"{MODEL}-2.0.mar", "--model-store", str(backend.store),
               "--smoke-dir", str(tmp_path / "smoke"), "--keep-old", "--timeout", "120",
               "--replica-log-dir", f"front={backend.log_dir}"]
    refused = subprocess.run([*command, "--fleet", str(readers)], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "needs the management token" in refused.stderr, refused.stderr
    assert backend.api().default_version(MODEL) == VERSION and len(backend.api().versions(MODEL)) == 1
    writers = proxy_fleet(tmp_path / "writers.yaml", proxy, management=True)
    try:
        done = subprocess.run([*command, "--fleet", str(writers)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert backend.api().default_version(MODEL) == "2.0"
    finally:  # the module's other tests use 1.0: back to it, through the proxy with the management token
        base = [str(PYTHON), str(MANAGE)]
        subprocess.run([*base, "set-default", MODEL, VERSION, "--fleet", str(writers)], capture_output=True,
                       timeout=120)
        subprocess.run([*base, "unregister", MODEL, "2.0", "--fleet", str(writers), "--drain-seconds", "0",
                        "--replica-log-dir", f"front={backend.log_dir}"], capture_output=True, timeout=300)
    assert backend.api().default_version(MODEL) == VERSION


def test_the_pods_probe_against_the_real_torchserve_behind_the_proxy(backend):
    """deploy/kubernetes/probe.py as the pods run it: against the TorchServe on loopback, token auth off
    (test_kubernetes.py covers the states a real server cannot be put in on cue, with a fake)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe", REPO / "deploy" / "kubernetes" / "probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    assert probe.probe("live", backend.inference_url, backend.management_url, 10) is None
    assert probe.probe("ready", backend.inference_url, backend.management_url, 10) is None  # tiny 1.0 READY
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    assert "no answer" in probe.probe("live", dead, dead, 2)
