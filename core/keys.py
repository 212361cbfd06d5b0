"""Credentials for TorchServe: its key_file.json, or the front proxy's token files, renewed when refused.

TorchServe 0.12 enforces token authorization: `torchserve --start` writes key_file.json in its
working folder (the repository root, beside config.properties, for serve.sh). Inference and
management keys expire after 60 minutes and change on every restart; the API key can ask the
management API for a fresh inference or management key. Behind the front proxy (deploy/nginx) the
client holds the proxy's tokens instead, read from files by the rule render.sh reads them by.
request_with_key sends a request with them, renewing a refused key once.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import requests

from core.errors import ServerUnavailable
from core.http import bearer, is_auth_error, new_session

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_KEY_FILE = REPO_ROOT / "key_file.json"  # where serve.sh runs torchserve
KEY_KINDS = ("inference", "management", "API")


def find_key_file(path: str | os.PathLike | None = None) -> Path:
    """The key file to use: `path` when given, else key_file.json at the repository root."""
    return Path(path).expanduser() if path else DEFAULT_KEY_FILE


def read_keys(path: str | os.PathLike) -> dict[str, str]:
    """key_file.json -> {"inference": key, "management": key, "API": key} (missing kinds left out)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    keys = {}
    for kind in KEY_KINDS:
        entry = data.get(kind) if isinstance(data, dict) else None
        if isinstance(entry, dict) and isinstance(entry.get("key"), str):
            keys[kind] = entry["key"]
    return keys


# The token-file rule, shared with deploy/nginx/render.sh (tests/test_tokens.py runs one table of
# cases against both): the file is printable ASCII, tab and LF, with a CR allowed only before a LF
# or at its end (a CRLF file); each line is stripped of its CR and of blanks; blank lines and
# #-comments are skipped; every other line is a token of 32 to 512 letters, digits or . _ ~ + / = -
# with at least 8 different characters and not the same as an earlier one, letter case aside
# (nginx compares tokens without it).
NOT_TOKEN_FILE_TEXT = re.compile(rb"[^\t\n\r -~]|\r(?!\n|\Z)")
TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]+")
MIN_TOKEN_LENGTH, MAX_TOKEN_LENGTH, MIN_DISTINCT_CHARACTERS = 32, 512, 8


def read_tokens(path: str | os.PathLike) -> list[str]:
    """Every token of a token file, in order, by the rule render.sh reads it by (docs/security.md);
    ValueError naming the line at fault, OSError when it cannot be read."""
    data = Path(path).read_bytes()
    bad = NOT_TOKEN_FILE_TEXT.search(data)
    if bad:
        number = data.count(b"\n", 0, bad.start()) + 1
        raise ValueError(f"line {number}: not printable ASCII (a NUL or other "
                         "control byte, a CR inside a line, a byte order mark or a non-ASCII character)")
    tokens, first_seen = [], {}
    for number, line in enumerate(data.decode("ascii").split("\n"), 1):
        token = line.removesuffix("\r").strip(" \t")
        if not token or token.startswith("#"):
            continue
        if not TOKEN_CHARS.fullmatch(token):
            raise ValueError(f"line {number}: a token may hold only letters, digits and . _ ~ + / = -")
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"line {number}: a token has {len(token)} characters; at least "
                             f"{MIN_TOKEN_LENGTH} are needed")
        if len(token) > MAX_TOKEN_LENGTH:
            raise ValueError(f"line {number}: a token has more than {MAX_TOKEN_LENGTH} characters")
        distinct = len(set(token.lower()))
        if distinct < MIN_DISTINCT_CHARACTERS:
            raise ValueError(f"line {number}: a token has {distinct} different characters (letter case "
                             f"aside); at least {MIN_DISTINCT_CHARACTERS} are needed")
        earlier = first_seen.setdefault(token.lower(), number)
        if earlier != number:
            raise ValueError(f"line {number}: the token of line {earlier} again (letter case aside)")
        tokens.append(token)
    if not tokens:
        raise ValueError("the file holds no token (only blank lines and # comments)")
    return tokens


