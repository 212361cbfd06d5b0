"""Ctrl-C (SIGINT) in the middle of `manage.py rollout`, against a real TorchServe of this module: the
rollout ends on a state it reads back and prints as it is, whatever the moment.

Every server here is started by the fixture's `running()` block, which stops it by its pid.
"""
from __future__ import annotations

import re
import signal
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import popen, server_without_models, wait_for
from tests.test_manage import clone_mar, default, manage_args, versions

pytestmark = pytest.mark.integration

BALLAST_MB = 256  # zeros: a small archive that TorchServe takes a second or more to unpack


def run_manage(srv, command: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(manage_args(srv, command, *args), cwd=srv.base, capture_output=True, text=True,
                          timeout=600)


def with_ballast(mar: Path) -> Path:
    """The archive with BALLAST_MB of zeros added: TorchServe unpacks an archive into a *.download
    folder of its TMPDIR before it lists the version, so a rollout can be interrupted while the server
    holds the registration and does not list it yet, as with any large model."""
    with zipfile.ZipFile(mar, "a", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("ballast.bin", "w", force_zip64=True) as f:
            for _ in range(BALLAST_MB):
                f.write(bytes(1 << 20))
    return mar


def with_precision(source: Path, target: Path, name: str, version: str, precision: str) -> Path:
    with zipfile.ZipFile(source) as archive:
        config = archive.read("model-config.yaml").decode()
    assert "precision: fp32" in config
    return clone_mar(source, target, name, version,
                     {"model-config.yaml": config.replace("precision: fp32", f"precision: {precision}").encode()})


@pytest.fixture(scope="module")
def iserver(tmp_path_factory, tiny_run):
    """A TorchServe of this module alone, started with no model; the archives are clones of tiny."""
    srv = server_without_models(tmp_path_factory.mktemp("ts-interrupt"), tiny_run)
    clone_mar(srv.source_mar, srv.store / "ri-1.mar", "ri", "1")
    with_ballast(clone_mar(srv.source_mar, srv.store / "ri-2.mar", "ri", "2"))
    clone_mar(srv.source_mar, srv.store / "rd-1.mar", "rd", "1")
    clone_mar(srv.source_mar, srv.store / "rd-2.mar", "rd", "2")
    with_precision(srv.source_mar, srv.store / "half-1.mar", "half", "1", "fp16")
    with srv.running():
        yield srv


def ends_on(stdout: str) -> dict[str, str]:
    """{replica: state} from the rollout's "rollout: REPLICA ends on: STATE" lines."""
    return dict(re.findall(r"^rollout: (\S+) ends on: (.*)$", stdout, re.MULTILINE))


def state_line(srv, name: str) -> str:
    """The server's state of `name` now, in the words of the rollout's "ends on" line."""
    registered = sorted(versions(srv, name))
    return (f"{name} {default(srv, name)} is the default (registered: {', '.join(registered)})" if registered
            else f"{name} not registered")


def describes(srv, name: str, version: str) -> int:
    """How many times the server was asked to describe NAME VERSION (its access log)."""
    return (srv.log_dir / "access_log.log").read_text().count(f'"GET /models/{name}/{version} HTTP')


def ctrl_c_reaches_it() -> None:
    """In the child before exec: SIGINT back to its default, so that Python raises KeyboardInterrupt
    as under a terminal. A shell runs a background job (a CI started with `&`) with SIGINT ignored,
    the child inherits that, and Python then leaves SIGINT ignored: the rollout would never see it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupted(proc: subprocess.Popen) -> tuple[str, str]:
    """SIGINT to the rollout (Ctrl-C), then its output once it has ended."""
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, out + err
    assert err.strip().splitlines() == ["interrupted"], err
    return out, err


def test_ctrl_c_while_the_server_registers_ends_on_what_it_prints_and_the_version_can_be_rolled_out(iserver):
    srv = iserver
    assert run_manage(srv, "register", "ri-1.mar").returncode == 0
    unpacking = lambda: any(p.name.endswith(".download") for p in srv.tmpdir.iterdir())  # noqa: E731
    with popen(manage_args(srv, "rollout", "ri-2.mar"), preexec_fn=ctrl_c_reaches_it) as proc:
        # the server has the registration request and is unpacking the archive: ri 2 is not listed yet
        assert wait_for(unpacking, 300, interval=0.01), proc.communicate(timeout=600)
        out, _ = interrupted(proc)

    # TorchServe answers the abandoned request in the end (its access log says so): nothing of the
    # registration is left to happen, and what the rollout printed must be what the server holds
    access_log = srv.log_dir / "access_log.log"
    assert wait_for(lambda: '"POST /models?url=ri-2.mar' in access_log.read_text(), 300, interval=0.2)
    printed = ends_on(out)
    assert list(printed.values()) == [state_line(srv, "ri")], out
    assert state_line(srv, "ri") == "ri 1 is the default (registered: 1)"
    assert out.strip().splitlines()[-1].endswith("ri 1 is the default on " + next(iter(printed))
                                                 + ", 2 removed")
    assert "rollout: interrupted at " in out and ": register ri-2.mar (ri 2); rolling back" in out

    # the next rollout of the same version is not refused as "already registered"
    again = run_manage(srv, "rollout", "ri-2.mar")
    assert again.returncode == 0, again.stdout + again.stderr
    assert state_line(srv, "ri") == "ri 2 is the default (registered: 2)"


def test_ctrl_c_during_the_drain_unregisters_nothing_more_and_says_what_is_left(iserver):
    srv = iserver
    assert run_manage(srv, "register", "rd-1.mar").returncode == 0
    try:
        # a 60 s quiet period: the drain of rd 1 lasts at least that long unless interrupted
        with popen(manage_args(srv, "rollout", "rd-2.mar", "--drain-seconds", "60"),
                   preexec_fn=ctrl_c_reaches_it) as proc:
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("rollout: draining and unregistering rd 1"):
                    break
            # the drain is under way once it asks for rd 1's queue again and again (every 0.1 s)
            looks = describes(srv, "rd", "1")
            assert wait_for(lambda: describes(srv, "rd", "1") >= looks + 3, 300, interval=0.05)
            out, _ = interrupted(proc)
        out = "".join(lines) + out
        assert state_line(srv, "rd") == "rd 2 is the default (registered: 1, 2)"  # switched, rd 1 kept
        replica = next(iter(ends_on(out)))
        assert ends_on(out) == {replica: "rd 2 is the default (registered: 1, 2)"}, out
        assert out.strip().splitlines()[-1] == (
            f"rollout: interrupted after the switch: rd 2 is the default on {replica}; rd 1 is still registered "
            f"on {replica}: nothing was unregistered after the interrupt (manage.py unregister rd 1 removes it)")
        assert "rd 1 unregistered" not in out
    finally:
        run_manage(srv, "unregister", "rd", "1", "--drain-seconds", "0")
    assert state_line(srv, "rd") == "rd 2 is the default (registered: 2)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 loads on a CUDA worker: no failure to quote")
def test_an_fp16_worker_on_the_cpu_is_quoted_with_its_own_error_not_torchserves_507(iserver):
    try:
        result = run_manage(iserver, "register", "half-1.mar")
    finally:  # TorchServe keeps a version whose workers failed with 507 registered: removed (no drain)
        if versions(iserver, "half"):
            iserver.api().call("DELETE", "/models/half/1", "unregister half 1")
    assert result.returncode == 1, result.stdout + result.stderr
    line = result.stderr.strip()
    assert "System out of memory" not in line, line
    assert line.endswith("the worker said: handler.device.DeviceError: model-config.yaml handler.precision fp16: "
                         "the CPU cannot run it: fp16 is served on CUDA only (CPU half kernels are slow or "
                         "missing)"), line
