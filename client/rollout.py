"""The rollout, over one server or a fleet alike (a single server is a fleet of one): register and
smoke-test the new version on every replica before any default changes, then switch the default replica
by replica, then retire the old version on every replica (the drains run side by side). A failure before
the last switch switches back the replicas already switched (retried until --rollback-deadline, each
read back) and removes the new version everywhere; what each replica ends on is read and printed.

Ctrl-C too ends on a state read back and printed as it is. Before the last switch it rolls back like
a failure, once the change in flight has been answered: TorchServe carries out a request whose client
has gone (a registration abandoned mid-way appears after a rollback that looked too early). After
the switch it stops the drains before any further request: the old version stays registered where
it was not yet removed, and the rollout says where.
"""
from __future__ import annotations

import argparse
import copy
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from client.versions import (
    API_ERRORS,
    Member,
    locate_mar,
    read_manifest,
    read_state,
    register,
    say,
    snapshots,
    unregister,
    version_skew,
)
from core.errors import Refused, RolledBack, ServerUnavailable, UserError
from core.files import IMAGE_EXTENSIONS, iter_files, true_label_of
from core.http import server_message
from core.torchserve import TorchServe


def list_smoke_images(directory: str, min_accuracy: float | None) -> list[tuple[bytes, str, str | None]]:
    """(bytes, relative path, class folder or None) of the smoke set; read and checked before anything
    changes, so that a file that cannot be read fails the command, not a rollout half done."""
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"--smoke-dir is not a folder: {directory}")
    images = []
    for path in iter_files(root, set(IMAGE_EXTENSIONS)):
        rel = path.relative_to(root).as_posix()
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UserError(f"--smoke-dir: cannot read {path}: {e.strerror or e}") from None
        images.append((data, rel, true_label_of(rel)))
    if not images:
        raise UserError(f"--smoke-dir has no images ({', '.join(IMAGE_EXTENSIONS)}): {directory}")
    if min_accuracy is not None and not any(label for _, _, label in images):
        raise UserError(f"--min-accuracy needs images in class folders (DIR/<label>/...) under {directory}, "
                        f"and it has none")
    return images


def classify_smoke(client: TorchServe, name: str, version: str, images: list) -> list:
    """(relative path, predicted label or None, error or None) of every smoke image on NAME/VERSION."""
    def one(item: tuple[bytes, str, str | None]) -> tuple[str, str | None, str | None]:
        data, rel, _ = item
        try:
            response = client.predict(name, version, data)
        except requests.RequestException as e:
            return rel, None, f"{type(e).__name__}"
        if response.status_code != 200:
            return rel, None, server_message(response)
        try:
            return rel, response.json()[0]["label"], None
        except (ValueError, LookupError, TypeError):
            return rel, None, f"unexpected answer {response.text[:100]!r}"

    with ThreadPoolExecutor(min(16, len(images))) as pool:  # enough in flight to fill the batches
        return list(pool.map(one, images))


def smoke_accuracy(images: list, results: list) -> float | None:
    """Share of right labels over the images in a class folder (a failed one counts as wrong); images
    directly in the smoke folder have no truth and are left out; None when no image has a class folder."""
    pairs = [(label, predicted) for (_, _, label), (_, predicted, _) in zip(images, results) if label]
    if not pairs:
        return None
    return sum(t == p for t, p in pairs) / len(pairs)


def labelled(images: list) -> int:
    """How many smoke images have a class folder (the ones the accuracy is measured on)."""
    return sum(1 for _, _, label in images if label)


