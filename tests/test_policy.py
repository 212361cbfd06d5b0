"""The dispatcher's policy as data (client/policy.py): decide() from a table of cases, then the faults
it was made for, run for real: a replica answering 200 with a body that is not JSON, a file bounced
back to a replica that already failed it, a describe answered with an object instead of a list.

A real TorchServe serves beside a fake replica where the fault is the replica's own: no real
TorchServe answers a prediction with HTML under a 200, or a describe with an object."""
from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from client import fleet
from client.dispatch import Dispatcher, ReplicaState
from client.pixels import send_file
from client.policy import Action, Decision, Kind, Outcome, Retry, decide
from client.sending import Answer, Classifier
from core.errors import ServerUnavailable
from core.keys import Keys
from core.torchserve import TorchServe
from tests.conftest import MODEL, PYTHON, REPO, VERSION, FakeHTTP, write_images

CLIENT = REPO / "scripts" / "classify_dir.py"
RETRY = Retry(total=3, take_out_after=5)

A = Outcome  # the table's rows stay one line each
CASES = [
    # outcome, attempt, failures, others, no_worker -> decision
    (A(Kind.ANSWER, 200), 0, 3, True, None, Decision(Action.DONE, 0)),
    (A(Kind.ANSWER, 400), 0, 2, True, None, Decision(Action.DONE, 0)),  # the image's fault: the count restarts
    (A(Kind.ANSWER, 503), 0, 0, True, None, Decision(Action.RETRY, 0, back_off=True)),
    (A(Kind.ANSWER, 429), 2, 4, False, None, Decision(Action.RETRY, 0, back_off=True)),  # busy is no failure
    (A(Kind.ANSWER, 503), 3, 0, True, None, Decision(Action.DONE, 0)),  # retries spent
    (A(Kind.ANSWER, 503), 3, 0, True, "no READY worker",
     Decision(Action.MOVE, 0, take_out="no READY worker")),  # every request there would get 503
    (A(Kind.ANSWER, 502, "bad gateway"), 0, 0, True, None, Decision(Action.RETRY, 1, back_off=True)),
    (A(Kind.ANSWER, 504, "gw"), 1, 4, True, None,
     Decision(Action.RETRY, 5, take_out="5 failed answers in a row (last: gw)", back_off=True)),
    (A(Kind.ANSWER, 502), 3, 0, True, None, Decision(Action.DONE, 1)),
    (A(Kind.ANSWER, 500, "Worker died"), 0, 0, True, None, Decision(Action.MOVE, 1, exclude=True)),
    (A(Kind.ANSWER, 500, "Worker died"), 0, 0, False, None, Decision(Action.DONE, 1, exclude=True)),
    (A(Kind.ANSWER, 500, "Worker died"), 3, 4, True, None,  # retries spent do not stop a move
     Decision(Action.MOVE, 5, take_out="5 failed answers in a row (last: Worker died)", exclude=True)),
    # 7: a 200 that is not the handler's answer is the replica's failure, not the image's
    (A(Kind.BAD_ANSWER, 200, "not json"), 0, 0, True, None, Decision(Action.MOVE, 1, exclude=True)),
    (A(Kind.BAD_ANSWER, 200, "not json"), 0, 4, False, None,
     Decision(Action.DONE, 5, take_out="5 failed answers in a row (last: not json)", exclude=True)),
    (A(Kind.NO_ANSWER, None, "timeout"), 0, 2, True, None, Decision(Action.RETRY, 2, take_out="timeout")),
    (A(Kind.NO_ANSWER, None, "connection"), 3, 0, True, None, Decision(Action.DONE, 0, take_out="connection")),
    (A(Kind.KEY_REFUSED, None, "refused"), 3, 1, False, None, Decision(Action.MOVE, 1, take_out="refused")),
    (A(Kind.UNAVAILABLE, None, "gone"), 0, 1, True, None, Decision(Action.MOVE, 1, take_out="gone")),
]


@pytest.mark.parametrize("outcome, attempt, failures, others, no_worker, expected", CASES)
def test_decide_from_the_table(outcome, attempt, failures, others, no_worker, expected):
    got = decide(outcome, attempt=attempt, failures=failures, others=others, retry=RETRY, no_worker=no_worker)
    assert got == expected


def test_the_worker_check_is_asked_for_only_after_the_last_503():
    assert RETRY.asks_workers(A(Kind.ANSWER, 503), 3)
    assert not RETRY.asks_workers(A(Kind.ANSWER, 503), 2)
    assert not RETRY.asks_workers(A(Kind.ANSWER, 500), 3)


# ---- item 8: never back to a replica that failed the file (fakes: one that answers 500 on cue) ----

