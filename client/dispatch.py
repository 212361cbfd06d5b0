"""A run over the replicas, one or many alike: each file to the healthy replica with the fewest requests
in flight and room; a replica that stops answering, hangs or fails every request is taken out, probed
back in (checked as at the start), and the files it held go elsewhere, so each file gets one row."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from client.fleet import Replica
from client.pixels import BadImage
from client.results import error_row
from client.sending import Answer, Classifier, Retry
from core.errors import KeyRefused, ServerUnavailable
from core.files import NotSent, read_image
from core.torchserve import TorchServe

PROBE_INTERVAL_S = 1.0  # how often a replica that was taken out is asked /ping and checked
DEFAULT_GRACE_S = 30.0  # with every replica out this long, the run stops (exit 3, rows kept)


@dataclass
class ReplicaState:
    """One replica during a run: its sender, what it holds, whether it is in, what it did."""

    replica: Replica
    server: TorchServe
    sender: Classifier | None = None
    in_flight: int = 0
    sent: int = 0
    healthy: bool = True
    why: str | None = None  # why it is out now (the probe's latest reason)
    out_why: str | None = None  # why it was last taken out
    taken_out: int = 0
    files: int = 0
    errors: int = 0
    server_errors: int = 0  # 5xx answers in a row (other than the transient ones)
    key_refused: bool = False  # out because it refused our credentials: configuration, not availability
    probe_after: float = 0.0  # time.monotonic() before which it is not probed (backs off as it fails again)


def ping_state(state: ReplicaState) -> str | None:
    """/ping's answer; a refused key or an unreadable key file is a reason to stay out, not a crash."""
    try:
        return state.server.ping()
    except KeyRefused as e:
        state.key_refused = True
        return str(e)
    except ServerUnavailable as e:
        return str(e)


def probe_replicas(replicas: list[Replica], timeout: float) -> list[ReplicaState]:
    """Each replica's APIs and /ping in parallel; those that do not answer Healthy start out."""
    states = [ReplicaState(r, r.api(timeout=timeout)) for r in replicas]
    with ThreadPoolExecutor(min(16, len(states)), thread_name_prefix="probe") as pool:
        answers = list(pool.map(ping_state, states))
    for state, why in zip(states, answers, strict=True):
        state.healthy, state.why = why is None, why
    return states


def all_out(states: list[ReplicaState], what: str | None) -> ServerUnavailable:
    """The error when no replica is in: `what` and each replica's reason (None: one replica's own
    reason alone); KeyRefused (configuration, exit 2) when every one is out for refusing our credentials."""
    kind = KeyRefused if all(s.key_refused for s in states) else ServerUnavailable
    if what is None:
        return kind(str(states[0].why))
    return kind(f"{what} ({'; '.join(f'{s.replica.name}: {s.why}' for s in states)})")


def healthy_servers(states: list[ReplicaState], source: str) -> list[TorchServe]:
    """The servers of the replicas that are in; the all-out error when none is."""
    servers = [s.server for s in states if s.healthy]
    if not servers:  # one server: its own reason says it all
        raise all_out(states, None if len(states) == 1 else f"no replica of {source} answers")
    return servers


class _Abort(threading.Event):
    """The run's abort: setting it wakes every thread waiting for a replica."""

    def __init__(self, dispatcher: "Dispatcher"):
        super().__init__()
        self._dispatcher = dispatcher

    def set(self) -> None:
        super().set()
        with self._dispatcher.changed:
            self._dispatcher.changed.notify_all()


