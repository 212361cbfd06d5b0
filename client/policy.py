"""What the dispatcher does with one attempt's outcome, as data: the retry policy (an immutable object,
as urllib3's Retry) and `decide`, one pure function of the outcome and the replica's state, so that
the loop that sends only applies the decision and a table of cases tests the policy (tests/test_policy.py).

urllib3's own Retry is not used: it counts and backs off requests to one host inside one connection
pool, where this policy spans replicas (move a file elsewhere, take a replica out, never send a file
back to a replica that failed it) and counts failures per replica as well as per file.
"""
from __future__ import annotations

import enum
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Retry:
    """How a file is tried again, declared once per run.

    `total` more attempts after the first, over every replica; a transient status waits
    backoff * 2**attempt seconds (at most max_backoff, jittered by +-25 %) before the next;
    `take_out_after` failed answers in a row (non-transient 5xx, or a 200 that is not an answer)
    take a replica out of the run.
    """

    total: int = 3
    backoff: float = 0.25
    max_backoff: float = 8.0
    statuses: frozenset[int] = frozenset({429, 502, 503, 504, 507})  # tried again after a backoff
    busy: frozenset[int] = frozenset({429, 503, 507})  # too many at once, queue full, out of memory: the server is there
    take_out_after: int = 5

    def allows(self, attempt: int) -> bool:
        """Whether attempt number `attempt` (from 0) may be followed by another."""
        return attempt < self.total

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retrying after attempt number `attempt`."""
        return min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.75, 1.25)

    def asks_workers(self, outcome: "Outcome", attempt: int) -> bool:
        """Whether `decide` needs to know if the version has a READY worker: after the last 503 a
        version without one is the replica's fault (every request there gets 503), not the file's."""
        return outcome.kind is Kind.ANSWER and outcome.status == 503 and not self.allows(attempt)


class Kind(enum.Enum):
    """What one attempt on one replica gave."""

    ANSWER = "answer"  # an HTTP answer the client could read: a row, ok or not (status says which)
    BAD_ANSWER = "bad answer"  # a 200 whose body is not the handler's answer (not JSON, wrong shape)
    NO_ANSWER = "no answer"  # a timeout, a refused or cut connection
    KEY_REFUSED = "key refused"  # the replica refused our credentials: configuration, not availability
    UNAVAILABLE = "unavailable"  # the model or its workers are gone there


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    status: int | None = None  # the HTTP status of an ANSWER or BAD_ANSWER
    why: str = ""  # for a take-out's reason: the error the replica gave

    @property
    def answered(self) -> bool:
        """The replica answered (well or with nonsense): it is up, whatever it said."""
        return self.kind in (Kind.ANSWER, Kind.BAD_ANSWER)


class Action(enum.Enum):
    DONE = "done"  # the row is the file's: write it
    RETRY = "retry"  # send it again (another replica first), spending one of Retry.total
    MOVE = "move"  # send it to another replica now; the replica's fault costs the file no retry


@dataclass(frozen=True)
class Decision:
    action: Action
    failures: int  # the replica's failed answers in a row after this one
    take_out: str | None = None  # why the replica leaves the run; None: it stays in
    exclude: bool = False  # never send this file to this replica again (it failed it)
    back_off: bool = False  # wait Retry.delay(attempt) before the retry


def decide(outcome: Outcome, *, attempt: int, failures: int, others: bool, retry: Retry,
           no_worker: str | None = None) -> Decision:
    """The decision for one attempt.

    attempt: retries this file spent so far; failures: the replica's failed answers in a row before
    this one; others: another replica that is in and has not failed this file exists;
    no_worker: after the last 503 (Retry.asks_workers), why the version has no READY worker, if so.
    """
    kind, status = outcome.kind, outcome.status or 0
    if kind in (Kind.KEY_REFUSED, Kind.UNAVAILABLE):
        return Decision(Action.MOVE, failures, take_out=outcome.why)
    if kind is Kind.NO_ANSWER:  # hanging or dead: out at once; its other requests finish or time out there
        return Decision(Action.RETRY if retry.allows(attempt) else Action.DONE, failures, take_out=outcome.why)
    failed = kind is Kind.BAD_ANSWER or (status >= 500 and status not in retry.busy)
    count = failures + 1 if failed else 0
    take_out = (f"{count} failed answers in a row (last: {outcome.why})"
                if failed and count >= retry.take_out_after else None)
    if kind is Kind.ANSWER and status in retry.statuses:
        if retry.allows(attempt):
            return Decision(Action.RETRY, count, take_out, back_off=True)
        if status == 503 and no_worker:
            return Decision(Action.MOVE, count, take_out or no_worker)
        return Decision(Action.DONE, count, take_out)
    if failed:  # a replica's fault, not the image's: each other replica may still answer it
        return Decision(Action.MOVE if others else Action.DONE, count, take_out, exclude=True)
    return Decision(Action.DONE, count)