class Sender:
    """A replica's classifier: `status` after `delay` seconds."""

    def __init__(self, status: int, delay: float = 0.0):
        self.status, self.delay, self.calls = status, delay, 0

    def send(self, body, content_type, row):
        self.calls += 1
        time.sleep(self.delay)
        if self.status == 200:
            return Answer({**row, "status": "ok"}, None, 200)
        return Answer({**row, "status": "error", "error": "boom"}, f"http {self.status}", self.status)

    def no_ready_worker(self):
        return None


def replica_states(names: str | list[str], senders: list | None = None) -> list[ReplicaState]:
    """One ReplicaState a name, on loopback ports nothing listens on (the senders stand in for them)."""
    states = []
    for i, name in enumerate(names):
        url = f"http://127.0.0.1:{9400 + 2 * i}"
        replica = fleet.Replica(name, url, fleet.management_url_for(url))
        states.append(ReplicaState(replica, replica.api(), senders[i] if senders else None))
    return states


def test_a_file_a_replica_failed_waits_for_the_other_and_never_goes_back(tmp_path):
    """A answers 500; B, the only other, is busy (one request a replica): the file waits for B
    instead of bouncing off A until A is taken out for failures that were one image's."""
    write_images(tmp_path, 1)
    image = next(tmp_path.rglob("*.png"))
    senders = [Sender(500), Sender(200, delay=0.5)]
    states = replica_states("AB", senders)
    states[1].in_flight = 1  # B is busy with another file
    dispatcher = Dispatcher(states, 1, Retry(backoff=0.01), prepare=send_file, max_bytes=1 << 20, model="m",
                            admit=lambda s: None, probe_interval=0.05)
    try:
        states[1].sent = 1
        release = threading.Timer(0.5, lambda: dispatcher._release(states[1]))  # B's other file ends
        release.start()
        row, reason = dispatcher.classify(image, "a.png")
        release.join()
    finally:
        dispatcher.close()
    assert row["status"] == "ok" and row["replica"] == "B", row
    assert senders[0].calls == 1, f"A was sent the file {senders[0].calls} times"
    assert states[0].healthy and states[0].taken_out == 0


# ---- items 7 and 9: a real TorchServe beside a fake replica that answers nonsense ----

def nonsense_replica(describe: bytes, prediction: bytes) -> FakeHTTP:
    """A replica whose /ping is healthy and whose describe and predictions answer what it is given."""
    good = json.dumps([{"modelName": MODEL, "modelVersion": VERSION, "workers": [{"status": "READY"}]}]).encode()
    return FakeHTTP({"/ping": (200, b'{"status": "Healthy"}'),
                     "/models": (200, json.dumps({"models": [{"modelName": MODEL}]}).encode()),
                     f"/models/{MODEL}": (200, describe or good),
                     f"/models/{MODEL}/all": (200, describe or good),
                     f"/models/{MODEL}/{VERSION}": (200, describe or good),
                     f"/predictions/{MODEL}": (200, prediction)})


def run_beside(server, fake: FakeHTTP, tmp_path: Path, count: int) -> tuple[subprocess.CompletedProcess, list]:
    images = tmp_path / "images"
    write_images(images, count)
    fleet_file = fleet.write_fleet(tmp_path / "fleet.yaml", [
        {"name": "real", "inference_url": server.inference_url, "management_url": server.management_url,
         "key_file": server.key_file},
        {"name": "fake", "inference_url": fake.url, "management_url": fake.url}])
    output = tmp_path / "rows.jsonl"
    done = subprocess.run([str(PYTHON), str(CLIENT), str(images), "--model", MODEL, "--fleet", str(fleet_file),
                           "--preprocess", "server", "--output", str(output)],
                          capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()] if output.exists() else []
    return done, rows


def test_a_replica_answering_200_with_html_is_taken_out_and_every_file_answered_by_the_other(server, tmp_path):
    fake = nonsense_replica(b"", b"<html><body>maintenance</body></html>")
    try:
        done, rows = run_beside(server, fake, tmp_path, 60)
    finally:
        fake.close()
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(rows) == 60 and len({r["path"] for r in rows}) == 60
    assert all(r["status"] == "ok" and r["replica"] == "real" for r in rows), [r for r in rows if r["status"] != "ok"]
    assert "replica fake:" in done.stdout and "failed answers in a row" in done.stdout, done.stdout


@pytest.mark.parametrize("describe", [b'{"modelVersion": "1.0"}', b'[{"workers": []}]', b'"ok"',
                                      b'[{"modelVersion": "1.0", "workers": "READY"}]'])
