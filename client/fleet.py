"""The replicas a command works on: a fleet file's, or the one server of --url (a fleet of one).

The fleet file is YAML (or JSON, which is YAML too), as deploy/kubernetes/make_fleet.py writes it:

    replicas:
      - name: ts-0                                  # unique; result rows name the replica that answered
        inference_url: http://ts-0.ts.ml.svc.cluster.local:8090
        management_url: http://ts-0.ts.ml.svc.cluster.local:8091   # default: inference port + 1
        token_file: /tokens/inference               # behind the front proxy: the inference token
        management_token_file: /tokens/management   # only where management commands run
      - name: local
        inference_url: http://127.0.0.1:8080
        key_file: key_file.json                     # TorchServe's own key file (token auth on)

Paths are relative to the fleet file; an entry names key_file or token_file, never both (neither:
no credentials, never the local key_file.json). Every mistake is a UserError naming the file and
the entry at fault; two entries that reach the same server (127.0.0.1, localhost, 127.1) are one.
"""
from __future__ import annotations

import argparse
import dataclasses
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from core.errors import UserError
from core.http import management_url_for
from core.keys import Keys, find_key_file
from core.torchserve import DEFAULT_INFERENCE_URL, TorchServe

CREDENTIALS = ("key_file", "token_file", "management_token_file")


@dataclass(frozen=True)
class Replica:
    """One TorchServe of a fleet."""

    name: str
    inference_url: str
    management_url: str
    key_file: Path | None = None
    token_file: Path | None = None
    management_token_file: Path | None = None
    log_dir: Path | None = None  # its TorchServe's log folder, when this machine can read it

    def api(self, timeout: float = 10.0) -> TorchServe:
        """This replica's management and inference APIs, with its own credentials (none: no keys)."""
        keys = Keys(self.key_file, self.management_url, default_file=False,  # never the local server's keys
                    token_file=self.token_file, management_token_file=self.management_token_file)
        return TorchServe(self.inference_url, self.management_url, keys, timeout=timeout)


def _url(value: object, where: str, key: str) -> str:
    """A server's base URL, checked; UserError naming `where` and `key` otherwise."""
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: {key} must be a URL such as http://HOST:PORT, got {value!r}")
    try:
        parts = urlsplit(value.strip())
        parts.port
    except ValueError as e:
        raise UserError(f"{where}: {key} is not a valid URL ({e}): {value!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{where}: {key} must be an http(s) URL with a host, got {value!r}")
    if parts.username is not None or parts.password is not None:
        raise UserError(f"{where}: {key} holds credentials; give them as key_file or token files, never "
                        f"in a URL (they would land in every row and log)")
    if parts.path.strip("/") or parts.query:
        raise UserError(f"{where}: {key} must be the server's base URL, without a path: {value!r}")
    return value.strip().rstrip("/")


def _path_rule(description: str) -> dict:
    return {"anyOf": [{"type": "null"}, {"type": "string", "pattern": r"\S"}], "description": description}


# The shape of a fleet file as a JSON Schema (jsonschema checks it); each key's rule in words, for the
# one-line error. What a schema cannot say is checked after it: each URL (_url), a management port
# left for the default, key_file beside token files, the same replica twice.
ENTRY_SCHEMA = {
    "type": "object",
    "required": ["name", "inference_url"],
    "additionalProperties": False,
    "properties": {
        # \Z, not $: Python's re (jsonschema's) lets $ match before a final newline
        "name": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z",
                 "description": "letters, digits, '.', '_' or '-' (at most 63)"},
        "inference_url": {"type": "string", "description": "a URL such as http://HOST:PORT"},
        "management_url": {"type": ["string", "null"], "description": "a URL such as http://HOST:PORT"},
        **{key: _path_rule("a path") for key in CREDENTIALS},
    },
}
FLEET_SCHEMA = {"type": "object", "required": ["replicas"],
                "properties": {"replicas": {"type": "array", "minItems": 1, "items": ENTRY_SCHEMA}}}
ENTRY_KEYS = set(ENTRY_SCHEMA["properties"])