def read_token(path: str | os.PathLike) -> str:
    """The bearer token to send from a token file: its first token.

    nginx accepts every token of the file (two during a rotation); a client sends the first, so a
    rotation puts the new token first only once every proxy accepts it (docs/security.md).
    """
    return read_tokens(path)[0]


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is replaced or rewritten (a Kubernetes Secret update swaps a link)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class Keys:
    """Thread-safe holder of one server's credentials, re-read or renewed when the server rejects one.

    Either TorchServe's own key_file.json (token authorization on: inference, management and API
    keys; an expired key is renewed with the API key) or the front proxy's tokens (token_file for
    inference and read-only management calls, management_token_file for every management call),
    re-read from their files when refused or when a token file changes, so a rotated token is
    picked up before the proxy drops the old one. The files are read on first use: an unreadable
    one is that server's ServerUnavailable, not a crash at start.
    """

    def __init__(self, key_file: str | os.PathLike | None = None, management_url: str | None = None,
                 keys: dict[str, str] | None = None, default_file: bool = True, *,
                 token_file: str | os.PathLike | None = None,
                 management_token_file: str | os.PathLike | None = None):
        # default_file=False (a fleet's replica): no key_file means no keys, never the local server's
        use_key_file = (key_file or default_file) and not (token_file or management_token_file)
        self.key_file = find_key_file(key_file) if use_key_file else None
        self.token_file = Path(token_file).expanduser() if token_file else None
        self.management_token_file = Path(management_token_file).expanduser() if management_token_file else None
        self.management_url = management_url
        self._lock = threading.Lock()  # guards _keys only: never held across I/O
        self._renewing = threading.Lock()  # one renewal at a time; readers of the keys never wait for it
        self._keys = dict(keys) if keys is not None else None
        self._session: requests.Session | None = None
        self._token_files = [f for f in (self.token_file, self.management_token_file) if f]
        self._signatures = self._token_signatures() if self._token_files else None

    def _token_signatures(self) -> list:
        return [file_signature(f) for f in self._token_files]

    @property
    def source(self) -> str:
        """Where the credentials come from, for error messages."""
        files = [str(f) for f in (self.key_file, self.token_file, self.management_token_file) if f]
        return ", ".join(files) or "no key file"

    def _read(self) -> dict[str, str]:
        keys: dict[str, str] = {}
        for path, kinds in ((self.token_file, ("inference",)), (self.management_token_file, ("management",))):
            if path is not None:
                try:
                    keys.update(dict.fromkeys(kinds, read_token(path)))
                except (OSError, ValueError) as e:
                    raise ServerUnavailable(f"cannot read token file {path}: {getattr(e, 'strerror', None) or e}"
                                            ) from None
        if self.token_file and "management" not in keys:
            keys["management"] = keys["inference"]  # the proxy lets either token read; writes are refused
        if self.key_file is None:
            return keys
        for attempt in range(20):  # the server may be writing the file right now
            try:
                return read_keys(self.key_file)
            except FileNotFoundError:
                return {}
            except (OSError, ValueError) as e:
                if attempt == 19:
                    raise ServerUnavailable(f"cannot read key file {self.key_file}: "
                                            f"{getattr(e, 'strerror', None) or e}") from None
                time.sleep(0.05)
        return {}

    def get(self, kind: str) -> str | None:
        """The current key of `kind` ("inference", "management", "API"), or None."""
        signatures = self._token_signatures() if self._token_files else None
        with self._lock:
            if self._keys is not None and signatures == self._signatures:
                return self._keys.get(kind)
        try:
            fresh = self._read()
        except ServerUnavailable:
            with self._lock:  # a token file caught mid-rewrite: keep the last good token, look again
                if self._keys is not None:
                    return self._keys.get(kind)
            raise
        with self._lock:
            if self._keys is None or signatures != self._signatures:
                self._keys, self._signatures = fresh, signatures
            return self._keys.get(kind)

    def headers(self, kind: str) -> dict[str, str]:
        """The Authorization header for `kind`, empty when there is no key (auth disabled)."""
        return bearer(self.get(kind))

    def close(self) -> None:
        """Close the session a key renewal opened (a later renewal opens another)."""
        with self._renewing:
            session, self._session = self._session, None
        if session is not None:
            session.close()

    def _replace(self, fresh: dict[str, str], kind: str, rejected: str | None) -> bool:
        if fresh.get(kind) and fresh.get(kind) != rejected:
            with self._lock:
                self._keys = fresh
            return True
        return False

    def refresh(self, kind: str, rejected: str | None) -> bool:
        """After `rejected` was refused: re-read the files, else ask for a new key; True if renewed."""
        with self._renewing:
            if self.get(kind) != rejected:
                return True  # another thread renewed it already
            fresh = self._read()
            if self._replace(fresh, kind, rejected):
                return True
            api_key = fresh.get("API") or self.get("API")
            if kind == "API" or not api_key or not self.management_url or self.key_file is None:
                return False
            if self._session is None:
                self._session = new_session(1)
            try:  # TorchServe answers with an empty body and rewrites the key file
                response = self._session.get(f"{self.management_url}/token", params={"type": kind},
                                             headers=bearer(api_key), timeout=10)
            except requests.RequestException:
                return False
            return response.status_code == 200 and self._replace(self._read(), kind, rejected)


def request_with_key(session: requests.Session, method: str, url: str, keys: Keys, kind: str,
                     **kwargs) -> requests.Response:
    """Send a request with the `kind` key (read once: behind the proxy each read looks at the token
    files); on a key rejection refresh it once and resend."""
    extra = kwargs.pop("headers", None) or {}
    sent = keys.get(kind)
    response = session.request(method, url, headers={**extra, **bearer(sent)}, **kwargs)
    if is_auth_error(response) and keys.refresh(kind, sent):
        response = session.request(method, url, headers={**extra, **bearer(keys.get(kind))}, **kwargs)
    return response
