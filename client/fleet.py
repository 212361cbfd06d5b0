"""The fleet file: the TorchServe replicas a command spreads its work over, each with its URLs and keys.

YAML (or JSON, which is YAML too), as deploy/kubernetes/make_fleet.py writes it:

    replicas:
      - name: ts-0                                  # unique; result rows name the replica that answered
        inference_url: http://ts-0.ts.ml.svc.cluster.local:8080
        management_url: http://ts-0.ts.ml.svc.cluster.local:8081   # default: inference port + 1
        key_file: /keys/ts-0/key_file.json          # that replica's key file; relative to the fleet file
                                                    # (none: no keys, never the local key_file.json)

Every mistake is a UserError naming the file and the entry at fault.

A run over the fleet (FleetSender) sends each file to the healthy replica with the fewest
requests in flight that has room; a replica that stops answering is taken out, probed back in,
and the files it held are sent again elsewhere, so every file still gets exactly one row.
"""
from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol
from urllib.parse import urlsplit

import yaml

from client.errors import Refused, ServerUnavailable, UserError
from client.torchserve import Keys, TorchServe, management_url_for, ping

ENTRY_KEYS = {"name", "inference_url", "management_url", "key_file"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


@dataclass(frozen=True)
class Replica:
    """One TorchServe of a fleet."""

    name: str
    inference_url: str
    management_url: str
    key_file: Path | None

    def api(self, timeout: float = 10.0) -> TorchServe:
        """This replica's management and inference APIs, with its own keys (none without a key_file)."""
        keys = Keys(self.key_file, self.management_url, default_file=False)  # never the local server's keys
        return TorchServe(self.inference_url, self.management_url, keys, timeout=timeout)


def _url(value: object, where: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: {key} must be a URL such as http://HOST:PORT, got {value!r}")
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{where}: {key} must be an http(s) URL with a host, got {value!r}")
    try:
        parts.port
    except ValueError:
        raise UserError(f"{where}: {key} has an invalid port: {value!r}") from None
    if parts.path.strip("/") or parts.query:
        raise UserError(f"{where}: {key} must be the server's base URL, without a path: {value!r}")
    return value.strip().rstrip("/")


def parse_fleet(data: object, source: str, base: Path) -> list[Replica]:
    """Replicas from a parsed fleet file; `source` names the file in errors, `base` anchors key files."""
    if not isinstance(data, dict) or not isinstance(data.get("replicas"), list):
        raise UserError(f"{source}: expected a mapping with a list 'replicas:' of entries "
                        f"(name, inference_url, management_url, key_file)")
    if not data["replicas"]:
        raise UserError(f"{source}: 'replicas' is empty: a fleet needs at least one replica")
    replicas: list[Replica] = []
    for index, entry in enumerate(data["replicas"]):
        where = f"{source}: replicas[{index}]"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected a mapping, got {type(entry).__name__}")
        name = entry.get("name")
        if isinstance(name, str):
            where = f"{source}: replica '{name}' (replicas[{index}])"
        unknown = sorted(set(map(str, entry)) - ENTRY_KEYS)
        if unknown:
            raise UserError(f"{where}: unknown key(s) {unknown}; known: {sorted(ENTRY_KEYS)}")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise UserError(f"{where}: name must be letters, digits, '.', '_' or '-' (at most 63), "
                            f"got {name!r}")
        inference = _url(entry.get("inference_url"), where, "inference_url")
        management = (_url(entry["management_url"], where, "management_url") if entry.get("management_url")
                      else management_url_for(inference))
        key_file = entry.get("key_file")
        if key_file is not None and (not isinstance(key_file, str) or not key_file.strip()):
            raise UserError(f"{where}: key_file must be a path, got {key_file!r}")
        key_path = (base / Path(key_file).expanduser()) if key_file else None
        replicas.append(Replica(name, inference, management, key_path))
    for kind in ("name", "inference_url", "management_url"):
        seen: dict[str, int] = {}
        for index, replica in enumerate(replicas):
            value = getattr(replica, kind)
            if value in seen:
                raise UserError(f"{source}: replicas[{seen[value]}] and replicas[{index}] have the same "
                                f"{kind} {value!r}")
            seen[value] = index
    return replicas


def load_fleet(path: str | Path) -> list[Replica]:
    """Read and check a fleet file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise UserError(f"cannot read the fleet file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a fleet file (not UTF-8 text: byte {e.start} is "
                        f"{e.object[e.start]:#04x})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or e
        raise UserError(f"{path}{line}: not valid YAML or JSON ({problem})") from None
    return parse_fleet(data, str(path), path.parent)


class Sender(Protocol):
    """What FleetSender needs of one replica's classifier (client.sending.Classifier)."""

    abort: threading.Event

    def classify(self, path: Path, rel: str) -> tuple[dict, str | None] | None: ...


PROBE_INTERVAL_S = 1.0  # how often a replica that was taken out is asked /ping
ALL_DOWN_GRACE_S = 30.0  # with every replica out this long, the run stops (exit 2, rows kept)


@dataclass
class ReplicaState:
    """One replica during a run: its sender, what it holds, whether it is in, what it did."""

    replica: Replica
    server: TorchServe
    sender: Sender | None = None
    in_flight: int = 0
    sent: int = 0
    healthy: bool = True
    why: str | None = None  # why it was last taken out
    taken_out: int = 0
    files: int = 0
    errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def probe_replicas(replicas: list[Replica], timeout: float) -> list[ReplicaState]:
    """Each replica's APIs and /ping in parallel; those that do not answer Healthy start out."""
    states = [ReplicaState(r, r.api(timeout=timeout)) for r in replicas]
    with ThreadPoolExecutor(min(16, len(states)), thread_name_prefix="probe") as pool:
        answers = list(pool.map(_ping, states))
    for state, why in zip(states, answers, strict=True):
        state.healthy, state.why = why is None, why
    return states


def _ping(state: ReplicaState) -> str | None:
    """/ping's answer; an unreadable key file too is a reason to keep the replica out, not a crash."""
    try:
        return ping(state.server.url, state.server.keys)
    except ServerUnavailable as e:
        return str(e)


class _Abort(threading.Event):
    """The run's abort: setting it stops every replica's sender too."""

    def __init__(self, fleet: "FleetSender"):
        super().__init__()
        self._fleet = fleet

    def set(self) -> None:
        super().set()
        for state in self._fleet.states:
            if state.sender is not None:
                state.sender.abort.set()
        with self._fleet.changed:
            self._fleet.changed.notify_all()


class FleetSender:
    """Spreads one run's files over the replicas; the same classify() as one replica's Classifier."""

    def __init__(self, states: list[ReplicaState], per_replica: int, *,
                 probe_interval: float = PROBE_INTERVAL_S, grace: float = ALL_DOWN_GRACE_S,
                 probe: Callable[[ReplicaState], str | None] | None = None):
        self.states, self.per_replica = states, per_replica
        self.probe_interval, self.grace = probe_interval, grace
        self.probe = probe or _ping  # None: put it back in
        self.changed = threading.Condition()
        self.abort = _Abort(self)
        self._all_out_since = None if any(s.healthy for s in states) else time.monotonic()
        self._prober = threading.Thread(target=self._probe_loop, name="fleet-probe", daemon=True)
        self._prober.start()

    def classify(self, path: Path, rel: str) -> tuple[dict, str | None] | None:
        """One file -> (row naming its replica, failure reason); sent again elsewhere if its replica fails."""
        timeouts = 0
        while not self.abort.is_set():
            state = self._acquire()
            if state is None:
                return None
            try:
                result = state.sender.classify(path, rel)
            except ServerUnavailable as e:  # unreachable, key refused, model or workers gone there
                self._take_out(state, str(e))
                continue
            finally:
                self._release(state)
            if result is None:  # its replica was taken out while the file was there, or the run stopped
                continue
            row, reason = result
            if reason == "timeout" and timeouts < len(self.states) - 1:
                timeouts += 1  # a replica that stops answering holds requests without refusing them
                self._take_out(state, row.get("error") or "timeout")
                continue
            with self.changed:  # a real answer: only now is the fleet no longer all out
                self._all_out_since = None
            row["replica"] = state.replica.name
            with state.lock:
                state.files += 1
                state.errors += row.get("status") != "ok"
            return row, reason
        return None

    def _acquire(self) -> ReplicaState | None:
        """The healthy replica with the fewest requests in flight and room; waits while there is none."""
        with self.changed:
            while not self.abort.is_set():
                room = [s for s in self.states if s.healthy and s.in_flight < self.per_replica]
                if room:
                    state = min(room, key=lambda s: (s.in_flight, s.sent))
                    state.in_flight += 1
                    state.sent += 1
                    return state
                if (self._all_out_since is not None and not any(s.healthy for s in self.states)
                        and time.monotonic() - self._all_out_since > self.grace):
                    reasons = "; ".join(f"{s.replica.name}: {s.why}" for s in self.states)
                    raise ServerUnavailable(f"no replica of the fleet answered for {self.grace:g}s "
                                            f"({reasons})")
                self.changed.wait(0.2)
        return None

    def _release(self, state: ReplicaState) -> None:
        with self.changed:
            state.in_flight -= 1
            self.changed.notify_all()

    def _take_out(self, state: ReplicaState, why: str) -> None:
        """Send nothing more there and stop its retries; the probe brings it back."""
        with self.changed:
            if state.healthy:
                state.healthy, state.why = False, why
                state.taken_out += 1
                state.sender.abort.set()  # its other files stop retrying there and go elsewhere
                if not any(s.healthy for s in self.states) and self._all_out_since is None:
                    # kept while replicas come back and fail again before answering: the grace runs out
                    self._all_out_since = time.monotonic()
            self.changed.notify_all()

    def _probe_loop(self) -> None:
        while not self.abort.wait(self.probe_interval):
            for state in [s for s in self.states if not s.healthy]:
                with self.changed:  # wait for its last requests to leave before its abort is cleared
                    if state.in_flight:
                        continue
                try:
                    why = self.probe(state)
                except Exception as e:  # noqa: BLE001 - this thread must live on: the replica stays out
                    why = f"probe failed: {type(e).__name__}: {e}"
                if why is None and not self.abort.is_set():
                    with self.changed:
                        state.sender.abort.clear()
                        state.healthy = True
                        self.changed.notify_all()

    def summary(self, elapsed: float) -> list[str]:
        """One line per replica: files, images/s, errors, and how often it was taken out (why)."""
        lines = []
        for s in self.states:
            out = f"; taken out {s.taken_out}x, last: {s.why}" if s.taken_out else ""
            out += "" if s.healthy else ("; out at the end" if s.taken_out else f"; never in: {s.why}")
            lines.append(f"replica {s.replica.name}: files {s.files}, {s.files / max(elapsed, 1e-9):.1f} "
                         f"images/s, errors {s.errors}{out}")
        return lines


def first_healthy(states: list[ReplicaState], source: str) -> TorchServe:
    """A replica that answered /ping (the run's model checks ask it); ServerUnavailable when none did."""
    for state in states:
        if state.healthy:
            return state.server
    raise ServerUnavailable(f"no replica of {source} answers: "
                            + "; ".join(f"{s.replica.name}: {s.why}" for s in states))


def start_fleet(states: list[ReplicaState], per_replica: int, make_sender: Callable[[TorchServe], Sender],
                check: Callable[[TorchServe], None], source: str,
                ready: Callable[[TorchServe], None] | None = None) -> FleetSender:
    """A sender per replica; one that fails `check` (ServerUnavailable) starts out and is probed back in.

    A replica is put back in only when /ping answers and `ready` (default: `check`) raises nothing:
    one that answers /ping but cannot serve the model would fail again at once.
    """
    for state in states:
        state.sender = make_sender(state.server)
        if state.healthy:
            try:
                check(state.server)
            except ServerUnavailable as e:
                state.healthy, state.why = False, str(e)
    first_healthy(states, source)
    ready = ready or check

    def probe(state: ReplicaState) -> str | None:
        why = _ping(state)
        if why is not None:
            return why
        try:
            ready(state.server)
        except (ServerUnavailable, Refused) as e:
            return str(e)
        return None

    return FleetSender(states, per_replica, probe=probe)
