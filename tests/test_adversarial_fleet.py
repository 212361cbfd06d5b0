"""Regression probes of the fleet, the rollout and the merge under faults (the second hardening round):
loose smoke images, a replica that cannot be switched back, unreadable key files, one server listed
under several spellings, shard outputs that cannot be read, rows cut by a kill, odd shard numbers.
No TorchServe: small fakes stand in for replicas that misbehave on cue (test_fleet.py and
test_fleet_manage.py run the real fleets)."""
from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

import pytest

from client import fleet, results, rollout, shards
from client.dispatch import probe_replicas
from client.versions import Member
from core.errors import RolledBack, UserError
from tests.conftest import PYTHON, REPO
from tests.test_fleet_manage import FakeServe, fake_rollout_args, smoke_set

MERGE = REPO / "scripts" / "merge_shards.py"
MANAGE = REPO / "scripts" / "manage.py"


def smoke(images: dict[str, str | None]) -> list:
    return [(b"x", rel, label) for rel, label in images.items()]


def test_smoke_accuracy_is_measured_on_the_images_in_class_folders_and_says_how_many():
    images = smoke({"cat/a.png": "cat", "dog/b.png": "dog", "loose.png": None})
    results_ = [("cat/a.png", "dog", None), ("dog/b.png", "dog", None), ("loose.png", "cat", None)]
    assert rollout.smoke_accuracy(images, results_) == 0.5  # the loose image does not switch it off
    assert rollout.labelled(images) == 2
    assert rollout.smoke_accuracy(smoke({"loose.png": None}), [("loose.png", "cat", None)]) is None


@pytest.fixture
def fake_register(monkeypatch):
    """register and unregister on the fakes: the version joins or leaves the registered ones."""
    monkeypatch.setattr(rollout, "register", lambda client, *a, **k: client.registered.add("2.0"))
    monkeypatch.setattr(rollout, "unregister",
                        lambda client, name, version, *a, **k: client.registered.discard(version))


def test_rollout_with_no_smoke_image_in_a_class_folder_is_refused_while_the_accuracy_gate_is_on(
        tmp_path, fake_register):
    members = [Member("ts-0", FakeServe())]
    args = fake_rollout_args(tmp_path, smoke_set(tmp_path))  # two loose images, no class folder
    args.max_accuracy_drop = 0.01
    with pytest.raises(UserError, match="no smoke image is in a class folder"):
        rollout.rollout(members, args)
    assert (members[0].server.default, members[0].server.registered) == ("1.0", {"1.0"})


class Frozen(FakeServe):
    """A replica that stops answering after its switch to 2.0 (a frontend under SIGSTOP)."""

    def __init__(self, thaw_after: int | None):
        super().__init__()
        self.thaw_after, self.refused = thaw_after, 0

    def call(self, method, path, what, ok_404=False, **params):
        if method == "PUT" and path.endswith("/1.0/set-default") and (
                self.thaw_after is None or self.refused < self.thaw_after):
            self.refused += 1
            raise rollout.Refused(f"{what}: no answer within 1s")
        return super().call(method, path, what, ok_404, **params)

    def predict(self, name, version, data):
        raise rollout.Refused("smoke fails on the last replica")  # makes the rollout roll back


@pytest.mark.parametrize("thaw_after", [2, None])
def test_a_replica_that_cannot_be_switched_back_is_retried_until_the_deadline_and_never_reported_rolled_back(
        tmp_path, fake_register, thaw_after, capsys, monkeypatch):
    monkeypatch.setattr(rollout.time, "sleep", lambda s: None)
    first = FakeServe()
    first.default = "2.0"  # switched already when the failure came
    first.registered.add("2.0")
    stuck = Frozen(thaw_after)
    stuck.default = "2.0"
    stuck.registered.add("2.0")
    args = fake_rollout_args(tmp_path, smoke_set(tmp_path))
    args.rollback_deadline = 0.5 if thaw_after is None else 30
    complete, outcome = rollout.roll_back([Member("a", first), Member("b", stuck)], "m", "2.0", "1.0", args)
    if thaw_after is None:  # never answers: the end state says so, and nothing claims a full rollback
        assert not complete and "INCOMPLETE" in outcome and "b: switching back failed until the deadline" in outcome
        assert stuck.default == "2.0"
    else:  # answers on the third try: switched back and read back
        assert complete and stuck.refused == 2 and stuck.default == "1.0", outcome
    assert first.default == "1.0"


