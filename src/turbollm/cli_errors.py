"""How a command-line entry point ends: bad input is one line on stderr, never a traceback."""
from __future__ import annotations

import sys
from typing import Callable

# What a user's flags, files or requests can raise (the engine's own checks raise these)
USER_ERRORS = (ValueError, FileNotFoundError, NotImplementedError)


def run_reporting_errors(run: Callable[[], int | None], label: str) -> int:
    """run()'s exit code; 2 with `label: error: ...` on stderr for a user error, 130 on ^C."""
    try:
        return int(run() or 0)
    except USER_ERRORS as e:
        print(f"{label}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
