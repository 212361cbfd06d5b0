"""The images' lock files (requirements-server.lock, requirements-client.lock) equal the tested .venv."""
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_lock_module():
    spec = importlib.util.spec_from_file_location("deploy_lock", REPO / "deploy" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_locks_equal_the_venv_package_for_package():
    done = subprocess.run([sys.executable, str(REPO / "deploy" / "lock.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, "the locks differ from .venv (rerun deploy/lock.py):\n" + done.stdout


def test_a_lock_that_differs_from_the_venv_is_named_with_the_package(tmp_path, monkeypatch):
    lock = load_lock_module()
    for image in lock.IMAGES:
        shutil.copy(lock.lock_path(image), tmp_path)
    monkeypatch.setattr(lock, "ROOT", tmp_path)
    assert lock.differences("client") == []
    path = tmp_path / "requirements-client.lock"
    text = path.read_text()
    numpy_line = next(line for line in text.splitlines() if line.startswith("numpy=="))
    path.write_text(text.replace(numpy_line, "numpy==1.0.0 --hash=sha256:" + "0" * 64))
    assert lock.differences("client") == [f"requirements-client.lock: numpy locked 1.0.0, .venv has "
                                          f"{lock.closure(['numpy'])['numpy']}"]
    # A transitive package the venv needs but the lock lacks is a difference too.
    path.write_text("\n".join(line for line in text.splitlines() if not line.startswith("urllib3==")) + "\n")
    assert [d for d in lock.differences("client") if "urllib3" in d] == [
        f"requirements-client.lock: urllib3 locked absent, .venv has {lock.closure(['urllib3'])['urllib3']}"]


def test_the_client_lock_holds_matplotlib_and_no_torch():
    names = load_lock_module().read_lock(REPO / "requirements-client.lock")
    assert "matplotlib" in names and "torch" not in names and "torchserve" not in names


def test_constraints_pin_every_package_of_the_venv_and_a_missing_one_is_named(tmp_path, monkeypatch):
    """make install installs with constraints.txt: without a pin, a package released since floats."""
    lock = load_lock_module()
    shutil.copy(lock.constraints_path(), tmp_path)
    monkeypatch.setattr(lock, "ROOT", tmp_path)
    assert lock.differences(None) == []
    path = tmp_path / "constraints.txt"
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines() if not line.startswith("filelock==")))
    assert lock.differences(None) == [f"constraints.txt: filelock locked absent, .venv has {lock.venv_pins()['filelock']}"]
    assert "-c constraints.txt" in (REPO / "scripts" / "install.sh").read_text()
