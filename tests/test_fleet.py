"""Fleets and shards: the fleet file's errors, the shard hash, the merge; a real fleet of 3 servers."""
from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from client import fleet, shards
from client.dispatch import Dispatcher, ReplicaState
from client.pixels import send_file
from client.policy import Kind, Retry
from client.sending import Answer, Served
from core.errors import ServerUnavailable, UserError
from tests.conftest import (
    MODEL,
    PYTHON,
    REPO,
    VERSION,
    FakeHTTP,
    make_server,
    popen,
    rows_written,
    running_fleet,
    tiny_store,
    wait_for,
    write_images,
)

CLIENT = REPO / "scripts" / "classify_dir.py"
MERGE = REPO / "scripts" / "merge_shards.py"

def load_make_fleet():
    """deploy/kubernetes/make_fleet.py, a standalone script (not in a package), loaded by its path."""
    path = REPO / "deploy" / "kubernetes" / "make_fleet.py"
    spec = importlib.util.spec_from_file_location("make_fleet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_fleet(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def fleet_error(tmp_path: Path, text: str, name: str = "fleet.yaml") -> str:
    with pytest.raises(UserError) as caught:
        fleet.load_fleet(write_fleet(tmp_path / name, text))
    message = str(caught.value)
    assert "\n" not in message
    return message


ENTRY = "  - name: {name}\n    inference_url: {url}\n    key_file: keys/{name}.json\n"


# ---- the fleet file ----

def test_fleet_file_written_by_make_fleet_parses_with_each_replicas_urls_and_token_file(tmp_path):
    text = load_make_fleet().fleet_yaml(3, "ml", "/etc/ts-tokens/inference/token")
    replicas = fleet.load_fleet(write_fleet(tmp_path / "fleet.yaml", text))
    assert [r.name for r in replicas] == ["ts-0", "ts-1", "ts-2"]
    assert replicas[2].inference_url == "http://ts-2.ts.ml.svc.cluster.local:8090"
    assert replicas[2].management_url == "http://ts-2.ts.ml.svc.cluster.local:8091"
    assert replicas[2].token_file == Path("/etc/ts-tokens/inference/token")


def test_fleet_file_in_json_defaults_the_management_url_and_anchors_key_files_at_the_file(tmp_path):
    data = {"replicas": [{"name": "a", "inference_url": "http://127.0.0.1:9100/", "key_file": "k/a.json"}]}
    (tmp_path / "sub").mkdir()
    replica, = fleet.load_fleet(write_fleet(tmp_path / "sub" / "fleet.json", json.dumps(data)))
    assert replica.inference_url == "http://127.0.0.1:9100"
    assert replica.management_url == "http://127.0.0.1:9101"
    assert replica.key_file == tmp_path / "sub" / "k" / "a.json"


def test_fleet_file_with_bad_yaml_names_the_file_and_line(tmp_path):
    text = "replicas:\n  - name: a\n    inference_url: http://h:1\n   bad: [unclosed\n"
    message = fleet_error(tmp_path, text)
    assert re.search(r"fleet\.yaml:\d+: not valid YAML", message), message


@pytest.mark.parametrize("text,needle", [
    ("[]\n", "expected a mapping with a list 'replicas:'"),
    ("replicas: []\n", "'replicas' is empty"),
    ("replicas:\n  - just-a-string\n", "replicas[0]: expected a mapping"),
    ("replicas:\n  - name: a\n", "replica 'a' (replicas[0]): inference_url must be a URL"),
    ("replicas:\n  - inference_url: http://h:1\n", "replicas[0]: name must be"),
    ("replicas:\n  - name: a\n    inference_url: http://h:1\n    keyfile: k.json\n",
     "unknown key(s) ['keyfile']"),
    ("replicas: 5\n", "expected a mapping with a list 'replicas:'"),
    ('replicas:\n  - name: "a\\n"\n    inference_url: http://h:1\n',  # the bad name stays on one line
     "replica 'a\\n' (replicas[0]): name must be letters, digits"),
    ("replicas:\n  - name: a\n    inference_url: http://h:1\n    key_file: ' '\n",
     "replica 'a' (replicas[0]): key_file must be a path, got ' '"),
    ("replicas:\n  - name: a\n    inference_url: http://h:1\n    management_url: 5\n",
     "replica 'a' (replicas[0]): management_url must be a URL such as http://HOST:PORT, got 5"),
    ("replicas:\n  - name: a\n    inference_url: http://h:1\n  - {}\n", "replicas[1]: name must be"),
])
def test_fleet_file_with_missing_or_unknown_keys_names_the_entry(tmp_path, text, needle):
    assert needle in fleet_error(tmp_path, text)


def test_fleet_file_with_duplicate_names_or_urls_names_both_entries(tmp_path):
    same_name = "replicas:\n" + ENTRY.format(name="a", url="http://h:1") + ENTRY.format(name="a",
                                                                                      url="http://h:3")
    assert "replicas[0] and replicas[1] have the same name 'a'" in fleet_error(tmp_path, same_name)
    same_url = "replicas:\n" + ENTRY.format(name="a", url="http://h:1") + ENTRY.format(name="b",
                                                                                     url="http://h:1/")
    message = fleet_error(tmp_path, same_url)
    assert "replicas[0] and replicas[1] have the same inference_url 'http://h:1'" in message


@pytest.mark.parametrize("url,needle", [
    ("ftp://h:1", "must be an http(s) URL with a host"),
    ("http://:8080", "must be an http(s) URL with a host"),
    ("http://h:99999", "Port out of range"),
    ("http://h:8080/predictions/tiny", "without a path"),
    ("8080", "must be a URL such as http://HOST:PORT, got 8080"),
    ("localhost:8080", "must be an http(s) URL with a host"),
])
def test_fleet_file_with_a_bad_url_names_the_replica(tmp_path, url, needle):
    message = fleet_error(tmp_path, "replicas:\n" + ENTRY.format(name="ts-1", url=url))
    assert "replica 'ts-1' (replicas[0]): inference_url" in message and needle in message


def test_fleet_file_missing_is_one_line(tmp_path):
    with pytest.raises(UserError, match="cannot read the fleet file"):
        fleet.load_fleet(tmp_path / "nope.yaml")


# ---- the shard hash ----

def test_shard_hash_is_deterministic_across_processes():
    paths = [f"class{i % 7}/img_{i:05d}.jpg" for i in range(50)]
    here = [shards.shard_of(p, 4) for p in paths]
    code = f"from client.shards import shard_of; print([shard_of(p, 4) for p in {paths!r}])"
    other = subprocess.run([str(PYTHON), "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123"}, cwd=REPO)
    assert json.loads(other.stdout) == here


def test_shard_hash_is_stable_when_files_are_added():
    before = {f"a/{i}.png": shards.shard_of(f"a/{i}.png", 5) for i in range(2000)}
    added = [f"b/new_{i}.png" for i in range(1000)]
    after = {p: shards.shard_of(p, 5) for p in [*before, *added]}
    assert all(after[p] == k for p, k in before.items())


def test_shard_hash_is_roughly_balanced():
    counts = Counter(shards.shard_of(f"dir{i // 100}/{i:06d}.jpg", 4) for i in range(20000))
    # 5000 expected per shard; a binomial's standard deviation is 61 here, so 5 % (250) is > 4 sigma
    assert set(counts) == {0, 1, 2, 3}
    assert all(abs(n - 5000) <= 250 for n in counts.values()), counts


@pytest.mark.parametrize("text", ["4/4", "-1/4", "1", "a/b", "0/0", "1/0", "1/2/3"])
def test_shard_outside_0_to_n_minus_1_is_a_usage_error(text):
    with pytest.raises(UserError) as caught:
        shards.parse_shard(text)
    assert "--shard" in str(caught.value) and "\n" not in str(caught.value)


def test_shard_0_based_k_of_n_parses():
    assert shards.parse_shard("0/4") == (0, 4) and shards.parse_shard("3/4") == (3, 4)


# ---- the merge ----

def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def ok(rel: str, replica: str = "ts-0") -> dict:
    return {"path": rel, "status": "ok", "label": "red", "probability": 0.9,
            "topk": [{"label": "red", "index": 0, "probability": 0.9}], "error": None, "http_status": 200,
            "model": "tiny", "model_version": "1.0", "latency_ms": 3.0, "replica": replica}


def run_merge(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYTHON), str(MERGE), *map(str, args)], capture_output=True, text=True,
                          timeout=60)


