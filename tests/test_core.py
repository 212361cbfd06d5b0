"""core/: the TorchServe API module (URLs, keys, tokens, sessions) and the files module, without a server
(small loopback fakes where a request must be seen), and the server-log reader the drain relies on."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from client.server_logs import BatchWatch
from core.http import management_url_for, new_session
from core.keys import Keys, read_token
from core.torchserve import TorchServe, ping as ts_ping
from core.errors import EXIT_CODES, KeyRefused, ServerUnavailable, UserError
from core.files import IMAGE_EXTENSIONS, iter_files, parse_extensions
from client.local_server import free_ports
from tests.conftest import REPO, FakeHTTP


class TokenServer(FakeHTTP):
    """A loopback server whose GET /token blocks until `release` is set, then rewrites the key file."""

    def __init__(self, key_file: Path):
        self.release, self.entered, self.paths = threading.Event(), threading.Event(), []

        def token(path: str) -> tuple[int, bytes]:
            self.paths.append(path)
            self.entered.set()
            self.release.wait(30)
            key_file.write_text(json.dumps({"inference": {"key": "fresh"}, "API": {"key": "api"}}))
            return 200, b""

        super().__init__({"/token": token})

    def close(self):
        self.release.set()
        super().close()


def test_closing_a_server_closes_the_session_its_key_renewal_opened(tmp_path):
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "old"}, "API": {"key": "api"}}))
    fake = TokenServer(key_file)
    fake.release.set()
    server = TorchServe(fake.url, fake.url, Keys(key_file, fake.url), timeout=5)
    assert server.keys.refresh("inference", "old") and server.keys.get("inference") == "fresh"
    renewal = server.keys._session
    assert renewal is not None and renewal.adapters["http://"].poolmanager.pools  # a connection was kept
    server.close()
    assert server.keys._session is None and not renewal.adapters["http://"].poolmanager.pools
    fake.close()


def test_management_url_keeps_the_brackets_of_an_ipv6_host():
    assert management_url_for("http://[::1]:8080") == "http://[::1]:8081"
    assert management_url_for("http://[fd00::5]:18090/") == "http://[fd00::5]:18091"
    assert management_url_for("http://127.0.0.1:8080") == "http://127.0.0.1:8081"


def test_key_renewal_holds_no_lock_readers_wait_for_and_ignores_proxy_settings(tmp_path, monkeypatch):
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "old"}, "API": {"key": "api"}}))
    fake = TokenServer(key_file)
    # a proxy from the environment would carry the API key elsewhere: the renewal must not use it
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    keys = Keys(key_file, fake.url)
    assert keys.get("inference") == "old"
    renewed = {}
    renewing = threading.Thread(target=lambda: renewed.setdefault("ok", keys.refresh("inference", "old")))
    renewing.start()
    assert fake.entered.wait(10), "the renewal never reached the server (sent through the proxy?)"
    reader = threading.Thread(target=lambda: renewed.setdefault("read", keys.get("inference")))
    reader.start()
    reader.join(5)  # while the renewal's request is held open by the server
    assert not reader.is_alive() and renewed["read"] == "old"  # a sender reads at once, not after 10 s
    fake.release.set()
    renewing.join(10)
    assert renewed["ok"] is True and keys.get("inference") == "fresh"
    assert fake.paths == ["/token?type=inference"]
    fake.close()


def test_an_unreadable_key_file_is_that_servers_error_when_used_not_at_construction(tmp_path):
    folder = tmp_path / "key_file.json"
    folder.mkdir()  # a folder where the key file should be
    keys = Keys(folder, "http://127.0.0.1:1")  # building it never raises
    with pytest.raises(ServerUnavailable, match="cannot read key file"):
        keys.get("inference")


TOKEN_I, TOKEN_M, TOKEN_NEW = ("inference-token-0123456789abcdef", "management-token-0123456789abcdef",
                               "new-inference-token-0123456789abcdef")


def test_token_files_give_the_proxy_tokens_and_a_bad_one_is_named(tmp_path):
    inference, management = tmp_path / "inference", tmp_path / "management"
    inference.write_text(f"{TOKEN_I}\n")
    management.write_text(TOKEN_M)
    keys = Keys(token_file=inference, management_token_file=management)
    assert keys.key_file is None  # never the local key_file.json
    assert keys.headers("inference") == {"Authorization": f"Bearer {TOKEN_I}"}
    assert keys.headers("management") == {"Authorization": f"Bearer {TOKEN_M}"}
    reader_only = Keys(token_file=inference)
    assert reader_only.headers("management") == {"Authorization": f"Bearer {TOKEN_I}"}  # reads only
    inference.write_text("two words\n")
    with pytest.raises(ServerUnavailable, match=f"cannot read token file {inference}: line 1: a token may hold"):
        Keys(token_file=inference).get("inference")


def test_a_token_file_of_several_lines_sends_its_first_token_as_nginx_reads_it(tmp_path):
    """The rotation's files (docs/security.md): render.sh accepts every line, the client sends the first."""
    path = tmp_path / "token"
    path.write_text(f"# rotation under way\n\n  {TOKEN_I}  \r\n{TOKEN_NEW}\n")
    assert read_token(path) == TOKEN_I
    path.write_text(f"{TOKEN_NEW}\n{TOKEN_I}\n")
    assert read_token(path) == TOKEN_NEW
    for bad, why in ((f"{TOKEN_I}\nshort\n", "line 2: a token has 5 characters"),
                     ("# only a comment\n", "holds no token")):
        path.write_text(bad)
        with pytest.raises(ValueError, match=why):
            read_token(path)


