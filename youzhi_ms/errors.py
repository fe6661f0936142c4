"""One user-facing error type, and the CLI wrapper that turns it into one readable line.

Every check on user input raises `YouzhiError` with a message that names the problem and the fix; the tools print that
message alone (no traceback) and exit with status 2. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import os
import sys


class YouzhiError(Exception):
    """A problem with the user's input or environment, phrased as 'what is wrong; what to do'."""


def cli_main(fn):
    """Decorate a tool's `main()`: YouzhiError -> 'error: <message>' on stderr, exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except YouzhiError as exc:
            if os.environ.get("YOUZHI_TRACEBACK"):
                raise
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted; partial outputs were discarded (re-run to resume where supported)", file=sys.stderr)
            sys.exit(130)

    return wrapper
