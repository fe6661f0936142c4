"""One user-facing error type, and the CLI wrapper that turns it into one readable line.

Every check on user input raises `YouzhiError` with a message that names the problem and the fix; the tools print that
message alone (no traceback) and exit with status 2. Anything else is a bug and keeps its traceback.

Ctrl-C (SIGINT) and SIGTERM end a tool with one `interrupted` line and exit status 130 / 143. Both arrive as
KeyboardInterrupt, so every `atomic_output_dir` on the way out removes its temp directory; a job that keeps resumable
state adds a note to the interrupt saying where (the line shows it). From the signal on, stderr
is muted until that line is printed: an interrupt landing inside a MindSpore graph compile makes MindSpore log the
interrupted Python stack as an [ERROR] (a hundred lines) before it lets the KeyboardInterrupt through. The process
then ends with `os._exit`: MindSpore's exit handlers can crash (SIGABRT, a page of tracebacks) after an interrupt, and
there is nothing left for them to do. An interrupt during MindSpore's own import waits until that import is done
(raised inside it, it breaks MindSpore's C++ module initialisation). Before a tool's main() runs, tools/_bootstrap.py
ends the process quietly; only the interpreter's first ~0.1 s (before any tool code) keeps Python's own traceback.
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


_saved_stderr = None  # fd of the real stderr while it is muted after a signal


_pending = []  # a signal that arrived while MindSpore was being imported


def _importing_mindspore() -> bool:
    return any(name.partition(".")[0] == "mindspore" and getattr(getattr(mod, "__spec__", None), "_initializing", 0)
               for name, mod in list(sys.modules.items()))


def _retry(signum, frame):
    if _importing_mindspore():
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        return
    _interrupt(_pending.pop())


def _on_signal(signum, frame):
    """An interrupt raised inside MindSpore's import breaks its C++ module initialisation (ImportError, then SIGABRT
    at exit), so there it waits, re-checked every 0.1 s, until the import is done."""
    if _importing_mindspore():
        _pending.append(signum)
        signal.signal(signal.SIGALRM, _retry)
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        return
    _interrupt(signum)


def _interrupt(signum):
    global _saved_stderr
    if _saved_stderr is None:
        try:
            sys.stderr.flush()
            _saved_stderr = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except OSError:
            pass
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _unmute_stderr() -> bool:
    """Give stderr back; True if it was muted (then a progress bar may have been left mid-line)."""
    global _saved_stderr
    was = _saved_stderr is not None
    if _saved_stderr is not None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(_saved_stderr, 2)
        os.close(_saved_stderr)
        _saved_stderr = None
    return was


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
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig, handler in previous.items():
            if handler not in (signal.SIG_IGN, None):  # a process started with the signal ignored keeps it so
                signal.signal(sig, _on_signal)
        try:
            return fn(*args, **kwargs)
        except YouzhiError as exc:
            if os.environ.get("YOUZHI_TRACEBACK"):
                raise
            _end_progress_bars()
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as exc:
            if _unmute_stderr():
                sys.stderr.write("\n")  # a bar closed while stderr was muted never ended its line
            term = isinstance(exc, Terminated)
            notes = "; ".join(getattr(exc, "__notes__", ())) or \
                ("the output in progress was discarded, finished ones are kept; convert_gqa_to_mla.py (same command) "
                 "and train.py --resume continue where they stopped")
            _leave(143 if term else 130, f"interrupted ({'SIGTERM' if term else 'Ctrl-C'}): {notes}")
        except BaseException:  # anything else on the way out keeps its traceback, visibly
            _unmute_stderr()
            raise
        finally:  # in-process callers (tests) get their own handlers back
            for sig, handler in previous.items():
                if handler is not None:
                    signal.signal(sig, handler)

    return wrapper
