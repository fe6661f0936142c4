"""One user-facing error type, and the CLI wrapper that turns it into one readable line.

Every check on user input raises `YouzhiError` with a message that names the problem and the fix; the tools print that
message alone (no traceback) and exit with status 2. Anything else is a bug and keeps its traceback.

Ctrl-C (SIGINT) and SIGTERM end a tool with one `interrupted:` line and exit status 130 / 143. Both arrive as
KeyboardInterrupt, so every `atomic_output_dir` on the way out removes its temp directory. The process then ends with
`os._exit`: MindSpore's exit handlers crash (SIGABRT, a page of tracebacks) when the interrupt landed while MindSpore
was still being imported, and there is nothing left for them to do.
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import sys


class YouzhiError(Exception):
    """A problem with the user's input or environment, phrased as 'what is wrong; what to do'."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _end_progress_bars() -> None:
    """Close open tqdm bars, so the message starts on its own line instead of after a half-drawn bar."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or ()):
        try:
            bar.close()
        except Exception:  # a bar that cannot be closed must not hide the message
            pass


def _leave(code: int, message: str) -> None:
    _end_progress_bars()
    print(message, file=sys.stderr)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def cli_main(fn):
    """Decorate a tool's `main()`: YouzhiError -> 'error: <message>' on stderr, exit code 2; Ctrl-C / SIGTERM ->
    'interrupted: ...', exit code 130 / 143."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(*args, **kwargs)
        except YouzhiError as exc:
            if os.environ.get("YOUZHI_TRACEBACK"):
                raise
            _end_progress_bars()
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as exc:
            term = isinstance(exc, Terminated)
            _leave(143 if term else 130,
                   f"interrupted ({'SIGTERM' if term else 'Ctrl-C'}): the output in progress was discarded, finished "
                   "ones are kept; convert_gqa_to_mla.py (same command) and train.py --resume continue where they "
                   "stopped")

    return wrapper
