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
from client.policy import Action, Decision, Kind, Outcome, Retry, decide
from client.sending import Classifier
from core.errors import KeyRefused, ServerUnavailable
from core.files import NotSent, read_image
from core.torchserve import TorchServe

PROBE_INTERVAL_S = 1.0  # how often a replica that was taken out is asked /ping and checked
DEFAULT_GRACE_S = 30.0  # with every replica out this long, the run stops (exit 3, rows kept)
NOBODY = object()  # _acquire: no replica that may take the file is in


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
    failures: int = 0  # failed answers in a row (non-transient 5xx, a 200 that is no answer)
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
    flight and room; what follows each answer is client/policy.py's decide(): a transient answer is
    tried again after a backoff, a timeout or a cut connection takes its replica out at once (its other
    requests finish or time out there) and the file goes elsewhere, a 5xx or a 200 that is no answer
    is tried once on each other healthy replica (never again on one that failed it) before it is the
    image's error, and `retry.take_out_after` such failures in a row take a replica out.
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
        the run stopped first. Each attempt's outcome goes through the policy (client/policy.py)."""
        row = {"path": rel, "model": self.model}
        started = time.perf_counter()
        try:
            body, content_type = self.prepare(read_image(path, self.max_bytes))
        except NotSent as e:
            return error_row(row, str(e), None), e.reason
        except BadImage as e:  # refused here by the server's own check: its message, code, and time taken
            row["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
            return error_row(row, e.message, e.code), f"http {e.code}"
        # attempt: retries spent; avoid: replicas tried (another first, if one is in); exclude: replicas
        # that failed the file (never again); last: the latest (row, reason), the file's if nothing else comes
        attempt, avoid, exclude, last, answered_by = 0, set(), set(), None, None
        while not self.abort.is_set():
            state = self._acquire(avoid, exclude)
            if state is None:
                break
            if state is NOBODY:  # every replica that may take it failed it or is out: its last row is its own
                if self.abort.is_set():
                    break
                self._count(answered_by, last)
                return last
            outcome, answer = self._send(state, body, content_type, row)
            last = answer or last
            if outcome.answered:
                answered_by = state
            no_worker = state.sender.no_ready_worker() if self.retry.asks_workers(outcome, attempt) else None
            decision = self._apply(state, outcome, attempt, exclude, no_worker)
            avoid.add(state.replica.name)
            if decision.exclude:
                exclude.add(state.replica.name)
            if decision.action is Action.DONE:
                self._count(state if outcome.answered else None, last)
                return last
            if decision.action is Action.RETRY:
                if decision.back_off:
                    self.abort.wait(self.retry.delay(attempt))
                attempt += 1
        return None

    def _send(self, state: ReplicaState, body: bytes, content_type: str,
              row: dict) -> tuple[Outcome, tuple[dict, str | None] | None]:
        """One attempt on `state`'s replica -> its outcome and, when there is one, the (row, reason) it gives."""
        try:
            answer = state.sender.send(body, content_type, row)
        except KeyRefused as e:  # configuration, not availability: said so if every replica is out for it
            return Outcome(Kind.KEY_REFUSED, why=str(e)), None
        except ServerUnavailable as e:  # model or workers gone there: its fault, not the file's
            return Outcome(Kind.UNAVAILABLE, why=str(e)), None
        finally:
            self._release(state)
        if answer.row is None:  # no answer: a hanging or dead replica
            return answer.outcome, (error_row({**row, "replica": state.replica.name}, answer.error, None),
                                    answer.reason)
        answer.row["replica"] = state.replica.name
        return answer.outcome, (answer.row, answer.reason)

    def _count(self, state: ReplicaState | None, last: tuple[dict, str | None] | None) -> None:
        """The file's row is `last`, answered by `state` (None: by no replica): count it there."""
        if state is not None and last is not None:
            with self.changed:
                state.files += 1
                state.errors += last[0].get("status") != "ok"

    def _apply(self, state: ReplicaState, outcome: Outcome, attempt: int, exclude: set,
               no_worker: str | None) -> Decision:
        """Decide (a pure function of the outcome and the state, under the lock) and apply it to the replica."""
        with self.changed:
            others = any(s.healthy and s is not state and s.replica.name not in exclude for s in self.states)
            decision = decide(outcome, attempt=attempt, failures=state.failures, others=others,
                              retry=self.retry, no_worker=no_worker)
            if outcome.answered:
                state.failures = decision.failures
                if state.healthy:  # an answer from a replica that is in: the fleet is not all out
                    self._all_out_since = None
            if decision.take_out:
                self._take_out_locked(state, decision.take_out)
                state.key_refused = state.key_refused or outcome.kind is Kind.KEY_REFUSED
        return decision

    def _acquire(self, avoid: set, exclude: set) -> ReplicaState | None:
        """The healthy replica with the fewest requests in flight and room, never one in `exclude` and
        one not in `avoid` when there is one; waits while there is none. None when the run stops,
        NOBODY when every replica not in `exclude` is out; ServerUnavailable when all stay out past the grace."""
        with self.changed:
            while not self.abort.is_set():
                allowed = [s for s in self.states if s.replica.name not in exclude]
                if exclude and not any(s.healthy for s in allowed):
                    return NOBODY
                room = [s for s in allowed if s.healthy and s.in_flight < self.per_replica]
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
                        state.healthy, state.failures, state.key_refused = True, 0, False
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