def _schema_error(data: object, source: str) -> str | None:
    """The first way `data` breaks FLEET_SCHEMA (by entry, then key, as listed), in words; None: it fits."""
    import jsonschema  # ~0.1 s: only commands given a fleet file pay for it

    error = min(jsonschema.Draft202012Validator(FLEET_SCHEMA).iter_errors(data), key=_rank, default=None)
    if error is None:
        return None
    path = list(error.absolute_path)
    if len(path) < 2:  # the file itself, or its replicas list
        if error.validator == "minItems":
            return f"{source}: 'replicas' is empty: a fleet needs at least one replica"
        return (f"{source}: expected a mapping with a list 'replicas:' of entries "
                f"(name, inference_url, management_url, key_file)")
    index = path[1]
    entry = data["replicas"][index]
    where = f"{source}: replicas[{index}]"
    if isinstance(entry, dict) and isinstance(entry.get("name"), str):  # repr: a bad name stays on the line
        where = f"{source}: replica {entry['name']!r} (replicas[{index}])"
    if len(path) == 2 and error.validator == "type":
        return f"{where}: expected a mapping, got {type(entry).__name__}"
    if len(path) == 2 and error.validator == "additionalProperties":
        unknown = sorted(set(map(str, entry)) - ENTRY_KEYS)
        return f"{where}: unknown key(s) {unknown}; known: {sorted(ENTRY_KEYS)}"
    key = path[2] if len(path) > 2 else _missing(error)[0]
    return f"{where}: {key} must be {ENTRY_SCHEMA['properties'][key]['description']}, got {entry.get(key)!r}"


def _rank(error) -> tuple:
    """The file's own errors first, then by entry; in an entry its shape, then its keys as listed."""
    path = list(error.absolute_path)
    key = path[2] if len(path) > 2 else next(iter(_missing(error)), None)
    return path[1:2], list(ENTRY_SCHEMA["properties"]).index(key) if key in ENTRY_KEYS else -1


def _missing(error) -> list[str]:
    """The keys a `required` error found missing."""
    if error.validator != "required" or not isinstance(error.instance, dict):
        return []
    return [key for key in error.validator_value if key not in error.instance]


def parse_fleet(data: object, source: str, base: Path) -> list[Replica]:
    """Replicas from a parsed fleet file; `source` names the file in errors, `base` anchors key files."""
    problem = _schema_error(data, source)
    if problem:
        raise UserError(problem)
    replicas: list[Replica] = []
    for index, entry in enumerate(data["replicas"]):
        where = f"{source}: replica '{entry['name']}' (replicas[{index}])"
        inference = _url(entry["inference_url"], where, "inference_url")
        if not entry.get("management_url") and (urlsplit(inference).port or 80) == 65535:
            raise UserError(f"{where}: inference_url {inference} leaves no port for the management URL; "
                            f"give management_url")
        management = (_url(entry["management_url"], where, "management_url") if entry.get("management_url")
                      else management_url_for(inference))
        files = {key: base / Path(entry[key]).expanduser() if entry.get(key) else None for key in CREDENTIALS}
        if files["key_file"] and (files["token_file"] or files["management_token_file"]):
            raise UserError(f"{where}: name key_file (TorchServe's own keys) or token_file / "
                            f"management_token_file (the front proxy's tokens), not both")
        replicas.append(Replica(entry["name"], inference, management, **files))
    for kind in ("name", "inference_url", "management_url"):
        seen: dict[str, int] = {}
        for index, replica in enumerate(replicas):
            value = getattr(replica, kind)
            if value in seen:
                raise UserError(f"{source}: replicas[{seen[value]}] and replicas[{index}] have the same "
                                f"{kind} {value!r}")
            seen[value] = index
    refuse_same_server(replicas, source)
    return replicas


