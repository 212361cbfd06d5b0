"""manage.py --fleet against a fleet of real TorchServe replicas of its own, started side by side."""
from __future__ import annotations

import argparse
import json
import subprocess
import threading
import zipfile
from pathlib import Path

import pytest
import requests
from PIL import Image

from client import rollout
from client.manage import get_args_parser
from client.versions import Member, register
from core.http import new_session
from core.keys import request_with_key
from core.errors import Refused, RolledBack, UserError
from core.torchserve import TorchServe
from tests.conftest import COLORS, LABELS, PYTHON, archive, make_server, running_fleet, wait_for, write_images
from tests.test_manage import MANAGE, THROTTLE, clone_mar

pytestmark = pytest.mark.integration

REPLICAS = 3
MODELS = ("load", "guard", "flip", "skew")
LOAD_THREADS = 4  # requests in flight on each replica while a rollout runs


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_run):
    """REPLICAS TorchServes with no model, each with its own store of clones of tiny, and their fleet
    file; started in parallel threads, each stopped by its pid at the end."""
    base = tmp_path_factory.mktemp("ts-fleet")
    source = archive(tiny_run, base, "tiny", "source")  # outside the stores: only clones are served
    servers = []
    for index in range(REPLICAS):
        store = base / f"ts-{index}" / "store"
        store.mkdir(parents=True)
        for name in MODELS:
            for version in ("1", "2"):
                clone_mar(source, store / f"{name}-{version}.mar", name, version)
        servers.append(make_server(store.parent, store, tiny_run, []))
    with running_fleet(servers, base / "fleet.yaml") as fleet_file:
        yield servers, fleet_file, source