class Dispatcher:
    """Sends one run's files over the replicas (one or many alike), each file until it has its row.

    A file is read and prepared once, then sent to the healthy replica with the fewest requests in
    flight and room. Retry says how often and how fast a transient answer is tried again. A timeout
    or a cut connection takes its replica out at once (its other requests finish or time out there)
    and the file goes elsewhere; a 5xx answer is tried once on each other healthy replica before it
    is the image's error, and `retry.take_out_after` 5xx answers in a row take a replica out.
    Replicas that are out are probed every `probe_interval` s with `admit` (the start's checks) and
    put back when it passes; with every replica out for `grace` s the run stops (ServerUnavailable).
    """

    def __init__(self, states: list[ReplicaState], per_replica: int, retry: Retry, *,
                 prepare: Callable[[bytes], tuple[bytes, str]], max_bytes: int, model: str,
                 admit: Callable[[ReplicaState], str | None] = ping_state,
                 probe_interval: float = PROBE_INTERVAL_S, grace: float = DEFAULT_GRACE_S):
        self.states, self.per_replica, self.retry = states, per_replica, retry
        self.prepare, self.max_bytes, self.model = prepare, max_bytes, model
        self.admit, self.probe_interval, self.grace = admit, probe_interval, grace
        self.changed = threading.Condition()
        self.abort = _Abort(self)
        self._all_out_since = None if any(s.healthy for s in states) else time.monotonic()
        self._prober = threading.Thread(target=self._probe_loop, name="replica-probe", daemon=True)
        self._prober.start()

    def close(self) -> None:
        """Stop the probe thread and close every replica's sessions."""
        self.abort.set()
        self._prober.join(timeout=5 + self.probe_interval)
        for state in self.states:
            state.server.close()

    def classify(self, path: Path, rel: str) -> tuple[dict, str | None] | None:
        """One file -> (its row, naming the replica that answered; failure reason or None); None when
        the run stopped first."""
        row = {"path": rel, "model": self.model}
        started = time.perf_counter()
        try:
            body, content_type = self.prepare(read_image(path, self.max_bytes))
        except NotSent as e:
            return error_row(row, str(e), None), e.reason
        except BadImage as e:  # refused here by the server's own check: its message, code, and time taken
            row["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
            return error_row(row, e.message, e.code), f"http {e.code}"
        # attempt: retries spent (transient answers, no answer); avoid: replicas this file had trouble
        # with (sent elsewhere while another is in); refused_by: replicas that gave it a 5xx
        attempt, avoid, refused_by, last = 0, set(), set(), None
        while not self.abort.is_set():
            state = self._acquire(avoid=avoid)
            if state is None:
                break
            try:
                answer = state.sender.send(body, content_type, row)
            except KeyRefused as e:  # configuration, not availability: said so if every replica is out for it
                self._take_out(state, str(e), key_refused=True)
                continue
            except ServerUnavailable as e:  # model or workers gone there: its fault, not the file's
                self._take_out(state, str(e))
                continue
            finally:
                self._release(state)
            avoid.add(state.replica.name)
            if answer.row is None:  # no answer: a hanging or dead replica; the file goes elsewhere
                self._take_out(state, f"{answer.reason} ({answer.error})")
                last = (error_row({**row, "replica": state.replica.name}, answer.error, None), answer.reason)
            else:
                done = self._answered(state, answer, refused_by)
                if done is not None:
                    return done
                last = (answer.row, answer.reason)
                if answer.status not in self.retry.statuses:
                    continue  # a 5xx moves to a replica that has not refused it: no retry spent
                if answer.status == 503 and not self.retry.allows(attempt) and self._no_ready_worker(state):
                    continue  # its replica is out now; the file goes elsewhere, or waits for it
            if not self.retry.allows(attempt):
                return last
            if answer.status in self.retry.statuses:
                self.abort.wait(self.retry.delay(attempt))
            attempt += 1
        return None

    def _answered(self, state: ReplicaState, answer: Answer, refused_by: set) -> tuple[dict, str | None] | None:
        """Account for an answer; the final (row, reason), or None to send the file again."""
        answer.row["replica"] = state.replica.name
        status = answer.status or 0
        with self.changed:
            if state.healthy:  # an answer from a replica that is in: the fleet is not all out
                self._all_out_since = None
            # 502/504: the front answering for a server behind it that is gone; 503/507 are busy
            server_error = status >= 500 and status not in self.retry.busy
            state.server_errors = state.server_errors + 1 if server_error else 0
            if state.server_errors >= self.retry.take_out_after:
                self._take_out_locked(state, f"{state.server_errors} server errors in a row "
                                             f"(last: {answer.row.get('error')})")
            if status in self.retry.statuses:
                return None
            if server_error:
                refused_by.add(state.replica.name)
                if any(s.healthy and s.replica.name not in refused_by for s in self.states):
                    return None  # another replica may answer it: a replica's fault is not the image's
            state.files += 1
            state.errors += answer.row.get("status") != "ok"
        return answer.row, answer.reason

    def _no_ready_worker(self, state: ReplicaState) -> bool:
        """After a last 503 (outside the lock: it asks the management API): True, and the replica
        taken out, when its version has no READY worker, so every request there would get 503."""
        try:
            state.sender.check_workers_after_503()
        except ServerUnavailable as e:
            self._take_out(state, str(e))
            return True
        return False

    def _acquire(self, avoid: set) -> ReplicaState | None:
        """The healthy replica with the fewest requests in flight and room (one not in `avoid` when
        there is one); waits while there is none; ServerUnavailable when all stay out past the grace."""
        with self.changed:
            while not self.abort.is_set():
                room = [s for s in self.states if s.healthy and s.in_flight < self.per_replica]
                room = [s for s in room if s.replica.name not in avoid] or room
                if room:
                    state = min(room, key=lambda s: (s.in_flight, s.sent))
                    state.in_flight += 1
                    state.sent += 1
                    return state
                if (self._all_out_since is not None and not any(s.healthy for s in self.states)
                        and time.monotonic() - self._all_out_since > self.grace):
                    raise all_out(self.states, f"no replica answered for {self.grace:g}s")
                self.changed.wait(0.2)
        return None

    def _release(self, state: ReplicaState) -> None:
        with self.changed:
            state.in_flight -= 1
            self.changed.notify_all()

    def _take_out(self, state: ReplicaState, why: str, key_refused: bool = False) -> None:
        with self.changed:
            self._take_out_locked(state, why)
            state.key_refused = state.key_refused or key_refused

    def _take_out_locked(self, state: ReplicaState, why: str) -> None:
        """Send nothing more there (files waiting to retry go elsewhere); the probe brings it back."""
        if state.healthy:
            state.healthy, state.why = False, " ".join(why.split())
            state.out_why = state.why
            state.taken_out += 1
            # a replica that passes the probe but fails again (every inference a 500) waits longer each time
            state.probe_after = time.monotonic() + self.probe_interval * (2 ** min(state.taken_out - 1, 5) - 1)
            if not any(s.healthy for s in self.states) and self._all_out_since is None:
                # kept while replicas come back and fail again before answering: the grace runs out
                self._all_out_since = time.monotonic()
        self.changed.notify_all()

    def _probe_loop(self) -> None:
        while not self.abort.wait(self.probe_interval):
            for state in [s for s in self.states if not s.healthy and time.monotonic() >= s.probe_after]:
                with self.changed:  # a hanging replica comes back only once its last requests have left
                    if state.in_flight:
                        continue
                try:
                    why = self.admit(state)
                except Exception as e:  # noqa: BLE001 - this thread must live on: the replica stays out
                    why = f"probe failed: {type(e).__name__}: {e}"
                with self.changed:
                    if why is None and not self.abort.is_set():
                        state.healthy, state.server_errors, state.key_refused = True, 0, False
                        self.changed.notify_all()
                    elif why is not None:
                        state.why = " ".join(why.split())  # what keeps it out now

    def summary(self, elapsed: float) -> list[str]:
        """One line per replica: files, images/s, errors, and how often it was taken out (why)."""
        lines = []
        for s in self.states:
            out = f"; taken out {s.taken_out}x, last: {s.out_why}" if s.taken_out else ""
            out += "" if s.healthy else (f"; out at the end: {s.why}" if s.taken_out else f"; never in: {s.why}")
            lines.append(f"replica {s.replica.name}: files {s.files}, {s.files / max(elapsed, 1e-9):.1f} "
                         f"images/s, errors {s.errors}{out}")
        return lines