def test_merge_names_files_with_two_rows_and_writes_nothing(tmp_path):
    a = write_rows(tmp_path / "s0.jsonl", [ok("x.png"), ok("y.png")])
    b = write_rows(tmp_path / "s1.jsonl", [ok("y.png"), ok("z.png")])
    done = run_merge(tmp_path / "merged.jsonl", a, b)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: 1 files have more than one row: y.png (s0.jsonl, s1.jsonl)"
    assert not (tmp_path / "merged.jsonl").exists()


def test_merge_with_dir_names_missing_files(tmp_path):
    images = tmp_path / "images"
    a = write_rows(tmp_path / "s0.jsonl", [ok(p) for p in sorted(write_images(images, 6))[:4]])
    done = run_merge(tmp_path / "merged.jsonl", a, "--dir", images)
    assert done.returncode == 2
    assert "2 files under" in done.stderr
    assert "are in no shard output: red/0000.png, red/0003.png" in done.stderr


def test_merge_of_jsonl_and_csv_shards_writes_every_row_once_typed_and_exit_1_on_failed_files(tmp_path):
    from client.results import FIELDS, RowWriter
    a = write_rows(tmp_path / "s0.jsonl", [ok("b.png", "ts-1")])
    writer = RowWriter(tmp_path / "s1.csv", FIELDS, append=False)
    writer.write(ok("a.png", "ts-2"))
    writer.write({**ok("c.png"), "status": "error", "label": None, "probability": None, "topk": None,
                  "error": "undecodable", "http_status": 400})
    writer.close()
    done = run_merge(tmp_path / "merged.jsonl", a, tmp_path / "s1.csv")
    assert done.returncode == 1, done.stderr
    rows = [json.loads(line) for line in (tmp_path / "merged.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == ["a.png", "b.png", "c.png"]
    assert rows[0] == ok("a.png", "ts-2")  # CSV text back to numbers and a topk list
    assert rows[2]["http_status"] == 400 and rows[2]["probability"] is None
    assert "3 files" in done.stdout and "failed 1" in done.stdout


# ---- the dispatcher, with fake replicas (a fake is the only way to make a replica answer 500 to
# everything, or hang, on cue; the real fleet below shows the rest) ----

class FakeSender:
    """A replica's classifier: answers `status` after `delay`, or raises ServerUnavailable while `down`."""

    def __init__(self, delay: float = 0.0, status: int = 200, reason: str | None = None):
        self.delay, self.down, self.calls, self.status, self.reason = delay, False, 0, status, reason

    def send(self, body, content_type, row):
        self.calls += 1
        time.sleep(self.delay)
        if self.down:
            raise ServerUnavailable("server unreachable")
        if self.reason:  # no answer at all: "timeout" or "connection"
            return Answer(None, self.reason, error=f"no answer ({self.reason})", kind=Kind.NO_ANSWER)
        if self.status == 200:
            return Answer({**row, "status": "ok"}, None, 200)
        return Answer({**row, "status": "error", "error": "Worker died"}, f"http {self.status}", self.status)

    def no_ready_worker(self):
        return None


def fake_fleet(senders: list[FakeSender], probe, per_replica: int = 2, grace: float = 30.0,
               retry: Retry | None = None) -> Dispatcher:
    states = []
    for i, sender in enumerate(senders):
        url = f"http://127.0.0.1:{9100 + 2 * i}"
        replica = fleet.Replica(f"r{i}", url, fleet.management_url_for(url))
        states.append(ReplicaState(replica, replica.api(), sender))
    return Dispatcher(states, per_replica, retry or Retry(backoff=0.01), prepare=send_file, max_bytes=1 << 20,
                      model="m", admit=probe, probe_interval=0.05, grace=grace)


def classify_at_once(sender: Dispatcher, image: Path, count: int) -> list:
    """`count` files through the dispatcher from `count` threads at once; their results."""
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(sender.classify(image, f"{i}.png")))
               for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "x.png"
    path.write_bytes(b"\x89PNG fake")
    return path


def test_dispatcher_moves_files_off_a_failed_replica_and_probes_it_back_in(image):
    senders = [FakeSender(), FakeSender()]
    senders[1].down = True
    up = threading.Event()
    sender = fake_fleet(senders, probe=lambda s: None if up.is_set() else "down")
    rows = [sender.classify(image, f"{i}.png")[0] for i in range(6)]
    assert {r["replica"] for r in rows} == {"r0"} and sender.states[1].taken_out == 1
    senders[1].down = False
    up.set()
    assert wait_for(lambda: sender.states[1].healthy, 5)
    rows = [sender.classify(image, f"{i}.png")[0] for i in range(4)]
    assert "r1" in {r["replica"] for r in rows}  # back in: ties go to the replica that was sent least
    sender.close()


def test_dispatcher_stops_with_the_reasons_when_every_replica_stays_out(image):
    senders = [FakeSender(), FakeSender()]
    senders[0].down = senders[1].down = True
    sender = fake_fleet(senders, probe=lambda s: "no answer", grace=0.3)
    with pytest.raises(ServerUnavailable, match=r"no replica answered .*r0: no answer"):
        sender.classify(image, "a.png")
    sender.close()


def test_dispatcher_prefers_the_replica_with_fewest_in_flight(image):
    senders = [FakeSender(delay=0.3), FakeSender(delay=0.01)]
    sender = fake_fleet(senders, probe=lambda s: None, per_replica=4)
    threads = [threading.Thread(target=sender.classify, args=(image, f"{i}.png")) for i in range(40)]
    for t in threads:
        t.start()
        time.sleep(0.005)
    for t in threads:
        t.join()
    # the slow replica holds its requests 30x longer, so the fast one answers most files
    assert senders[1].calls > 2 * senders[0].calls, (senders[0].calls, senders[1].calls)
    sender.close()


def test_a_replica_answering_500_to_everything_is_taken_out_and_its_files_answered_elsewhere(image):
    senders = [FakeSender(status=500), FakeSender(delay=0.01)]
    sender = fake_fleet(senders, probe=lambda s: None if s.replica.name == "r1" else "still failing",
                        per_replica=4)
    results = classify_at_once(sender, image, 60)
    assert len(results) == 60 and all(row["status"] == "ok" and row["replica"] == "r1" for row, _ in results)
    bad = sender.states[0]
    assert not bad.healthy and bad.taken_out == 1 and "failed answers in a row" in bad.out_why, bad
    assert bad.why == "still failing"  # the probe's latest reason keeps it out
    assert senders[0].calls <= Retry().take_out_after + 4  # the ones in flight when it was taken out
    sender.close()


def test_a_500_answered_by_every_replica_is_the_images_error_and_a_400_is_not_retried(image):
    senders = [FakeSender(status=500), FakeSender(status=500)]
    sender = fake_fleet(senders, probe=lambda s: None)
    row, reason = sender.classify(image, "a.png")
    assert row["status"] == "error" and reason == "http 500" and senders[0].calls + senders[1].calls == 2
    senders = [FakeSender(status=400), FakeSender(status=400)]
    sender2 = fake_fleet(senders, probe=lambda s: None)
    row, reason = sender2.classify(image, "a.png")
    assert reason == "http 400" and senders[0].calls + senders[1].calls == 1
    assert all(s.healthy for s in sender2.states)  # a bad image is not the replica's fault
    sender.close()
    sender2.close()


def test_a_replica_whose_workers_are_gone_is_taken_out_and_the_run_goes_on(image):
    class NoWorkers(FakeSender):
        def no_ready_worker(self):
            return "model 'm' version 1.0 has no READY worker on r0 and answers 503"

    senders = [NoWorkers(status=503), FakeSender()]
    sender = fake_fleet(senders, probe=lambda s: "no READY worker" if s.replica.name == "r0" else None,
                        retry=Retry(total=0, backoff=0.01))  # the first 503 is the last: the check runs
    rows = [sender.classify(image, f"{i}.png") for i in range(4)]
    assert all(row["status"] == "ok" and row["replica"] == "r1" for row, _ in rows)  # not a stopped run
    assert not sender.states[0].healthy and "no READY worker" in sender.states[0].out_why
    sender.close()


def test_answers_still_in_flight_from_a_replica_that_is_out_do_not_restart_the_grace(image):
    """Every worker gone (503 to all, no READY worker) with many requests in flight: the run ends
    after the grace with exit 3's error, not a hang (late 503s from the out replica kept resetting it)."""
    class NoWorkers(FakeSender):
        def no_ready_worker(self):
            return "model 'm' version 1.0 has no READY worker"

    sender = fake_fleet([NoWorkers(delay=0.05, status=503)], probe=lambda s: "no READY worker",
                        per_replica=8, grace=1.0, retry=Retry(total=0, backoff=0.01))
    errors = []

    def one(i):
        try:
            sender.classify(image, f"{i}.png")
        except ServerUnavailable as e:
            errors.append(str(e))

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    sender.close()
    assert not any(t.is_alive() for t in threads) and errors and "no replica answered" in errors[0]


def test_a_replica_answering_502_is_taken_out_and_its_files_answered_elsewhere(image):
    """A pod whose TorchServe died behind its nginx answers 502 at once: not one file's error."""
    senders = [FakeSender(status=502), FakeSender(delay=0.01)]
    sender = fake_fleet(senders, probe=lambda s: "502 on /ping" if s.replica.name == "r0" else None,
                        per_replica=4, retry=Retry(total=1, backoff=0.01))
    results = classify_at_once(sender, image, 80)
    assert len(results) == 80 and all(row["status"] == "ok" for row, _ in results)
    assert not sender.states[0].healthy and "failed answers in a row" in sender.states[0].out_why
    sender.close()


def test_a_key_refused_on_every_replica_mid_run_is_a_configuration_error(image):
    from core.errors import KeyRefused

    class Refusing(FakeSender):
        def send(self, body, content_type, row):
            raise KeyRefused("the server refused the inference token")

    sender = fake_fleet([Refusing()], probe=lambda s: "refused the token", grace=0.3)
    with pytest.raises(KeyRefused, match="no replica answered"):
        sender.classify(image, "a.png")
    sender.close()


def test_a_500_moves_to_another_replica_even_with_no_retries_left(image):
    senders = [FakeSender(status=500), FakeSender()]
    sender = fake_fleet(senders, probe=lambda s: None, retry=Retry(total=0))
    rows = [sender.classify(image, f"{i}.png")[0] for i in range(10)]
    assert all(r["status"] == "ok" for r in rows)  # --retries 0 is about transient answers, not this
    sender.close()


def test_a_replica_that_hangs_is_taken_out_at_its_first_timeout(image):
    senders = [FakeSender(reason="timeout"), FakeSender()]
    sender = fake_fleet(senders, probe=lambda s: "hanging" if s.replica.name == "r0" else None)
    rows = [sender.classify(image, f"{i}.png")[0] for i in range(5)]
    assert all(r["status"] == "ok" and r["replica"] == "r1" for r in rows)
    assert senders[0].calls == 1 and not sender.states[0].healthy  # one timeout, not (retries + 1)
    sender.close()


# ---- the command line, no server ----

def test_classify_dir_with_a_bad_fleet_file_or_shard_exits_2_with_one_line(tmp_path):
    write_images(tmp_path / "images", 3)
    bad = write_fleet(tmp_path / "fleet.yaml", "replicas:\n  - name: a\n")
    for extra, needle in ((["--fleet", str(bad)], "fleet.yaml: replica 'a' (replicas[0]): inference_url"),
                          (["--fleet", str(bad), "--url", "http://127.0.0.1:1"],
                           "--fleet names each replica"),
                          (["--fleet", str(bad), "--url", "http://127.0.0.1:8080"],  # the old default too
                           "--fleet names each replica"),
                          (["--shard", "3/3"], "--shard 3/3: K must be 0..N-1")):
        done = subprocess.run([str(PYTHON), str(CLIENT), str(tmp_path / "images"), "--output",
                               str(tmp_path / "out.jsonl"), *extra], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and needle in done.stderr, done.stderr


# ---- a real fleet of 3 TorchServes on loopback ----

@pytest.fixture(scope="module")
def fleet3(tmp_path_factory, tiny_run):
    """3 servers of tiny 1.0, started in parallel; each stopped by its pid at the end (workers too)."""
    base = tmp_path_factory.mktemp("fleet")
    store = tiny_store(base, tiny_run)
    servers = [make_server(base / f"ts-{i}", store, tiny_run, [f"{MODEL}-{VERSION}.mar"]) for i in range(3)]
    with running_fleet(servers, base / "fleet.yaml") as fleet_file:
        yield servers, fleet_file


def classify(fleet_file: Path, directory: Path, output: Path, *extra: str) -> list[str]:
    return [str(PYTHON), str(CLIENT), str(directory), "--model", MODEL, "--fleet", str(fleet_file),
            "--output", str(output), *extra]


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_single_url_rows_name_the_replica_as_host_and_port(fleet3, tmp_path):
    servers, _ = fleet3
    write_images(tmp_path / "images", 6)
    output = tmp_path / "out.jsonl"
    done = subprocess.run([str(PYTHON), str(CLIENT), str(tmp_path / "images"), "--model", MODEL, "--url",
                           servers[0].inference_url, "--token-file", str(servers[0].key_file), "--output",
                           str(output)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    host_port = servers[0].inference_url.removeprefix("http://")
    assert {r["replica"] for r in rows_of(output)} == {host_port}
    assert f"replica {host_port}: files 6," in done.stdout  # a fleet of one, summarised like any fleet


def test_a_single_url_and_a_fleet_of_one_give_identical_rows(fleet3, tmp_path):
    """One path: --url builds a fleet of one; the same server through a one-entry fleet file answers
    every file the same (only the replica's name differs: HOST:PORT against the entry's name)."""
    servers, _ = fleet3
    paths = write_images(tmp_path / "images", 30)
    (tmp_path / "images" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    one = fleet.write_fleet(tmp_path / "one.yaml", [{"name": "solo", "inference_url": servers[0].inference_url,
                                                     "management_url": servers[0].management_url,
                                                     "key_file": servers[0].key_file}])
    outputs = {}
    for name, target in (("url", ["--url", servers[0].inference_url, "--management-url", servers[0].management_url,
                                  "--token-file", str(servers[0].key_file)]),
                         ("fleet", ["--fleet", str(one)])):
        outputs[name] = tmp_path / f"{name}.jsonl"
        done = subprocess.run([str(PYTHON), str(CLIENT), str(tmp_path / "images"), "--model", MODEL, *target,
                               "--output", str(outputs[name])], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr

    def answers(path: Path) -> dict:
        keep = ("status", "label", "error", "http_status", "model", "model_version")
        return {r["path"]: ({k: r[k] for k in keep}, r["probability"]) for r in rows_of(path)}

    by_url, by_fleet = answers(outputs["url"]), answers(outputs["fleet"])
    assert len(by_url) == len(paths) + 1 and by_url.keys() == by_fleet.keys()
    for path, (row, probability) in by_url.items():
        assert row == by_fleet[path][0], path
        # 1e-6: the server batches the two runs' requests differently, and batch size picks kernels
        assert probability == by_fleet[path][1] or abs(probability - by_fleet[path][1]) <= 1e-6, path


def test_three_shards_cover_every_file_once_with_one_shard_killed_and_resumed(fleet3, tmp_path):
    _, fleet_file = fleet3
    images = tmp_path / "images"
    paths = write_images(images, 300)
    outputs = [tmp_path / f"shard-{k}-of-3.jsonl" for k in range(3)]
    for k in (0, 2):
        done = subprocess.run(classify(fleet_file, images, outputs[k], "--shard", f"{k}/3"),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    # shard 1 one request at a time, killed once it has written some rows
    command = classify(fleet_file, images, outputs[1], "--shard", "1/3", "--concurrency", "1")
    killed = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: rows_written(outputs[1]) >= 10, 60)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(30) == -signal.SIGKILL
    in_shard_1 = [p for p in paths if shards.shard_of(p, 3) == 1]
    assert rows_written(outputs[1]) < len(in_shard_1)
    done = subprocess.run(classify(fleet_file, images, outputs[1], "--shard", "1/3", "--resume"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for k, output in enumerate(outputs):
        assert {shards.shard_of(r["path"], 3) for r in rows_of(output)} == {k}
    assert sorted(r["path"] for r in rows_of(outputs[1])) == sorted(in_shard_1)
    merged = tmp_path / "merged.jsonl"
    done = subprocess.run([str(PYTHON), str(MERGE), str(merged), *map(str, outputs), "--dir", str(images)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = rows_of(merged)
    assert [r["path"] for r in rows] == sorted(paths) and all(r["status"] == "ok" for r in rows)
    assert f"300 files (every file under {images} exactly once)" in done.stdout


def test_fleet_of_3_with_one_replica_killed_mid_run_classifies_every_file_exactly_once(fleet3, tmp_path):
    servers, fleet_file = fleet3
    images = tmp_path / "images"
    paths = write_images(images, 600)
    output = tmp_path / "out.jsonl"
    with popen(classify(fleet_file, images, output, "--concurrency", "4")) as run:
        assert wait_for(lambda: rows_written(output) >= 100, 120)
        servers[1].kill()  # SIGKILL of its frontend: connections reset, requests it held are lost
        stdout, stderr = run.communicate(timeout=180)
    assert run.returncode == 0, stderr
    rows = rows_of(output)
    assert Counter(r["path"] for r in rows) == Counter(paths)  # every file exactly once
    assert all(r["status"] == "ok" for r in rows)
    by_replica = Counter(r["replica"] for r in rows)
    assert set(by_replica) == {"ts-0", "ts-1", "ts-2"}, by_replica
    assert rows_written(output) == 600
    lines = {name: next(line for line in stdout.splitlines() if line.startswith(f"replica {name}: "))
             for name in by_replica}
    for name, n in by_replica.items():
        assert f"files {n}, " in lines[name] and "errors 0" in lines[name]
    assert "taken out 1x" in lines["ts-1"] and "taken out" not in lines["ts-0"]


# ---- regressions: cut answers, livelock, keys, probe thread, settings; small local servers ----

HEALTHY = (200, b'{"status": "Healthy"}')


def cut_answer_server():
    """A socket that answers every request with a 200 whose body stops halfway, then hangs up."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                         b'[{"label"')
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener, f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_classifier_counts_an_answer_cut_midway_as_a_connection_failure(tmp_path):
    from client.sending import Classifier
    from core.keys import Keys
    from core.torchserve import TorchServe

    listener, url = cut_answer_server()
    server = TorchServe(url, url, Keys(keys={}))
    classifier = Classifier(server, "m", "1.0", topk=1, timeout=5)
    # not a ChunkedEncodingError traceback: no answer, so the dispatcher takes the replica out
    answer = classifier.send(b"\x89PNG....", "application/octet-stream", {"path": "x.png"})
    assert answer.row is None and answer.reason == "connection", answer
    listener.close()


def test_classify_dir_stops_with_exit_3_and_rows_kept_on_an_unexpected_sender_error(tmp_path, monkeypatch):
    from client import classify_dir

    calls: list[str] = []

    class Boom(FakeSender):
        def send(self, body, content_type, row):
            calls.append(row["path"])
            if len(calls) == 2:
                raise RuntimeError("a bug")
            return super().send(body, content_type, row)

    write_images(tmp_path / "images", 3)
    dispatcher = fake_fleet([Boom()], probe=lambda s: None, per_replica=1)
    monkeypatch.setattr(classify_dir, "connect", lambda args: (dispatcher, "m", "server", None))
    output = tmp_path / "out.jsonl"
    args = classify_dir.get_args_parser().parse_args([str(tmp_path / "images"), "--output", str(output),
                                                      "--concurrency", "1", "--preprocess", "server"])
    with pytest.raises(ServerUnavailable) as caught:
        classify_dir.main(args)
    message = str(caught.value)
    assert "\n" not in message and "unexpected RuntimeError" in message and calls[1] in message, message
    assert "1 rows kept" in message
    assert [r["path"] for r in rows_of(output)] == calls[:1]


def test_dispatcher_stops_when_replicas_answer_ping_but_every_request_fails(image):
    senders = [FakeSender(), FakeSender()]
    senders[0].down = senders[1].down = True  # e.g. the model unregistered: /ping still Healthy
    sender = fake_fleet(senders, probe=lambda s: None, grace=0.3)
    outcome = {}

    def run():
        try:
            outcome["result"] = sender.classify(image, "a.png")
        except ServerUnavailable as e:
            outcome["error"] = str(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)  # a livelock never returns; the grace is 0.3s
    sender.close()
    assert not thread.is_alive() and "no replica answered" in outcome.get("error", ""), outcome


def test_run_check_refuses_an_unregistered_version_no_ready_worker_another_version_or_preprocessing(monkeypatch):
    from client.sending import RunCheck
    from core.keys import Keys
    from core.torchserve import TorchServe

    http = FakeHTTP({"/models/m/1.0": (200, b'[{"modelVersion": "1.0", "workers": [{"status": "UNLOADING"}]}]'),
                     "/models/m/3.0": (200, b'[{"modelVersion": "3.0", "workers": [{"status": "READY"}]}]'),
                     "/models/m": (200, b'[{"modelVersion": "3.0", "workers": [{"status": "READY"}]}]')})
    server = TorchServe(http.url, http.url, Keys(keys={}), timeout=5)
    assert "version 1.0 has no READY worker" in RunCheck("m", "1.0").problem(server, ready=True)
    assert RunCheck("m", "1.0").problem(server, ready=False) is None  # at the start, a worker is enough
    assert "version 2.0 is not registered" in RunCheck("m", "2.0").problem(server, ready=True)
    assert RunCheck("m", "3.0").problem(server, ready=True) is None
    # a replica that comes back serving another default version stays out (17: the late joiner)
    assert "not the run's 1.0" in RunCheck("m", None, default_version="1.0").problem(server, ready=True)
    assert RunCheck("m", None, default_version="3.0").problem(server, ready=True) is None
    # one that comes back serving another input size stays out too (its pixels would all be 400)
    from client import pixels
    monkeypatch.setattr(pixels, "settings_of", lambda entry, model: "size 28x28")
    assert "preprocesses 'm' differently" in RunCheck("m", "3.0", settings="size 224x224").problem(server, True)
    http.close()


def test_fleet_replica_without_key_file_sends_no_local_key_and_asks_no_token(tmp_path, monkeypatch):
    from core import keys
    from core.errors import KeyRefused

    local = tmp_path / "key_file.json"
    local.write_text(json.dumps({k: {"key": f"local-{k}"} for k in ("inference", "management", "API")}))
    monkeypatch.setattr(keys, "DEFAULT_KEY_FILE", local)
    http = FakeHTTP({"/ping": (400, b'{"code": 400, "type": "InvalidKeyException", "message": "no"}'),
                     "/token": (200, b"")})
    replica = fleet.Replica("remote", http.url, http.url)
    api = replica.api(timeout=5)
    assert api.keys.get("inference") is None and api.keys.key_file is None
    with pytest.raises(KeyRefused):
        api.ping()
    assert http.requests and all(auth is None for _, _, auth in http.requests), http.requests
    assert not any(path.startswith("/token") for _, path, _ in http.requests), http.requests
    http.close()


def test_fleet_file_that_is_not_utf8_text_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    with pytest.raises(UserError) as caught:
        fleet.load_fleet(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value), caught.value


@pytest.mark.parametrize("body", [b'["Healthy"]', b'"Healthy"', b"null", b"3"])
def test_ping_answering_json_that_is_not_an_object_gives_a_reason(body):
    from core.torchserve import ping

    http = FakeHTTP({"/ping": (200, body)})
    assert ping(http.url).startswith("/ping answered 200")
    http.close()


def test_fleet_probe_thread_survives_a_probe_that_raises(image):
    senders = [FakeSender(), FakeSender()]
    senders[1].down = True
    calls = []

    def probe(state):
        calls.append(state.replica.name)
        if len(calls) < 3:
            raise ServerUnavailable("cannot read key file /keys/r1.json")
        return None

    sender = fake_fleet(senders, probe=probe)
    sender.classify(image, "a.png")
    sender.classify(image, "b.png")  # r1 is tried (fewest sent), fails, is taken out
    senders[1].down = False
    assert wait_for(lambda: sender.states[1].healthy, 30), (calls, sender.states[1])
    assert len(calls) >= 3 and sender._prober.is_alive()
    sender.close()
    assert not sender._prober.is_alive()  # a finished run leaves no probe thread behind


def test_fleet_with_replicas_preprocessing_differently_refuses_to_start():
    import argparse

    from client import classify_dir

    states = []
    for i in range(3):
        url = f"http://127.0.0.1:{9200 + 2 * i}"
        replica = fleet.Replica(f"r{i}", url, fleet.management_url_for(url))
        states.append(ReplicaState(replica, replica.api()))
    served = {f"r{i}": Served("1.0", ("READY",), size) for i, size in enumerate(("size 224", "size 224", "size 256"))}
    args = argparse.Namespace(version=None, allow_mixed_versions=True, preprocess="client")
    with pytest.raises(UserError) as caught:
        classify_dir.run_check(args, states, "m", served)
    message = str(caught.value)
    assert "r0" in message and "r2" in message and "size 224" in message and "size 256" in message, message
    states[2].healthy = False  # a replica that is out is not compared
    assert classify_dir.run_check(args, states, "m", served).settings == "size 224"


def test_fleet_with_replicas_on_different_default_versions_refuses_to_start():
    import argparse

    from client import classify_dir

    states = []
    for i, version in enumerate(("1.0", "3.0")):
        url = f"http://127.0.0.1:{9300 + 2 * i}"
        replica = fleet.Replica(f"r{i}", url, fleet.management_url_for(url))
        states.append(ReplicaState(replica, replica.api()))
    served = {"r0": Served("1.0", ("READY",)), "r1": Served("3.0", ("READY",))}
    args = argparse.Namespace(version=None, allow_mixed_versions=False, preprocess="server")
    with pytest.raises(UserError, match=r"different default versions of 'm' \(r0: 1.0; r1: 3.0\)"):
        classify_dir.run_check(args, states, "m", served)
    args.allow_mixed_versions = True
    assert classify_dir.run_check(args, states, "m", served).default_version is None