def smoke_test(client: TorchServe, name: str, version: str, images: list, min_accuracy: float | None,
               baseline: tuple[str, float] | None = None, max_drop: float = 1.0) -> str:
    """Send every image to NAME/VERSION; Refused unless all succeed, accuracy >= min_accuracy and it
    is at most max_drop below the baseline (old version, its accuracy on the same images)."""
    results = classify_smoke(client, name, version, images)
    failed = [(rel, error) for rel, _, error in results if error]
    if failed:
        raise Refused(f"smoke test: {len(failed)}/{len(images)} images failed on {name} {version} "
                      f"(first: {failed[0][0]}: {failed[0][1]})")
    summary = f"{len(images)}/{len(images)} smoke images ok"
    accuracy = smoke_accuracy(images, results)
    if accuracy is not None:
        summary += f", accuracy {accuracy:.4f} on the {labelled(images)} in class folders"
        if min_accuracy is not None and accuracy < min_accuracy:
            raise Refused(f"smoke test: accuracy {accuracy:.4f} of {name} {version} on {len(images)} "
                          f"images is below --min-accuracy {min_accuracy:g}")
        if baseline is not None:
            old, old_accuracy = baseline
            summary += f" ({name} {old}: {old_accuracy:.4f})"
            if accuracy < old_accuracy - max_drop - 1e-9:  # 1e-9: a drop of exactly max_drop passes
                raise Refused(f"smoke test: accuracy {accuracy:.4f} of {name} {version} is "
                              f"{old_accuracy - accuracy:.4f} below {name} {old}'s {old_accuracy:.4f} on "
                              f"the same {labelled(images)} images (--max-accuracy-drop {max_drop:g}; pass "
                              f"--max-accuracy-drop 1 to roll out a worse model on purpose)")
    return summary


def report_end_states(members: list[Member], name: str) -> dict[str, tuple[str | None, list[str]] | None]:
    """Print what every replica ends on, read back now; {replica: (default, versions), None if unreadable}."""
    states: dict[str, tuple[str | None, list[str]] | None] = {}
    for m in members:
        try:
            states[m.name] = default, versions = read_state(m.server, name)
            state = (f"{name} {default} is the default (registered: {', '.join(versions)})" if default
                     else f"{name} not registered")
        except API_ERRORS as e:
            states[m.name], state = None, f"could not be read ({e})"
        say(f"rollout: {m.name} ends on: {state}")
    return states


def switch_back(m: Member, name: str, version: str, old: str, deadline: float) -> tuple[bool, str | None]:
    """Make `old` the default again where `version` is, read back, retried until `deadline` (a frozen
    or restarting replica may answer later); (whether it was switched, the problem left or None)."""
    why = None
    while True:
        try:
            if m.server.default_version(name) != version:
                return False, None
            m.server.call("PUT", f"/models/{name}/{old}/set-default", f"set-default {name} {old}")
            if m.server.default_version(name) == old:  # read back: the only proof
                say(f"rollout: {m.name}: {name} {old} is the default again")
                return True, None
            why = f"{name} {old} was set as the default but the replica does not say so"
        except API_ERRORS as e:
            why = str(e)
        if time.monotonic() >= deadline:
            return False, f"switching back failed until the deadline: {why}"
        time.sleep(1.0)


def roll_back(members: list[Member], name: str, version: str, old: str | None,
              args: argparse.Namespace) -> tuple[bool, str]:
    """Switch every replica whose default is `version` back to `old` first (all clients see the old
    version again), then remove `version` everywhere; (complete, a summary of where replicas end,
    as read back from each)."""
    deadline = time.monotonic() + args.rollback_deadline
    switched, problems = set(), {}
    if old:
        with ThreadPoolExecutor(len(members)) as pool:
            for m, (done, problem) in zip(members, pool.map(
                    lambda m: switch_back(m, name, version, old, deadline), members)):
                if done:
                    switched.add(m.name)
                if problem:
                    problems[m.name] = problem

    def remove(m: Member) -> None:
        if m.name in problems:
            return  # the new version may still be its default: TorchServe would refuse, leave it
        try:
            if not any(v["modelVersion"] == version for v in m.server.versions(name)):
                return
            if m.name in switched:  # it served clients: drain it like any retired version
                unregister(m.server, name, version, args.drain_seconds, args.drain_timeout, m.log_dir,
                           label=f"{m.name}: ")
            else:  # never the default: only the smoke test ever called it
                m.server.call("DELETE", f"/models/{name}/{version}", f"unregister {name} {version}")
        except API_ERRORS as e:
            problems[m.name] = f"removing {name} {version} failed: {e}"

    with ThreadPoolExecutor(len(members)) as pool:
        list(pool.map(remove, members))
    states = report_end_states(members, name)
    unread = [r for r, state in states.items() if state is None]
    if not problems and not unread and all(state[0] == old and version not in state[1]
                                           for state in states.values()):
        where = "every replica" if len(members) > 1 else members[0].name
        return True, ((f"{name} {old} is the default on {where}" if old else f"{name} is registered on "
                       f"no replica") + f", {version} removed")
    trouble = [f"{r}: {p}" for r, p in problems.items()] + [f"{r}: could not be read" for r in unread
                                                             if r not in problems]
    return False, (f"the rollback is INCOMPLETE ({'; '.join(trouble) or 'replicas differ'}): "
                   f"check with manage.py list")