def test_a_changed_token_file_is_read_before_the_next_request_and_a_torn_write_keeps_the_last(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"{TOKEN_I}\n")
    keys = Keys(token_file=path)
    assert keys.get("inference") == TOKEN_I
    staged = tmp_path / "token.new"  # the way a Secret volume is updated: a new file swapped in
    staged.write_text(f"{TOKEN_NEW}\n{TOKEN_I}\n")
    staged.replace(path)
    assert keys.get("inference") == TOKEN_NEW  # no refusal needed to see it
    path.write_text("")  # caught between truncate and write
    assert keys.get("inference") == TOKEN_NEW
    path.write_text(f"{TOKEN_I}\n")
    assert keys.get("inference") == TOKEN_I


def test_exit_codes_say_what_a_scheduler_should_do():
    assert EXIT_CODES[KeyRefused] == 2 and EXIT_CODES[UserError] == 2  # never retry as it is
    assert EXIT_CODES[ServerUnavailable] == 3  # retry later
    assert next(code for kind, code in EXIT_CODES.items() if isinstance(KeyRefused("x"), kind)) == 2


def test_one_extension_list_and_parser():
    assert parse_extensions("JPG, .png,,") == {".jpg", ".png"}
    assert set(IMAGE_EXTENSIONS) == parse_extensions(",".join(IMAGE_EXTENSIONS))
    with pytest.raises(UserError, match="--extensions names no extension"):
        parse_extensions(" , . ,")


def test_the_one_walk_follows_folder_links_once_and_yields_odd_entries(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"x")
    (tmp_path / "a" / "loop").symlink_to(tmp_path)  # a loop: entered once, no hang
    (tmp_path / "b").symlink_to(tmp_path / "a")  # a second link to one folder: its files once
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")  # broken: yielded, to get a row
    found = sorted(p.relative_to(tmp_path).as_posix() for p in iter_files(tmp_path, {".png"}))
    assert found == ["a/x.png", "gone.png"]


LOG_LINE = "2026-12-01T08:00:00,000 [INFO ] W-9000-m_1.0 org.pytorch.serve.wlm.WorkerThread - {}\n"


def test_batch_watch_forgets_what_a_worker_did_before_the_servers_last_start(tmp_path):
    log = tmp_path / "ts_log.log"
    # the previous run of the server: worker 9000 took a batch and the server died before answering
    log.write_text("Torchserve version: 0.12.0\n" + LOG_LINE.format("Looping backend response") +
                   "Torchserve version: 0.12.0\n")
    watch = BatchWatch(tmp_path, "m", "1.0")
    assert watch.busy(["9000"]) is None  # the restarted server's worker 9000 holds nothing
    with open(log, "a") as f:
        f.write(LOG_LINE.format("Looping backend response"))
    assert watch.busy(["9000"]) == {"9000"}
    with open(log, "a") as f:
        f.write(LOG_LINE.format("Backend response time: 12"))
    assert watch.busy(["9000"]) == set()