def _endpoints(url: str) -> set[tuple[str, int]]:
    """The (address, port) pairs a URL's host resolves to; empty when it does not resolve now."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return set()
    return {(info[4][0], port) for info in infos}


def refuse_same_server(replicas: list[Replica], source: str) -> None:
    """UserError when two entries reach one server (the same resolved address and port) under two
    spellings: it would get twice the load, and a rollout would act on it twice."""
    seen: list[tuple[set[tuple[str, int]], int]] = []
    for index, replica in enumerate(replicas):
        ends = _endpoints(replica.inference_url)
        for other_ends, other in seen:
            if ends & other_ends:
                address, port = sorted(ends & other_ends)[0]
                raise UserError(f"{source}: replicas[{other}] ({replicas[other].name}) and replicas[{index}] "
                                f"({replica.name}) are the same server ({address} port {port}); list it once")
        seen.append((ends, index))


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


def replicas_from_args(args: argparse.Namespace) -> tuple[list[Replica], str]:
    """The replicas a command works on and what names them in messages: --fleet's, or one server from
    --url, --management-url and the credentials flags, named HOST:PORT (a fleet of one)."""
    one = ("url", "management_url", "token_file", "inference_token_file", "management_token_file")
    if getattr(args, "fleet", None):
        given = [f"--{flag.replace('_', '-')}" for flag in one if getattr(args, flag, None) is not None]
        if given:
            raise UserError(f"--fleet names each replica's URLs and credentials: drop {', '.join(given)}")
        replicas = load_fleet(args.fleet)
        dirs = replica_log_dirs(args, replicas)
        return [dataclasses.replace(r, log_dir=d) for r, d in zip(replicas, dirs)], str(args.fleet)
    if getattr(args, "replica_log_dir", None):
        raise UserError("--replica-log-dir needs --fleet (one server: --log-dir)")
    url = _url(args.url or DEFAULT_INFERENCE_URL, "--url", "the URL")
    management = _url(args.management_url, "--management-url", "the URL") if args.management_url else None
    tokens = args.inference_token_file or args.management_token_file
    if tokens and args.token_file:
        raise UserError("--token-file (TorchServe's key_file.json) or --inference-token-file / "
                        "--management-token-file (the front proxy's tokens), not both")
    for flag in ("token_file", "inference_token_file", "management_token_file"):
        value = getattr(args, flag, None)
        if value and not Path(value).expanduser().is_file():
            raise UserError(f"--{flag.replace('_', '-')} not found: {value}")
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if management is None and port == 65535:
        raise UserError(f"--url {url}: the management URL would be port 65536; pass --management-url")
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    replica = Replica(f"{host}:{port}", url, management or management_url_for(url),
                      key_file=None if tokens else find_key_file(args.token_file),
                      token_file=_path(args.inference_token_file),
                      management_token_file=_path(args.management_token_file),
                      log_dir=getattr(args, "log_dir", None))
    return [replica], url


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


def replica_log_dirs(args: argparse.Namespace, replicas: list[Replica]) -> list[Path | None]:
    """--replica-log-dir NAME=DIR flags -> each replica's log folder (None when not given)."""
    names, dirs = [r.name for r in replicas], {}
    for value in getattr(args, "replica_log_dir", None) or []:
        name, sep, folder = value.partition("=")
        if not sep or not folder:
            raise UserError(f"--replica-log-dir wants NAME=DIR, got {value!r}")
        if name not in names:
            raise UserError(f"--replica-log-dir {value}: no replica {name!r} in the fleet ({', '.join(names)})")
        dirs[name] = Path(folder).expanduser()
    return [dirs.get(name) for name in names]


def write_fleet(path: Path, entries: list[dict[str, object]]) -> Path:
    """Write a fleet file (PyYAML: any path or URL is quoted as it must be); entries as in the docstring."""
    unknown = sorted({str(k) for e in entries for k in e} - ENTRY_KEYS)
    if unknown:
        raise ValueError(f"unknown fleet entry keys {unknown}")
    text = yaml.safe_dump({"replicas": [{k: str(v) for k, v in e.items() if v is not None} for e in entries]},
                          sort_keys=False, allow_unicode=True)
    Path(path).write_text(text, encoding="utf-8")
    return Path(path)