class InFlight:
    """A change sent to one replica (register, set-default) on a thread of its own, so that Ctrl-C
    interrupts only the wait for its answer, never the request: the rollback then waits for that
    answer (TorchServe finishes what it was asked, whether or not its client is still there)."""

    def __init__(self, what: str, server: TorchServe, change: Callable[[], object]):
        self.what, self.timeout = what, float(getattr(server, "timeout", 60.0))  # the client's bound
        self.done, self.error = threading.Event(), None
        self.thread = threading.Thread(target=self._run, args=(change,), name=f"rollout: {what}", daemon=True)

    def start(self) -> None:
        """Send it (apart from the constructor: the caller holds it before anything is sent)."""
        self.thread.start()

    def _run(self, change: Callable[[], object]) -> None:
        try:
            change()
        except BaseException as e:  # noqa: BLE001 - raised again in the waiting thread
            self.error = e
        finally:
            self.done.set()

    def wait(self) -> None:
        """Until the server has answered; the change's error is raised here."""
        self.done.wait()
        if self.error is not None:
            raise self.error

    def settle(self) -> bool:
        """After an interrupt: wait (at most the client's --timeout for one more answer) until the
        server has answered; False if it has not (a second Ctrl-C stops the wait too)."""
        if self.done.is_set() or not self.thread.is_alive():  # answered, or never sent
            return True
        say(f"rollout: waiting up to {self.timeout:g}s for the answer to {self.what} (the server carries "
            f"it out all the same)")
        try:
            return self.done.wait(self.timeout)
        except KeyboardInterrupt:
            return False


class Stopped(Refused):
    """A request of the rollout not sent, because it was interrupted."""


def stoppable(server: TorchServe, stop: threading.Event) -> TorchServe:
    """The same replica, except that every request it is asked to send after `stop` is set fails
    (Stopped): a drain, which looks at the server every 0.1 s, ends before its unregister."""
    send = server.call
    clone = copy.copy(server)

    def call(*args, **kwargs):
        if stop.is_set():
            raise Stopped("not sent: the rollout was interrupted")
        return send(*args, **kwargs)

    clone.call = call  # every API method goes through `call`
    return clone


def check_replicas(members: list[Member], name: str, version: str, new_model: bool, mar: str) -> str | None:
    """The old default, the same on every replica; Refused (nothing changed) when it cannot go ahead."""
    snaps = snapshots(members, [name])
    unreadable = [s for s in snaps if s.error]
    if unreadable:
        raise ServerUnavailable(f"rollout: replica {unreadable[0].replica}: {unreadable[0].error} "
                                f"(nothing changed on any replica)")
    has = [s.replica for s in snaps
           if any(e["modelVersion"] == version for e in s.models.get(name, (None, []))[1])]
    if has:
        raise Refused(f"rollout: {name} version {version} is already registered on {', '.join(has)}; "
                      f"archive the new model under a new version (nothing changed)")
    skew = version_skew(snaps)
    defaults = {s.models.get(name, (None,))[0] for s in snaps}
    if len(defaults) > 1:
        raise Refused(f"rollout: {skew[0]}; bring every replica to one default first (manage.py "
                      f"set-default on each, or unregister) (nothing changed)")
    old = defaults.pop()
    if old is None and not new_model:
        served = sorted({m for s in snapshots(members) if not s.error for m in s.models})
        if served:
            where = "the server does" if len(members) == 1 else "the fleet does"
            raise Refused(f"rollout: {mar} is model {name}, which {where} not serve (it serves "
                          f"{', '.join(served)}); rebuild the archive with the served name, or pass "
                          f"--new-model to add {name} beside them (nothing changed)")
    return old


