"""Fleet-wide management for manage.py --fleet: what every replica serves, the version skew between
them, and the rollout that reaches every replica or none.

The rollout registers and smoke-tests the new version on every replica before any default changes,
then switches the default replica by replica, then retires the old version on every replica (the
drains run side by side). A failure before the last switch switches back the replicas already
switched and removes the new version everywhere; what each replica ends on is printed.
"""
from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

from core.errors import Refused, RolledBack, ServerUnavailable, UserError
from client.fleet import load_fleet
from client.rollout import (classify_smoke, list_smoke_images, locate_mar, read_manifest, register, say,
                            smoke_accuracy, smoke_test, unregister)
from core.torchserve import TorchServe

Member = tuple[str, TorchServe]  # (replica name, its management and inference APIs)
API_ERRORS = (Refused, UserError, ServerUnavailable, requests.RequestException)


def fleet_members(path: Path, timeout: float) -> list[Member]:
    """Every replica of the fleet file with its own APIs and keys."""
    return [(replica.name, replica.api(timeout=timeout)) for replica in load_fleet(path)]


def parse_log_dirs(values: list[str], members: list[Member]) -> dict[str, Path]:
    """--replica-log-dir NAME=DIR flags -> {replica: log folder}; UserError on an unknown replica."""
    names, dirs = [name for name, _ in members], {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not folder:
            raise UserError(f"--replica-log-dir wants NAME=DIR, got {value!r}")
        if name not in names:
            raise UserError(f"--replica-log-dir {value}: no replica {name!r} in the fleet "
                            f"({', '.join(names)})")
        dirs[name] = Path(folder).expanduser()
    return dirs


@dataclass
class Snapshot:
    """What one replica serves: model -> (default version, describe entries), or why it is unknown."""

    replica: str
    models: dict[str, tuple[str | None, list[dict]]] = field(default_factory=dict)
    error: str | None = None


def snapshot(replica: str, client: TorchServe, names: list[str] | None = None) -> Snapshot:
    """Read the given models (None: all) of one replica; an unreachable replica keeps its error."""
    try:
        models = {}
        for name in client.model_names() if names is None else names:
            entries = client.versions(name)
            if entries:
                models[name] = (client.default_version(name), entries)
        return Snapshot(replica, models)
    except API_ERRORS as e:
        return Snapshot(replica, error=str(e))


def snapshots(members: list[Member], names: list[str] | None = None) -> list[Snapshot]:
    """Every replica read at once (one thread each), in the fleet file's order."""
    with ThreadPoolExecutor(len(members)) as pool:
        return list(pool.map(lambda m: snapshot(m[0], m[1], names), members))


def _grouped(values: dict[str, str]) -> str:
    """{replica: value} -> "value on r1, r2; other on r3"."""
    groups: dict[str, list[str]] = {}
    for replica, value in values.items():
        groups.setdefault(value, []).append(replica)
    return "; ".join(f"{value} on {', '.join(replicas)}" for value, replicas in groups.items())


def version_skew(snaps: list[Snapshot]) -> list[str]:
    """One line per model whose default, or whose set of versions, differs between readable replicas."""
    readable = [s for s in snaps if s.error is None]
    lines = []
    for model in sorted({m for s in readable for m in s.models}):
        defaults, registered = {}, {}
        for s in readable:
            default, entries = s.models.get(model, (None, []))
            defaults[s.replica] = default or "(not registered)"
            registered[s.replica] = ", ".join(sorted(e["modelVersion"] for e in entries)) or "none"
        if len(set(defaults.values())) > 1:
            lines.append(f"version skew: {model} default is {_grouped(defaults)}")
        elif len(set(registered.values())) > 1:
            lines.append(f"version skew: {model} versions registered: {_grouped(registered)}")
    return lines


def read_state(client: TorchServe, name: str) -> tuple[str | None, list[str]]:
    """(default version or None, every registered version) of `name` on one replica."""
    versions = sorted(v["modelVersion"] for v in client.versions(name))
    return (client.default_version(name) if versions else None), versions


def report_end_states(members: list[Member], name: str) -> dict[str, tuple[str | None, list[str]] | None]:
    """Print what every replica ends on; return {replica: (default, versions), None if unreadable}."""
    states: dict[str, tuple[str | None, list[str]] | None] = {}
    for replica, client in members:
        try:
            states[replica] = default, versions = read_state(client, name)
            state = (f"{name} {default} is the default (registered: {', '.join(versions)})" if default
                     else f"{name} not registered")
        except API_ERRORS as e:
            states[replica], state = None, f"could not be read ({e})"
        say(f"rollout: {replica} ends on: {state}")
    return states


def roll_back_fleet(members: list[Member], name: str, version: str, old: str | None,
                    args: argparse.Namespace, log_dirs: dict[str, Path]) -> str:
    """Switch every replica whose default is `version` back to `old` first (all clients see the old
    version again), then remove `version` everywhere; returns a summary of where replicas end."""
    switched, problems = set(), {}
    for replica, client in members:
        try:
            if old and client.default_version(name) == version:
                client.call("PUT", f"/models/{name}/{old}/set-default", f"set-default {name} {old}")
                switched.add(replica)
                say(f"rollout: {replica}: {name} {old} is the default again")
        except API_ERRORS as e:
            problems[replica] = f"switching back failed: {e}"

    def remove(member: Member) -> None:
        replica, client = member
        if replica in problems:
            return  # the new version may still be its default: TorchServe would refuse, leave it
        try:
            if not any(v["modelVersion"] == version for v in client.versions(name)):
                return
            if replica in switched:  # it served clients: drain it like any retired version
                unregister(client, name, version, args.drain_seconds, args.drain_timeout,
                           log_dirs.get(replica), label=f"{replica}: ")
            else:  # never the default: only the smoke test ever called it
                client.call("DELETE", f"/models/{name}/{version}", f"unregister {name} {version}")
        except API_ERRORS as e:
            problems[replica] = f"removing {name} {version} failed: {e}"

    with ThreadPoolExecutor(len(members)) as pool:
        list(pool.map(remove, members))
    states = report_end_states(members, name)
    if not problems and all(state and state[0] == old and version not in state[1]
                            for state in states.values()):
        return (f"{name} {old} is the default on every replica" if old else f"{name} is registered on "
                f"no replica") + f", {version} removed everywhere"
    trouble = "; ".join(f"{r}: {p}" for r, p in problems.items()) or "replicas differ"
    return f"the rollback is incomplete ({trouble}): check with manage.py list --fleet"


def check_fleet(members: list[Member], name: str, version: str, new_model: bool, mar: str) -> str | None:
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
            raise Refused(f"rollout: {mar} is model {name}, which the fleet does not serve (it serves "
                          f"{', '.join(served)}); rebuild the archive with the served name, or pass "
                          f"--new-model to add {name} beside them (nothing changed)")
    return old


def fleet_rollout(members: list[Member], args: argparse.Namespace, log_dirs: dict[str, Path]) -> str:
    """Register and smoke-test on every replica, then switch every default, then retire the old
    version everywhere; before the last switch, any failure rolls every replica back."""
    images = list_smoke_images(args.smoke_dir, args.min_accuracy) if args.smoke_dir else []
    mar = locate_mar(args.mar, args.model_store)  # its file name is what every replica's store must hold
    try:
        name, version = read_manifest(mar)
    except Refused as e:
        raise Refused(f"rollout: {e}; nothing was changed on any replica") from None
    old = check_fleet(members, name, version, args.new_model, mar.name)
    workers = {}
    for replica, client in members:  # each replica keeps the capacity it has
        entry = next(iter(client.describe(name, old)), {}) if old else {}
        workers[replica] = args.workers or entry.get("minWorkers") or None
    baselines: dict[str, tuple[str, float] | None] = {replica: None for replica, _ in members}
    if old and images and all(label for _, _, label in images):  # class folders: compare per replica
        for replica, client in members:
            say(f"rollout: {replica}: measuring {name} {old} on the {len(images)} smoke images")
            baselines[replica] = old, smoke_accuracy(images, classify_smoke(client, name, old, images))
    replicas = ", ".join(replica for replica, _ in members)
    step, summaries = "", []
    try:
        for replica, client in members:  # 1. the new version beside the old one, everywhere
            step = f"{replica}: register {mar.name} ({name} {version})"
            say(f"rollout: {step} while {name} {old or '(none)'} serves")
            try:
                register(client, mar, workers[replica], args.batch_size, args.max_batch_delay,
                         log_dirs.get(replica))
            except Refused as e:  # TorchServe's words for a missing or cut-short copy in its store
                if "Failed to save model" in str(e) or "Model not found" in str(e):
                    raise Refused(f"{e} ({replica}'s model store must hold a complete copy of "
                                  f"{mar.name})") from None
                raise
            if images:
                step = f"{replica}: smoke test of {name} {version}"
                summaries.append(smoke_test(client, name, version, images, args.min_accuracy,
                                            baselines[replica], args.max_accuracy_drop))
                say(f"rollout: {replica}: {summaries[-1]}")
        for replica, client in members:  # 2. every replica passed: switch them one by one
            step = f"{replica}: set-default {name} {version}"
            client.call("PUT", f"/models/{name}/{version}/set-default", f"set-default {name} {version}")
            say(f"rollout: {replica}: {name} {version} is the default")
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - whatever failed, undo, then report it
        say(f"rollout: failed at {step}; rolling back every replica")
        outcome = roll_back_fleet(members, name, version, old, args, log_dirs)
        if not isinstance(e, API_ERRORS):
            say(f"rollout: rolled back after {type(e).__name__}: {outcome}")
            raise
        reason = (str(e) if isinstance(e, (Refused, UserError, ServerUnavailable))
                  else f"{type(e).__name__}: {e}")
        raise RolledBack(f"rollout of {name} {version} failed at {step} and was rolled back on every "
                         f"replica: {reason}; {outcome}") from None
    smoke = f"smoke test passed on every replica ({len(images)} images)" if images else "no smoke set"
    say(f"rollout: {name} {version} is the default on every replica ({replicas}; {smoke})")
    if old is None or args.keep_old:
        report_end_states(members, name)
        kept = f"; {name} {old} kept" if old else ""
        return f"rollout: {name} {old or '(none)'} -> {version} on {len(members)} replicas, {smoke}{kept}"
    return retire(members, name, old, version, args, log_dirs, smoke)


def retire(members: list[Member], name: str, old: str, version: str, args: argparse.Namespace,
           log_dirs: dict[str, Path], smoke: str) -> str:
    """Drain and unregister the old version on every replica at once (each drain is only a wait)."""
    say(f"rollout: draining and unregistering {name} {old} on every replica")

    def one(member: Member) -> str | None:
        replica, client = member
        try:
            unregister(client, name, old, args.drain_seconds, args.drain_timeout, log_dirs.get(replica),
                       label=f"{replica}: ")
            say(f"rollout: {replica}: {name} {old} unregistered")
            return None
        except API_ERRORS as e:
            return f"{replica}: {e}"

    with ThreadPoolExecutor(len(members)) as pool:
        failures = [f for f in pool.map(one, members) if f]
    report_end_states(members, name)
    if failures:  # the new version serves everywhere; only the old one lingers where its drain failed
        raise Refused(f"rollout: {name} {version} is the default and serving on every replica, but "
                      f"{name} {old} stays registered on {len(failures)} of them: {'; '.join(failures)}")
    return (f"rollout: {name} {old} -> {version} on {len(members)} replicas, {smoke}; "
            f"{name} {old} unregistered everywhere")