def test_a_rollout_whose_rollback_could_not_reach_a_replica_never_says_rolled_back(tmp_path, fake_register,
                                                                                   monkeypatch):
    args = fake_rollout_args(tmp_path, smoke_set(tmp_path))
    members = [Member("a", FakeServe(rollout.Refused("smoke test: HTTP 500"))), Member("b", FakeServe())]
    monkeypatch.setattr(rollout, "switch_back",
                        lambda m, *a: (False, "switching back failed until the deadline: no answer"))
    monkeypatch.setattr(rollout, "read_state", lambda client, name: (_ for _ in ()).throw(
        rollout.Refused("describe m: no answer within 1s")))  # a frozen replica cannot be read back
    with pytest.raises(RolledBack) as failure:
        rollout.rollout(members, args)
    message = str(failure.value)
    assert "could not be fully rolled back" in message and "INCOMPLETE" in message, message
    assert "was rolled back" not in message and "a: could not be read" not in message  # a: its own reason


def test_one_unreadable_key_file_keeps_that_replica_out_and_the_others_serve(tmp_path):
    folder = tmp_path / "keys-b"
    folder.mkdir()
    replicas = [fleet.Replica("a", "http://127.0.0.1:9", "http://127.0.0.1:10"),
                fleet.Replica("b", "http://127.0.0.1:11", "http://127.0.0.1:12", key_file=folder)]
    states = probe_replicas(replicas, timeout=2)  # no crash for the whole fleet
    assert not states[1].healthy and "cannot read key file" in states[1].why
    assert "unreachable" in states[0].why  # its own reason, not b's


def test_manage_list_over_a_fleet_prints_the_replicas_it_can_read(tmp_path):
    folder = tmp_path / "keys-b"
    folder.mkdir()
    fleet.write_fleet(tmp_path / "fleet.yaml", [
        {"name": "a", "inference_url": "http://127.0.0.1:9"},
        {"name": "b", "inference_url": "http://127.0.0.2:9", "key_file": folder}])
    done = subprocess.run([str(PYTHON), str(MANAGE), "list", "--fleet", str(tmp_path / "fleet.yaml"),
                           "--timeout", "5"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert "b: error: cannot read key file" in done.stdout and "a: error: server unreachable" in done.stdout
    assert "2 of 2 replicas could not be read" in done.stderr


@pytest.mark.parametrize("spellings", [("127.0.0.1", "localhost"), ("127.0.0.1", "127.1")])
def test_one_server_listed_under_two_spellings_is_refused_naming_both(tmp_path, spellings):
    path = fleet.write_fleet(tmp_path / "fleet.yaml", [
        {"name": "a", "inference_url": f"http://{spellings[0]}:8080"},
        {"name": "b", "inference_url": f"http://{spellings[1]}:8080"}])
    with pytest.raises(UserError, match=r"replicas\[0\] \(a\) and replicas\[1\] \(b\) are the same server"):
        fleet.load_fleet(path)


def test_a_fleet_entry_naming_key_file_and_token_file_is_refused(tmp_path):
    path = fleet.write_fleet(tmp_path / "fleet.yaml", [
        {"name": "a", "inference_url": "http://127.0.0.1:8080", "key_file": "k.json", "token_file": "t"}])
    with pytest.raises(UserError, match="name key_file .* or token_file"):
        fleet.load_fleet(path)


ROW = {"path": "a.png", "status": "ok", "label": "red", "probability": 0.9, "topk": [], "error": None,
       "http_status": 200, "model": "m", "model_version": "1.0", "latency_ms": 1.0, "replica": "r"}


def merge(tmp_path: Path, *inputs: Path, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYTHON), str(MERGE), str(tmp_path / "merged.jsonl"), *map(str, inputs), *extra],
                          capture_output=True, text=True, timeout=60)


def test_merge_refuses_a_shard_it_cannot_read_naming_file_and_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(ROW) + "\n")
    gz = tmp_path / "s.jsonl"
    gz.write_bytes(gzip.compress((json.dumps({**ROW, "path": "b.png"}) + "\n").encode()))
    noise = tmp_path / "n.jsonl"
    noise.write_bytes(bytes(range(256)) * 4 + b"\n")
    for bad in (gz, noise):
        done = merge(tmp_path, good, bad)
        assert done.returncode == 2 and f"{bad}:1: unreadable row" in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1 and not (tmp_path / "merged.jsonl").exists()


def test_merge_refuses_a_shard_with_lines_cut_short_and_skip_unreadable_counts_them(tmp_path):
    rows = [json.dumps({**ROW, "path": f"{i}.png"}) for i in range(70)]
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join((line if i % 2 == 0 else line[:20]) + "\n" for i, line in enumerate(rows)))
    done = merge(tmp_path, cut)
    assert done.returncode == 2 and f"{cut}:2: unreadable row" in done.stderr, done.stderr
    done = merge(tmp_path, cut, extra=("--skip-unreadable",))
    assert done.returncode == 0 and "35 files" in done.stdout, done.stdout + done.stderr