def rollout(members: list[Member], args: argparse.Namespace) -> str:
    """Register and smoke-test on every replica, then switch every default, then retire the old
    version everywhere; before the last switch, any failure rolls every replica back."""
    images = list_smoke_images(args.smoke_dir, args.min_accuracy) if args.smoke_dir else []
    mar = locate_mar(args.mar, args.model_store)  # its file name is what every replica's store must hold
    try:
        name, version = read_manifest(mar)
    except Refused as e:
        raise Refused(f"rollout: {e}; nothing was changed on any replica") from None
    old = check_replicas(members, name, version, args.new_model, mar.name)
    if old and images and not labelled(images) and args.max_accuracy_drop < 1:
        raise UserError(f"rollout: no smoke image is in a class folder, so {name} {version} cannot be "
                        f"compared with {old} (--max-accuracy-drop {args.max_accuracy_drop:g}): lay "
                        f"--smoke-dir out as DIR/<label>/..., or pass --max-accuracy-drop 1 (nothing changed)")
    workers = {}
    for m in members:  # each replica keeps the capacity it has
        entry = next(iter(m.server.describe(name, old)), {}) if old else {}
        workers[m.name] = args.workers or entry.get("minWorkers") or None
    baselines: dict[str, tuple[str, float] | None] = {m.name: None for m in members}
    if old and images and labelled(images):  # class folders: compare per replica
        for m in members:
            say(f"rollout: {m.name}: measuring {name} {old} on the {labelled(images)} smoke images in "
                f"class folders")
            baselines[m.name] = old, smoke_accuracy(images, classify_smoke(m.server, name, old, images))
    replicas = ", ".join(m.name for m in members)
    step, summaries, change = "", [], None
    try:
        for m in members:  # 1. the new version beside the old one, everywhere
            step = f"{m.name}: register {mar.name} ({name} {version})"
            say(f"rollout: {step} while {name} {old or '(none)'} serves")
            change = InFlight(step, m.server, lambda m=m: register(
                m.server, mar, workers[m.name], args.batch_size, args.max_batch_delay, m.log_dir))
            change.start()
            try:
                change.wait()
            except Refused as e:  # TorchServe's words for a missing or cut-short copy in its store
                if "Failed to save model" in str(e) or "Model not found" in str(e):
                    raise Refused(f"{e} ({m.name}'s model store must hold a complete copy of "
                                  f"{mar.name})") from None
                raise
            if images:
                step = f"{m.name}: smoke test of {name} {version}"
                summaries.append(smoke_test(m.server, name, version, images, args.min_accuracy,
                                            baselines[m.name], args.max_accuracy_drop))
                say(f"rollout: {m.name}: {summaries[-1]}")
        for m in members:  # 2. every replica passed: switch them one by one
            step = f"{m.name}: set-default {name} {version}"
            change = InFlight(step, m.server, lambda m=m: m.server.call(
                "PUT", f"/models/{name}/{version}/set-default", f"set-default {name} {version}"))
            change.start()
            change.wait()
            say(f"rollout: {m.name}: {name} {version} is the default")
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - whatever failed, undo, then report it
        interrupted = isinstance(e, KeyboardInterrupt)
        say(f"rollout: {'interrupted' if interrupted else 'failed'} at {step}; rolling back")
        # an unanswered change may still land: what is removed and read back must come after it
        unsettled = change is not None and not change.settle()
        complete, outcome = roll_back(members, name, version, old, args)
        if unsettled:
            complete, outcome = False, (f"{outcome}; but {change.what} was not answered within "
                                        f"{change.timeout:g}s, and the server may still carry it out: "
                                        f"check with manage.py list")
        if not isinstance(e, API_ERRORS):
            say(f"rollout: after {type(e).__name__}: {outcome}")
            raise
        reason = (str(e) if isinstance(e, (Refused, UserError, ServerUnavailable))
                  else f"{type(e).__name__}: {e}")
        done = "was rolled back" if complete else "could not be fully rolled back"
        raise RolledBack(f"rollout of {name} {version} failed at {step} and {done}: {reason}; "
                         f"{outcome}") from None
    smoke = f"smoke test passed on every replica ({len(images)} images)" if images else "no smoke set"
    stop = threading.Event()  # Ctrl-C from here on: no request is sent after it
    try:
        say(f"rollout: {name} {version} is the default on every replica ({replicas}; {smoke})")
        if old is None or args.keep_old:
            report_end_states(members, name)
            kept = f"; {name} {old} kept" if old else ""
            return f"rollout: {name} {old or '(none)'} -> {version} on {replicas_(members)}, {smoke}{kept}"
        return retire(members, name, old, version, args, smoke, stop)
    except KeyboardInterrupt:
        stop.set()
        states = report_end_states(members, name)
        left = left_after_switch(members, states, name, old, version)
        say(f"rollout: interrupted after the switch: {left}")
        raise


