"""The errors every command of the project reports in one line, and the exit code of each.

One type per meaning, under one base, ProjectError:
  exit 1  Refused      an operation the server (or a check before it) refused; nothing changed
          RolledBack   a rollout failed part-way and was undone
  exit 2  UserError    the user's input or flags are wrong: never worth retrying as it is
          KeyRefused   the server refused our key or token: a configuration error, as exit 2
  exit 3  ServerUnavailable  the server, or every replica of a fleet, cannot be used now:
                       unreachable, no READY worker; worth retrying later
  exit 130             interrupted (Ctrl-C, SIGTERM)
The README's "Exit codes" table is what a batch scheduler (a podFailurePolicy) acts on.
"""
from __future__ import annotations

import sys
from typing import Callable


class ProjectError(Exception):
    """Every error the project reports in one line."""


class UserError(ProjectError):
    """A mistake in the user's input or flags, named with its file (and line): exit code 2."""


class ServerUnavailable(ProjectError):
    """The server cannot be used now (unreachable, no worker, every replica out): exit code 3."""


class BadAnswer(ServerUnavailable):
    """The server answered something its API never says (a describe that is not a list of versions):
    that server is unusable, like one that is down, and is taken out with this reason."""


class NoSpace(ServerUnavailable):
    """A write failed for want of space (ENOSPC, or EDQUOT: the disk or the quota is full): exit code 3,
    the project's "retry later" (a subclass of ServerUnavailable for that code alone: nothing is wrong
    with the input or the server, and the same command goes on once space is freed, classify_dir's with
    --resume, every row written before kept whole)."""


class KeyRefused(ServerUnavailable):
    """The server refused the key or token we hold and no fresh one could be had: exit code 2."""


class Refused(ProjectError):
    """The server, or a check before it, refused an operation; nothing was changed: exit code 1."""


class RolledBack(ProjectError):
    """A rollout failed part-way and was undone: exit code 1."""


EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_RETRY, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# most specific first: the first matching type gives the code
EXIT_CODES: dict[type[Exception], int] = {KeyRefused: EXIT_USAGE, UserError: EXIT_USAGE,
                                          ServerUnavailable: EXIT_RETRY, Refused: EXIT_FAILED,
                                          RolledBack: EXIT_FAILED}


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
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)


def command(main: Callable, get_args_parser: Callable) -> Callable[[], None]:
    """A module's command (what scripts/NAME.py and `python -m` run): parse the flags, run `main`,
    exit with its code; a known error is one line."""
    def cli() -> None:
        run_main(main, get_args_parser().parse_args())
    cli.__doc__ = f"The command of {main.__module__}."
    return cli