def test_batch_watch_sees_a_rotation_to_a_larger_file(tmp_path):
    log = tmp_path / "ts_log.log"
    log.write_text(LOG_LINE.format("Backend response time: 1"))
    watch = BatchWatch(tmp_path, "m", "1.0")
    assert watch.busy(["9000"]) == set()
    rotated = tmp_path / "new.log"  # a new file, already longer than the old one's offset
    rotated.write_text("x" * 500 + "\n" + LOG_LINE.format("Looping backend response"))
    rotated.replace(log)
    assert watch.busy(["9000"]) == {"9000"}  # size alone would have missed it


def test_every_thread_has_its_own_session_and_close_closes_them_all():
    server = TorchServe("http://127.0.0.1:9", keys=Keys(keys={}))
    sessions = [server.session()]
    other = threading.Thread(target=lambda: sessions.append(server.session()))
    other.start()
    other.join()
    assert sessions[0] is server.session() and sessions[0] is not sessions[1]  # never shared
    closed = []
    for session in sessions:
        session.close = lambda s=session: closed.append(s)
    server.close()
    assert len(closed) == 2


def test_ping_closes_the_session_it_opened(monkeypatch):
    opened = []
    real = new_session

    def tracked(pool_size=4):
        session = real(pool_size)
        session.close = lambda: opened.append("closed")
        opened.append("opened")
        return session

    monkeypatch.setattr("core.torchserve.new_session", tracked)
    assert "unreachable" in ts_ping("http://127.0.0.1:9", timeout=1)
    assert opened == ["opened", "closed"]


def test_a_refusal_by_the_proxy_is_a_key_refused_not_matched_by_text():
    proxy = FakeHTTP({"/ping": (401, b"<html>401 Authorization Required</html>")})  # nginx's own page
    with pytest.raises(KeyRefused):
        ts_ping(proxy.url, Keys(keys={"inference": "wrong"}))
    proxy.close()


def test_a_bug_in_a_version_lookup_is_not_taken_for_an_unknown_version(monkeypatch):
    from client.sending import VersionTracker

    server = TorchServe("http://127.0.0.1:9", keys=Keys(keys={}))
    def buggy(model):
        raise TypeError("'NoneType' object is not subscriptable")  # a bug, not an unknown version

    monkeypatch.setattr(server, "default_version", buggy)
    with pytest.raises(TypeError):
        VersionTracker(server, "m", None).version_for(0.0)


def test_keys_given_directly_are_kept_and_never_replaced_by_a_local_key_file(tmp_path, monkeypatch):
    """ping(url) builds Keys(keys={}): it must not pick up (and send) the local key_file.json."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "key_file.json").write_text(json.dumps({"inference": {"key": "local-secret"}}))
    assert Keys(keys={}).get("inference") is None
    assert Keys(keys={"inference": "given"}).get("inference") == "given"


@pytest.mark.parametrize("content", [None, '{"management": {"key": 1}'])
def test_serve_helper_names_an_unreadable_key_file_in_one_line(tmp_path, content):
    """`python -m core.readiness wait` (serve.sh's helper) with a key file that is a folder or cut-short
    JSON: one line naming it, exit 1, no traceback (it waits for the file to become readable first)."""
    key_file = tmp_path / "key_file.json"
    if content is None:
        key_file.mkdir()
    else:
        key_file.write_text(content)
    port = free_ports(1)[0]  # nothing listens there
    result = subprocess.run([sys.executable, "-m", "core.readiness", "wait", "--url", f"http://127.0.0.1:{port}",
                             "--management-url", f"http://127.0.0.1:{port}", "--key-file", str(key_file),
                             "--timeout", "1"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and f"cannot read key file {key_file}" in result.stderr