def left_after_switch(members: list[Member], states: dict, name: str, old: str | None, version: str) -> str:
    """What an interrupt after the switch leaves, from the states read back (report_end_states)."""
    def where(replicas: list[str]) -> str:
        return "every replica" if len(replicas) == len(members) > 1 else ", ".join(replicas)

    unread = [r for r, state in states.items() if state is None]
    on_new = [r for r, state in states.items() if state and state[0] == version]
    parts = [f"{name} {version} is the default on {where(on_new)}"] if on_new else []
    parts += [f"{r}: {name} {state[0]} is the default" for r, state in states.items()
              if state and state[0] != version]
    if old:
        kept = [r for r, state in states.items() if state and old in state[1]]
        gone = [r for r, state in states.items() if state and old not in state[1]]
        if kept:
            parts.append(f"{name} {old} is still registered on {where(kept)}: nothing was unregistered after "
                         f"the interrupt (manage.py unregister {name} {old} removes it)")
        if gone:
            parts.append(f"{name} {old} was unregistered on {where(gone)} before the interrupt")
    if unread:
        parts.append(f"{', '.join(unread)} could not be read: check with manage.py list")
    return "; ".join(parts)


def retire(members: list[Member], name: str, old: str, version: str, args: argparse.Namespace,
           smoke: str, stop: threading.Event) -> str:
    """Drain and unregister the old version on every replica at once (each drain is only a wait); once
    `stop` is set (Ctrl-C) no drain sends another request, so none unregisters after it."""
    say(f"rollout: draining and unregistering {name} {old} on every replica")

    def one(m: Member) -> str | None:
        try:
            unregister(stoppable(m.server, stop), name, old, args.drain_seconds, args.drain_timeout,
                       m.log_dir, label=f"{m.name}: ")
            say(f"rollout: {m.name}: {name} {old} unregistered")
            return None
        except API_ERRORS as e:
            return f"{m.name}: {e}"

    with ThreadPoolExecutor(len(members)) as pool:
        try:
            futures = [pool.submit(one, m) for m in members]
            failures = [f for f in (future.result() for future in futures) if f]
        except KeyboardInterrupt:
            stop.set()  # before the pool's exit waits for the drains: each ends at its next request
            raise
    report_end_states(members, name)
    if failures:  # the new version serves everywhere; only the old one lingers where its drain failed
        raise Refused(f"rollout: {name} {version} is the default and serving on every replica, but "
                      f"{name} {old} stays registered on {len(failures)} of them: {'; '.join(failures)}")
    return (f"rollout: {name} {old} -> {version} on {replicas_(members)}, {smoke}; "
            f"{name} {old} unregistered")


def replicas_(members: list[Member]) -> str:
    """"1 replica", "3 replicas"."""
    return f"{len(members)} replica" + ("s" if len(members) != 1 else "")