def manage_fleet(fleet, command: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """manage.py COMMAND --fleet FILE; a rollout reads the archive from ts-0's store and every log."""
    servers, fleet_file, _ = fleet
    extra = []
    if command == "rollout":
        extra = ["--model-store", str(servers[0].store)]
        for index, srv in enumerate(servers):
            extra += ["--replica-log-dir", f"ts-{index}={srv.log_dir}"]
    return subprocess.run([str(PYTHON), str(MANAGE), command, *args, "--fleet", str(fleet_file), *extra],
                          cwd=fleet_file.parent, capture_output=True, text=True, timeout=timeout)


def on_every_replica(fleet, function) -> None:
    """function(server) on every replica at once; the first failure is raised."""
    servers = fleet[0]
    errors: list[Exception] = []

    def one(srv) -> None:
        try:
            function(srv)
        except Exception as e:  # noqa: BLE001 - raised below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(srv,)) for srv in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def api(srv) -> TorchServe:
    """The server's APIs, patient enough for a worker to start on a busy 2-core machine."""
    return TorchServe(srv.inference_url, srv.management_url, srv.keys(), timeout=300)


def states(fleet, name: str) -> list[tuple[str | None, set[str]]]:
    """(default, registered versions) of `name` on each replica."""
    return [(srv.api().default_version(name), {v["modelVersion"] for v in srv.api().versions(name)})
            for srv in fleet[0]]


@pytest.fixture
def model(fleet, request):
    """Model `request.param` version 1 registered on every replica; every version removed afterwards."""
    name = request.param

    def add(srv) -> None:
        register(api(srv), srv.store / f"{name}-1.mar", None, 32 if name == "load" else None,
                 200 if name == "load" else None, srv.log_dir)

    on_every_replica(fleet, add)
    yield name

    def remove(srv) -> None:
        api = srv.api()
        for entry in sorted(api.versions(name), key=lambda v: v["modelVersion"] == api.default_version(name)):
            api.call("DELETE", f"/models/{name}/{entry['modelVersion']}", "unregister")

    on_every_replica(fleet, remove)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stdout + result.stderr
    return lines[0]


# ---- no server ----

def test_fleet_usage_errors_exit_2_in_one_line(tmp_path):
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("replicas:\n  - name: a\n    inference_url: http://127.0.0.1:1\n    color: red\n")
    cases = {  # argv -> what the one error line says
        ("list", "--url", "http://127.0.0.1:1"): "--fleet names each replica's URLs and credentials: drop --url",
        ("list",): f"{fleet_file}: replica 'a' (replicas[0]): unknown key(s) ['color']",
        ("rollout", "x.mar", "--log-dir", str(tmp_path)): "with --fleet pass --replica-log-dir NAME=DIR",
    }
    for argv, message in cases.items():
        result = subprocess.run([str(PYTHON), str(MANAGE), *argv, "--fleet", str(fleet_file)],
                                capture_output=True, text=True)
        assert result.returncode == 2 and message in one_error_line(result), (argv, result.stderr)
    result = subprocess.run([str(PYTHON), str(MANAGE), "rollout", "x.mar", "--replica-log-dir", "a=/x"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--replica-log-dir needs --fleet" in one_error_line(result)


# ---- a fleet of real servers ----

@pytest.mark.parametrize("model", ["skew"], indirect=True)
def test_list_and_describe_flag_version_skew(fleet, model):
    servers = fleet[0]
    on_every_replica(fleet, lambda srv: register(api(srv), srv.store / "skew-2.mar", None, None, None))
    result = manage_fleet(fleet, "list")
    assert result.returncode == 0, result.stderr
    assert f"fleet: {REPLICAS} of {REPLICAS} replicas read, no version skew" in result.stdout

    servers[1].api().call("PUT", "/models/skew/2/set-default", "set-default")  # ts-1 alone on 2
    others = ", ".join(f"ts-{i}" for i in range(REPLICAS) if i != 1)
    skew = f"version skew: skew default is 1 on {others}; 2 on ts-1"
    result = manage_fleet(fleet, "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert skew in lines
    assert any(line.startswith("ts-0: skew 1 (default): workers 1 READY") for line in lines)
    assert any(line.startswith("ts-1: skew 2 (default): workers 1 READY") for line in lines)
    result = manage_fleet(fleet, "describe", "skew")
    assert result.returncode == 0 and skew in result.stdout.splitlines()
    assert "ts-1:   worker " in result.stdout
    result = manage_fleet(fleet, "describe", "skew", "--json")
    assert {r: {v["modelVersion"] for v in e} for r, e in json.loads(result.stdout).items()} == {
        f"ts-{i}": {"1", "2"} for i in range(REPLICAS)}

    # a rollout over a skewed fleet would have no one default to roll back to: refused, nothing changed
    clone_mar(fleet[2], servers[0].store / "skew-3.mar", "skew", "3")
    result = manage_fleet(fleet, "rollout", "skew-3.mar")
    assert result.returncode == 1
    line = one_error_line(result)
    assert skew in line and "nothing changed" in line
    assert states(fleet, "skew") == [("2" if i == 1 else "1", {"1", "2"}) for i in range(REPLICAS)]


@pytest.mark.parametrize("model", ["load"], indirect=True)
def test_fleet_rollout_under_load_has_no_error_and_ends_on_the_new_version_everywhere(fleet, model, tmp_path):
    servers = fleet[0]
    smoke = tmp_path / "smoke"
    write_images(smoke, 12)
    images = {}
    for color in LABELS:
        Image.new("RGB", (8, 8), COLORS[color]).save(tmp_path / f"{color}.png")
        images[color] = (tmp_path / f"{color}.png").read_bytes()
    answers: list[tuple[int, int | str, str | None, bool]] = []  # replica, status, version, label right
    stop = threading.Event()

    def load(index: int, srv) -> None:  # one request in flight on the replica's default version
        session, keys, sent = new_session(1), srv.keys(), 0
        while not stop.is_set():
            color = LABELS[sent % 3]
            sent += 1
            try:
                response = request_with_key(
                    session, "POST", f"{srv.inference_url}/predictions/load", keys, "inference",
                    data=images[color], timeout=60, headers={"Content-Type": "application/octet-stream"})
                right = response.status_code == 200 and response.json()[0]["label"] == color
                answers.append((index, response.status_code, response.headers.get("X-Model-Version"), right))
            except requests.RequestException as e:
                answers.append((index, type(e).__name__, None, False))

    threads = [threading.Thread(target=load, args=(i, srv), daemon=True)
               for i, srv in enumerate(servers) for _ in range(LOAD_THREADS)]
    try:
        for thread in threads:
            thread.start()
        assert wait_for(lambda: len({a[0] for a in answers}) == REPLICAS, 60)
        result = manage_fleet(fleet, "rollout", "load-2.mar", "--smoke-dir", str(smoke),
                              "--min-accuracy", "1.0", *THROTTLE)
        during = len(answers)
        assert wait_for(lambda: len(answers) >= during + REPLICAS * LOAD_THREADS, 60)  # load on v2 too
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(f"rollout: load 1 -> 2 on {REPLICAS} replicas, smoke test passed on every replica")
    assert last.endswith("load 1 unregistered")
    assert not any(thread.is_alive() for thread in threads), "a request was never answered"
    assert [a for a in answers if a[1] != 200 or not a[3]] == []  # zero error rows, every label right
    for index in range(REPLICAS):  # the load ran on every replica through the switch
        assert {a[2] for a in answers if a[0] == index} == {"1", "2"}, index
        assert f"rollout: ts-{index} ends on: load 2 is the default (registered: 2)" in result.stdout
    assert states(fleet, "load") == [("2", {"2"})] * REPLICAS


@pytest.mark.parametrize("model", ["guard"], indirect=True)
def test_a_broken_copy_on_one_replica_rolls_every_replica_back(fleet, model):
    servers = fleet[0]
    copy = servers[1].store / "guard-2.mar"  # ts-1's store holds half of the archive: a copy cut short
    copy.write_bytes(copy.read_bytes()[: copy.stat().st_size // 2])
    try:
        result = manage_fleet(fleet, "rollout", "guard-2.mar")
    finally:
        clone_mar(fleet[2], copy, "guard", "2")
    assert result.returncode == 1, result.stdout + result.stderr
    line = one_error_line(result)
    assert "failed at ts-1: register guard-2.mar (guard 2)" in line
    assert "ts-1's model store must hold a complete copy of guard-2.mar" in line
    assert "was rolled back" in line and "guard 1 is the default on every replica" in line
    assert line.endswith("guard 1 is the default on every replica, 2 removed")
    assert "rollout: ts-0: register guard-2.mar" in result.stdout  # ts-0 had it registered before
    for index in range(REPLICAS):
        assert f"rollout: ts-{index} ends on: guard 1 is the default (registered: 1)" in result.stdout
    assert states(fleet, "guard") == [("1", {"1"})] * REPLICAS


class SwitchFails(TorchServe):
    """A replica whose set-default to version 2 fails (as a replica lost mid-switch would)."""

    def call(self, method: str, path: str, what: str, ok_404: bool = False, **params) -> object:
        if method == "PUT" and path.endswith("/2/set-default"):
            raise Refused(f"{what}: HTTP 500: injected failure")
        return super().call(method, path, what, ok_404, **params)


@pytest.mark.parametrize("model", ["flip"], indirect=True)
def test_a_failed_switch_switches_back_the_replicas_already_switched(fleet, model, capsys):
    servers, fleet_file, _ = fleet
    last = REPLICAS - 1
    members = [Member(f"ts-{i}", api(srv) if i < last else SwitchFails(srv.inference_url, srv.management_url,
                                                                        srv.keys(), timeout=300), srv.log_dir)
               for i, srv in enumerate(servers)]
    argv = ["rollout", "flip-2.mar", "--fleet", str(fleet_file), "--model-store", str(servers[0].store)]
    for index, srv in enumerate(servers):
        argv += ["--replica-log-dir", f"ts-{index}={srv.log_dir}"]
    args = get_args_parser().parse_args(argv)
    with pytest.raises(RolledBack) as failure:
        rollout.rollout(members, args)
    out = capsys.readouterr().out
    assert f"failed at ts-{last}: set-default flip 2" in str(failure.value)
    assert str(failure.value).endswith("flip 1 is the default on every replica, 2 removed")
    for index in range(last):  # switched, then switched back before 2 was removed
        assert f"rollout: ts-{index}: flip 2 is the default\n" in out
        assert f"rollout: ts-{index}: flip 1 is the default again" in out
    assert f"rollout: ts-{last}: flip 1 is the default again" not in out
    for index in range(REPLICAS):
        assert f"rollout: ts-{index} ends on: flip 1 is the default (registered: 1)" in out
    assert states(fleet, "flip") == [("1", {"1"})] * REPLICAS


# ---- a rollout that fails with something else than an API error: fake servers, no TorchServe ----

class FakeServe:
    """A replica serving model m 1.0 that registers 2.0; its predictions raise `predict_error`."""

    def __init__(self, predict_error: Exception | None = None):
        self.registered, self.default, self.predict_error = {"1.0"}, "1.0", predict_error

    def versions(self, name: str) -> list[dict]:
        return [{"modelVersion": v} for v in sorted(self.registered)]

    def default_version(self, name: str) -> str:
        return self.default

    def describe(self, name: str, version: str | None = None) -> list[dict]:
        return [{"modelVersion": version or self.default, "minWorkers": 1, "workers": []}]

    def call(self, method: str, path: str, what: str, ok_404: bool = False, **params) -> object:
        version = path.split("/")[3] if path.count("/") >= 3 else None
        if method == "PUT" and path.endswith("/set-default"):
            self.default = version
        elif method == "DELETE":
            self.registered.discard(version)
        return {}

    def predict(self, name: str, version: str, data: bytes):
        raise self.predict_error


def fake_rollout_args(tmp_path: Path, smoke: Path) -> argparse.Namespace:
    """manage.py rollout's arguments for model m 2.0 (a .mar holding only its manifest)."""
    store = tmp_path / "store"
    store.mkdir()
    with zipfile.ZipFile(store / "m-2.0.mar", "w") as z:
        z.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": "m", "modelVersion": "2.0"}}))
    return argparse.Namespace(smoke_dir=str(smoke), min_accuracy=None, mar=str(store / "m-2.0.mar"),
                              model_store=store, new_model=False, workers=None, batch_size=None,
                              max_batch_delay=None, max_accuracy_drop=1.0, keep_old=False, drain_seconds=0,
                              drain_timeout=1, log_dir=None, rollback_deadline=1.0)


def smoke_set(tmp_path: Path) -> Path:
    smoke = tmp_path / "smoke"
    smoke.mkdir()
    for name in ("a.png", "b.png"):
        (smoke / name).write_bytes(b"\x89PNG not really")
    return smoke


@pytest.fixture
def fake_register(monkeypatch):
    """register() on a fake: 2.0 joins the registered versions."""
    def register(client, mar, *args, **kwargs):
        client.registered.add("2.0")
    monkeypatch.setattr(rollout, "register", register)


def test_unreadable_smoke_image_is_a_user_error_before_any_replica_changes(tmp_path, monkeypatch,
                                                                           fake_register):
    smoke = smoke_set(tmp_path)
    real_read_bytes = Path.read_bytes

    def read_bytes(path: Path) -> bytes:  # a file the process may not read (root reads any mode bits)
        if path.name == "b.png":
            raise PermissionError(13, "Permission denied", str(path))
        return real_read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    members = [Member("ts-0", FakeServe()), Member("ts-1", FakeServe())]
    with pytest.raises(UserError, match=rf"^--smoke-dir: cannot read {smoke / 'b.png'}: Permission denied$"):
        rollout.rollout(members, fake_rollout_args(tmp_path, smoke))
    assert [(m.server.default, m.server.registered) for m in members] == [("1.0", {"1.0"})] * 2


def test_smoke_image_vanishing_after_the_listing_changes_nothing(tmp_path, fake_register):
    smoke = smoke_set(tmp_path)
    images = rollout.list_smoke_images(str(smoke), None)
    (smoke / "a.png").unlink()  # the bytes were read with the listing: the smoke test still has them
    assert sorted(rel for _, rel, _ in images) == ["a.png", "b.png"]
    assert all(data == b"\x89PNG not really" for data, _, _ in images)


@pytest.mark.parametrize("error", [OSError("disk gone"), RuntimeError("a bug")])
def test_fleet_rollout_rolls_every_replica_back_on_any_exception_and_reraises_it(tmp_path, fake_register,
                                                                                 error, capsys):
    members = [Member("ts-0", FakeServe(error)), Member("ts-1", FakeServe(error))]
    with pytest.raises(type(error), match=str(error)):
        rollout.rollout(members, fake_rollout_args(tmp_path, smoke_set(tmp_path)))
    assert [(m.server.default, m.server.registered) for m in members] == [("1.0", {"1.0"})] * 2
    assert "m 1.0 is the default on every replica, 2.0 removed" in capsys.readouterr().out


@pytest.mark.parametrize("error", [OSError("disk gone"), RuntimeError("a bug")])
def test_single_server_rollout_rolls_back_on_any_exception_and_reraises_it(tmp_path, fake_register, error,
                                                                           capsys):
    server = FakeServe(error)  # one server is a fleet of one: the same rollout
    with pytest.raises(type(error), match=str(error)):
        rollout.rollout([Member("127.0.0.1:8080", server)], fake_rollout_args(tmp_path, smoke_set(tmp_path)))
    assert (server.default, server.registered) == ("1.0", {"1.0"})
    assert "m 1.0 is the default on 127.0.0.1:8080, 2.0 removed" in capsys.readouterr().out
