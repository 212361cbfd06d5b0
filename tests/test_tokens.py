"""The token-file rule (docs/security.md, "Rotating the tokens"): one table of cases, run against both
readers of a token file, deploy/nginx/render.sh (POSIX sh, run for real: what lands in tokens.map, or
its one-line refusal) and core/keys.py's read_tokens / read_token (the client). Both must agree on
every case: the same tokens, or a refusal naming the same line for the same reason."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import ServerUnavailable
from core.keys import Keys, read_token, read_tokens
from tests.conftest import REPO

RENDER = REPO / "deploy" / "nginx" / "render.sh"
T1 = hashlib.sha256(b"one").hexdigest()  # 64 hex digits: what `openssl rand -hex 32` makes
T2 = hashlib.sha256(b"two").hexdigest()
PUNCTUATED = "Ab0._~+/=-" + hashlib.sha256(b"three").hexdigest()[:30]  # every kind of character allowed
MANAGEMENT = hashlib.sha256(b"management").hexdigest()
NOT_ASCII = ("not printable ASCII (a NUL or other control byte, a CR inside a line, a byte order mark or a "
             "non-ASCII character)")
ONLY = "a token may hold only letters, digits and . _ ~ + / = -"
NO_TOKEN = "the file holds no token (only blank lines and # comments)"

# (id, the file's bytes, the tokens both read in order, or the reason both refuse it)
CASES = [
    ("one-token", f"{T1}\n".encode(), [T1]),
    ("no-final-newline", T1.encode(), [T1]),
    ("crlf-rotation", f"{T1}\r\n{T2}\r\n".encode(), [T1, T2]),
    ("cr-at-the-end", f"{T1}\r".encode(), [T1]),
    ("rotation-with-comments-blanks-and-tabs",
     f"# rotation under way\n\n  {T1}  \n\t{T2}\t\n# done\n".encode(), [T1, T2]),
    ("indented-comment", f"   # note\n \t \n{T1}\n".encode(), [T1]),
    ("every-allowed-character", f"{PUNCTUATED}\n".encode(), [PUNCTUATED]),
    ("exactly-32", ("abcdefgh" * 4).encode(), ["abcdefgh" * 4]),
    ("exactly-512", (T1 * 8).encode(), [T1 * 8]),
    ("utf8-bom", b"\xef\xbb\xbf" + T1.encode() + b"\n", f"line 1: {NOT_ASCII}"),
    ("bom-after-a-comment", b"# x\n\xef\xbb\xbf" + T1.encode(), f"line 2: {NOT_ASCII}"),
    ("nul-after-the-token", T1.encode() + b"\x00\n", f"line 1: {NOT_ASCII}"),
    ("nul-on-line-2", f"{T1}\n{T2}".encode() + b"\x00", f"line 2: {NOT_ASCII}"),
    ("nul-in-a-comment", b"# \x00\n" + T1.encode(), f"line 1: {NOT_ASCII}"),
    ("control-byte", T1.encode() + b"\x01\n", f"line 1: {NOT_ASCII}"),
    ("vertical-tab", b"\x0b" + T1.encode(), f"line 1: {NOT_ASCII}"),
    ("del", T1.encode() + b"\x7f", f"line 1: {NOT_ASCII}"),
    ("cr-inside-a-line", f"{T1}\rx\n".encode(), f"line 1: {NOT_ASCII}"),
    ("two-crs", f"{T1}\r\r\n".encode(), f"line 1: {NOT_ASCII}"),
    ("non-ascii-comment", f"# rotated by José\n{T1}\n".encode(), f"line 1: {NOT_ASCII}"),
    ("latin1-byte", b"\n\n" + T1.encode() + b"\xe9", f"line 3: {NOT_ASCII}"),
    ("two-tokens-on-a-line", f"{T1} {T2}\n".encode(), f"line 1: {ONLY}"),
    ("comment-after-the-token", f"{T1} # old\n".encode(), f"line 1: {ONLY}"),
    ("tab-inside", f"{T1}\t{T2}\n".encode(), f"line 1: {ONLY}"),
    ("quote-and-semicolon", ("a" * 40 + '";\n').encode(), f"line 1: {ONLY}"),
    ("31-characters", T1[:31].encode(), "line 1: a token has 31 characters; at least 32 are needed"),
    ("short-second-token", f"{T1}\nshort\n".encode(),
     "line 2: a token has 5 characters; at least 32 are needed"),
    ("lines-counted-with-blanks-and-comments", b"# c\n\n\nshort\n",
     "line 4: a token has 5 characters; at least 32 are needed"),
    ("513-characters", (T1 * 8 + "a").encode(), "line 1: a token has more than 512 characters"),
    ("one-repeated-letter", ("a" * 32).encode(),
     "line 1: a token has 1 different characters (letter case aside); at least 8 are needed"),
    ("7-different", ("abcdefg" * 5).encode(),
     "line 1: a token has 7 different characters (letter case aside); at least 8 are needed"),
    ("8-different-by-case-only-4", ("aAbBcCdD" * 4).encode(),
     "line 1: a token has 4 different characters (letter case aside); at least 8 are needed"),
    ("same-token-twice", f"{T1}\n\n{T1}\n".encode(), "line 3: the token of line 1 again (letter case aside)"),
    ("same-token-other-case", f"{T1}\n{T1.upper()}\n".encode(),
     "line 2: the token of line 1 again (letter case aside)"),
    ("empty", b"", NO_TOKEN),
    ("only-comments-and-blanks", b"# nothing yet\n\n \t\r\n", NO_TOKEN),
]
IDS = [case[0] for case in CASES]


def render(tmp_path: Path, token_file: Path) -> subprocess.CompletedProcess:
    """render.sh (check mode: renders, then `nginx -t`) with `token_file` as the inference token file."""
    management = tmp_path / "management.token"
    management.write_text(MANAGEMENT + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "TS_"))}
    env.update(PROXY_DIR=str(tmp_path / "run"), PROXY_TOKEN_FILE=str(token_file),
               PROXY_MANAGEMENT_TOKEN_FILE=str(management))
    return subprocess.run(["sh", str(RENDER)], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name,data,expected", CASES, ids=IDS)
def test_render_reads_a_token_file_by_the_rule(tmp_path, name, data, expected):
    path = tmp_path / "inference.token"
    path.write_bytes(data)
    result = render(tmp_path, path)
    if isinstance(expected, list):
        assert result.returncode == 0, result.stderr
        mapped = (tmp_path / "run" / "tokens.map").read_text()
        assert re.findall(r'"Bearer (\S+)" inference;', mapped) == expected
    else:
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert f"render.sh: error: {path}: {expected} (PROXY_TOKEN_FILE)" in result.stderr


@pytest.mark.parametrize("name,data,expected", CASES, ids=IDS)
def test_the_client_reads_a_token_file_by_the_rule(tmp_path, name, data, expected):
    path = tmp_path / "inference.token"
    path.write_bytes(data)
    if isinstance(expected, list):
        assert read_tokens(path) == expected and read_token(path) == expected[0]
        assert Keys(token_file=path).headers("inference") == {"Authorization": f"Bearer {expected[0]}"}
    else:
        with pytest.raises(ValueError) as refused:
            read_tokens(path)
        assert str(refused.value) == expected
        with pytest.raises(ServerUnavailable) as unavailable:  # what the client's commands see: one line
            Keys(token_file=path).get("inference")
        assert str(unavailable.value) == f"cannot read token file {path}: {expected}"


def test_a_bad_token_file_is_one_line_from_the_client_command_never_a_traceback(tmp_path):
    """classify_dir.py with a token file saved with a byte order mark: its one-line error names the
    file and the line (exit 3, that server unavailable, as for any unreadable credential)."""
    path = tmp_path / "inference.token"
    path.write_bytes(b"\xef\xbb\xbf" + T1.encode() + b"\r\n")
    (tmp_path / "images").mkdir()
    command = [sys.executable, str(REPO / "scripts" / "classify_dir.py"), str(tmp_path / "images"), "--model", "m",
               "--url", "http://127.0.0.1:9", "--inference-token-file", str(path),
               "--output", str(tmp_path / "rows.jsonl")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    assert f"cannot read token file {path}: line 1: {NOT_ASCII}" in result.stderr
