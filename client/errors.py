"""The errors every command of the project reports in one line, and the exit code of each.

One type per meaning: the user's mistake (2), a server that cannot be used (2), an operation
the server refused (1), a rollout that failed and was undone (1).
"""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A mistake in the user's input or flags, named with its file (and line): exit code 2."""


class ServerUnavailable(Exception):
    """The server cannot be used at all (unreachable, key refused, no worker): exit code 2."""


class Refused(Exception):
    """The server, or a check before it, refused an operation; nothing was changed: exit code 1."""


class RolledBack(Exception):
    """A rollout failed part-way and was undone: exit code 1."""


EXIT_CODES: dict[type[Exception], int] = {UserError: 2, ServerUnavailable: 2, Refused: 1, RolledBack: 1}


def one_line(error: Exception) -> str:
    """The error's message as one line (a DataLoader worker re-raises with its traceback: keep the last)."""
    text = str(error).strip()
    message = text.splitlines()[-1] if text else type(error).__name__
    return message.removeprefix(f"{type(error).__module__}.{type(error).__name__}: ")


def run_main(main: Callable, args) -> None:
    """Run a command's `main(args)`: its int result is the exit code; a known error is `error: ...`."""
    try:
        code = main(args)
    except tuple(EXIT_CODES) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(next(code for kind, code in EXIT_CODES.items() if isinstance(e, kind)))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