def test_merge_reads_a_csv_with_a_byte_order_mark(tmp_path):
    csv_out = tmp_path / "s.csv"
    writer = results.RowWriter(csv_out, results.FIELDS, append=False)
    writer.write(ROW)
    writer.close()
    csv_out.write_bytes(b"\xef\xbb\xbf" + csv_out.read_bytes())  # as a spreadsheet saves it
    done = merge(tmp_path, csv_out)
    assert done.returncode == 0 and "1 files" in done.stdout, done.stderr


def test_merge_reports_versions_and_refuses_mixed_ones_unless_told(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps(ROW) + "\n")
    b.write_text(json.dumps({**ROW, "path": "b.png", "model_version": "3.0"}) + "\n")
    done = merge(tmp_path, a, b)
    assert done.returncode == 2 and "rows of more than one model version: 1.0: 1 rows" in done.stderr
    done = merge(tmp_path, a, b, extra=("--allow-mixed-versions",))
    assert done.returncode == 0 and "model versions 1.0: 1, 3.0: 1" in done.stdout, done.stdout


def test_resume_drops_a_csv_row_cut_inside_its_last_field(tmp_path):
    out = tmp_path / "out.csv"
    fields = results.FIELDS + ("true_label",)
    writer = results.RowWriter(out, fields, append=False)
    writer.write({**ROW, "path": "one/a.png", "true_label": "one"})
    writer.write({**ROW, "path": "seven/b.png", "true_label": "seven"})
    writer.close()
    out.write_bytes(out.read_bytes()[:-3])  # a kill inside "seven\r\n": the row has no line end
    done = results.keep_finished_rows(out, fields, results.Stats())
    assert done == {"one/a.png"}  # "seven/b.png" is redone, not kept with the label "seve"
    assert "seve" not in out.read_text()


def test_resume_refuses_rows_of_another_model_version_unless_told(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps(ROW) + "\n")
    with pytest.raises(UserError, match=r"out.jsonl:1: a row of m version 1.0, and this run's version is 2.0"):
        results.keep_finished_rows(out, results.FIELDS, results.Stats(), "m", "2.0")
    assert out.read_text() == json.dumps(ROW) + "\n"  # the refused rewrite left the file whole
    assert results.keep_finished_rows(out, results.FIELDS, results.Stats(), "m", None) == {"a.png"}
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary copy is this process's own, and gone


@pytest.mark.parametrize("text", ["²/4", "1/٤", "0x1/4"])
def test_a_shard_that_is_not_ascii_digits_is_one_line(text):
    with pytest.raises(UserError, match="--shard must be K/N"):
        shards.parse_shard(text)


def test_a_fleet_write_that_fails_part_way_names_where_it_was_done(tmp_path):
    from tests.conftest import FakeHTTP

    good = FakeHTTP({"/models/m/2.0/set-default": (200, b'{"status": "ok"}')})
    fleet.write_fleet(tmp_path / "fleet.yaml", [
        {"name": "a", "inference_url": good.url, "management_url": good.url},
        {"name": "b", "inference_url": "http://127.0.0.2:9", "management_url": "http://127.0.0.2:10"},
        {"name": "c", "inference_url": "http://127.0.0.3:9", "management_url": "http://127.0.0.3:10"}])
    done = subprocess.run([str(PYTHON), str(MANAGE), "set-default", "m", "2.0", "--fleet",
                           str(tmp_path / "fleet.yaml"), "--timeout", "5"], capture_output=True, text=True,
                          timeout=60)
    good.close()
    assert done.returncode == 3, done.stderr
    assert "a: set-default: /predictions/m now answers with version 2.0" in done.stdout  # said as it happened
    assert "set-default was done on: a; not tried on: c" in done.stderr and done.stderr.startswith("error: b: ")


@pytest.mark.parametrize("url, message", [("http://[::1:8080", "is not a valid URL"),
                                          ("http://user:secret@127.0.0.1:8080", "holds credentials"),
                                          ("http://127.0.0.1:65535", "management URL would be port 65536")])
def test_url_mistakes_are_one_line(tmp_path, url, message):
    (tmp_path / "a.png").write_bytes(b"x")
    done = subprocess.run([str(PYTHON), str(REPO / "scripts" / "classify_dir.py"), str(tmp_path), "--url", url,
                           "--output", str(tmp_path / "out.jsonl")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_an_output_that_is_a_folder_is_one_line_and_a_shard_with_no_files_merges(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "out").mkdir()
    done = subprocess.run([str(PYTHON), str(REPO / "scripts" / "classify_dir.py"), str(tmp_path), "--output",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "is a folder" in done.stderr and "Traceback" not in done.stderr
    empty = tmp_path / "s1.csv"
    results.RowWriter(empty, results.FIELDS, append=False).close()  # shard 1 had no file: a header only
    full = tmp_path / "s0.jsonl"
    full.write_text(json.dumps(ROW) + "\n")
    merged = merge(tmp_path, full, empty)
    assert merged.returncode == 0, merged.stderr
