"""User-facing errors: one line naming the file (and line) at fault, exit code 2."""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A mistake in the user's input or flags; reported without a traceback."""


def run_main(main: Callable, args) -> None:
    """Run a CLI's `main(args)`, turning a UserError into `error: ...` and exit code 2."""
    try:
        main(args)
    except UserError as e:
        # A DataLoader worker re-raises with its traceback in the message: keep the last line.
        message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        message = message.removeprefix("training.errors.UserError: ")
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