def test_a_replica_whose_describe_is_nonsense_stays_out_with_its_reason_and_the_run_goes_on(
        server, tmp_path, describe):
    fake = nonsense_replica(describe, b"[]")
    try:
        done, rows = run_beside(server, fake, tmp_path, 6)
    finally:
        fake.close()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert len(rows) == 6 and all(r["status"] == "ok" and r["replica"] == "real" for r in rows)
    assert "not a list of model versions" in done.stderr, done.stderr


def test_a_run_asks_each_replica_to_describe_the_model_once_before_sending(tmp_path):
    """The start's checks (registered, a worker, the default version, the preprocessing settings) and
    --preprocess auto's choice all come from one describe of the replica (it was asked five times)."""
    answer = json.dumps([{"label": "red", "index": 0, "probability": 0.9}]).encode()
    fake = nonsense_replica(b"", answer)  # a well-behaved replica this time, whose requests are counted
    images = tmp_path / "images"
    write_images(images, 3)
    fleet_file = fleet.write_fleet(tmp_path / "fleet.yaml", [{"name": "only", "inference_url": fake.url,
                                                              "management_url": fake.url}])
    try:
        done = subprocess.run([str(PYTHON), str(CLIENT), str(images), "--model", MODEL, "--fleet", str(fleet_file),
                               "--preprocess", "auto", "--output", str(tmp_path / "rows.jsonl")],
                              capture_output=True, text=True, timeout=300)
    finally:
        fake.close()
    assert done.returncode == 0, done.stdout + done.stderr
    paths = [path for _, path, _ in fake.requests]
    before = paths[:next(i for i, p in enumerate(paths) if p.startswith("/predictions/"))]
    describes = [p for p in before if p.split("?")[0] in (f"/models/{MODEL}", f"/models/{MODEL}/{VERSION}")]
    assert describes == [f"/models/{MODEL}?customized=true"], before


def test_a_file_every_other_replica_is_out_for_keeps_the_row_of_the_one_that_failed_it_counted_there(tmp_path):
    """A answers 500, B turns out to be down: the file's row is A's 500, and A's summary counts it."""
    class Down(Sender):
        def send(self, body, content_type, row):
            self.calls += 1
            raise ServerUnavailable("server unreachable")

    write_images(tmp_path, 1)
    image = next(tmp_path.rglob("*.png"))
    states = replica_states("AB", [Sender(500), Down(200)])
    dispatcher = Dispatcher(states, 1, Retry(backoff=0.01), prepare=send_file, max_bytes=1 << 20, model="m",
                            admit=lambda s: "still down", probe_interval=0.05)
    try:
        row, reason = dispatcher.classify(image, "a.png")
    finally:
        dispatcher.close()
    assert (row["replica"], row["error"], reason) == ("A", "boom", "http 500")
    assert (states[0].files, states[0].errors, states[1].files) == (1, 1, 0)
    assert not states[1].healthy and states[0].healthy


def test_a_503_whose_workers_cannot_be_looked_up_is_the_files_answer_not_the_replicas_fault():
    """After the last 503 the client asks describe whether a worker is READY: only a describe that says
    none is (or answers nonsense) takes the replica out; one that cannot be read leaves the 503 row."""
    broken = FakeHTTP({f"/models/{MODEL}": (500, b'{"message": "internal"}')})
    idle = FakeHTTP({f"/models/{MODEL}": (200, json.dumps([{"modelVersion": "1.0", "workers": [
        {"status": "UNLOADING"}]}]).encode())})
    nonsense = FakeHTTP({f"/models/{MODEL}": (200, b'{"modelVersion": "1.0"}')})
    try:
        def why(http):
            return Classifier(TorchServe(http.url, http.url, Keys(keys={}), timeout=5), MODEL, None,
                              topk=1, timeout=5).no_ready_worker()
        assert why(broken) is None
        assert "has no READY worker" in why(idle)
        assert "not a list of model versions" in why(nonsense)
    finally:
        for http in (broken, idle, nonsense):
            http.close()


def test_a_replica_whose_settings_could_not_be_read_is_not_compared_at_the_start_and_kept_out_until_read():
    import argparse

    from client import classify_dir
    from client.sending import Served

    states = replica_states(["r0", "r1"])
    served = {"r0": Served("1.0", ("READY",), "size 224"),
              "r1": Served("1.0", ("LOADING",), None, unread="HTTP 503: no worker to serve describe")}
    args = argparse.Namespace(version=None, allow_mixed_versions=False, preprocess="auto")
    check = classify_dir.run_check(args, states, "m", served)  # no "different preprocessing" refusal
    assert check.settings == "size 224"
    assert "could not be read (HTTP 503" in check.problem(states[1].server, ready=False, served=served["r1"])
    assert check.problem(states[0].server, ready=False, served=served["r0"]) is None
