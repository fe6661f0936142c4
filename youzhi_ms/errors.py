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
MindSpore replaces the SIGINT handler at every graph compile and run with one that sends the process a SIGTERM, so once
a graph has run a Ctrl-C ends with 143 and the line says `Ctrl-C or SIGTERM`.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import shutil
import signal
import sys


class YouzhiError(Exception):
    """A problem with the user's input or environment, phrased as 'what is wrong; what to do'."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs."""


_saved_stderr = None  # fd of the real stderr while it is muted after a signal
_sigint_c_handler = None  # the C-level SIGINT handler right after cli_main installed ours


def _c_handler(signum: int):
    """The C-level handler address of `signum` (sigaction's first field), or None where it cannot be read."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(256)  # larger than any libc's struct sigaction
        if libc.sigaction(signum, None, buf) != 0:
            return None
        return ctypes.c_void_p.from_buffer(buf).value
    except (OSError, AttributeError, ValueError):
        return None


def _sigint_taken_over() -> bool:
    """True once MindSpore has replaced our SIGINT handler. It installs its own at every graph compile and run (MindSpore
    2.10, measured), and that handler turns Ctrl-C into a SIGTERM to the process: from then on the two cannot be told
    apart."""
    now = _c_handler(signal.SIGINT)
    return _sigint_c_handler is not None and now is not None and now != _sigint_c_handler


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


_signalled = None  # the first interrupt's signal number, kept in case the KeyboardInterrupt is swallowed


def raise_if_interrupted() -> None:
    """Raise the interrupt again if one arrived and was swallowed on its way out: a KeyboardInterrupt raised inside a
    Python callback that MindSpore's C++ calls during a compile can be caught there (seen once in ~20 interrupted
    compiles), and the tool then ran on with stderr muted. Output commits and cli_main check this first."""
    if _signalled is not None:
        raise Terminated() if _signalled == signal.SIGTERM else KeyboardInterrupt()


def _interrupt(signum):
    global _saved_stderr, _signalled
    if _signalled is None:
        _signalled = signum
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


def _interrupted(term: bool, notes) -> None:
    if _unmute_stderr():
        sys.stderr.write("\n")  # a bar closed while stderr was muted never ended its line
    name = ("Ctrl-C or SIGTERM" if _sigint_taken_over() else "SIGTERM") if term else "Ctrl-C"
    notes = "; ".join(notes) or ("the output in progress was discarded, finished ones are kept; convert_gqa_to_mla.py "
                                 "(same command) and train.py --resume continue where they stopped")
    _leave(143 if term else 130, f"interrupted ({name}): {notes}")


MAX_MESSAGE = 600  # characters of an error line: a message quoting hostile input (a yaml value, a header) is cut


def one_line(message: str) -> str:
    """The message on one line (a quoted multi-line value or a library's message keeps no line breaks), cut in the
    middle if longer than MAX_MESSAGE so that both the problem and the fix at its end stay visible."""
    text = " ".join(message.split())
    if len(text) > MAX_MESSAGE:
        text = f"{text[:MAX_MESSAGE - 200]} [... {len(text) - MAX_MESSAGE + 5} characters cut ...] {text[-195:]}"
    return text


def disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_message(exc: OSError) -> str:
    """A full disk as one line: where, how much is free there, and what the job kept for a resume (the notes that the
    writers on the way out added: layers kept, the newest checkpoint, how far the removed output had got)."""
    where, free = exc.filename, ""
    if where:
        with contextlib.suppress(OSError, TypeError, ValueError):
            free = f", {shutil.disk_usage(os.path.dirname(os.path.abspath(where))).free / 2**20:.1f} MiB free there"
    notes = "; ".join(getattr(exc, "__notes__", ())) or "nothing was kept"
    return (f"the disk is full ({os.strerror(exc.errno)}) while writing {where or 'the output'}{free}; {notes}. "
            "Free some space or "
            "choose an output on a larger disk, then run the same command again")


def cli_main(fn):
    """Decorate a tool's `main()`: YouzhiError -> 'error: <message>' on stderr, exit code 2; Ctrl-C / SIGTERM ->
    'interrupted: ...', exit code 130 / 143."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig, handler in previous.items():
            if handler not in (signal.SIG_IGN, None):  # a process started with the signal ignored keeps it so
                signal.signal(sig, _on_signal)
        global _sigint_c_handler, _signalled
        _sigint_c_handler = _c_handler(signal.SIGINT)
        _signalled = None
        try:
            result = fn(*args, **kwargs)
            raise_if_interrupted()
            return result
        except YouzhiError as exc:
            if os.environ.get("YOUZHI_TRACEBACK"):
                raise
            _end_progress_bars()
            print(f"error: {one_line(str(exc))}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as exc:
            _interrupted(isinstance(exc, Terminated), getattr(exc, "__notes__", ()))
        except BaseException as exc:
            if disk_full(exc) and not os.environ.get("YOUZHI_TRACEBACK") and _signalled is None:
                _end_progress_bars()
                print(f"error: {one_line(disk_full_message(exc))}", file=sys.stderr)
                sys.exit(2)
            if _signalled is not None and not isinstance(exc, SystemExit):
                # the interrupt surfaced as another error: MindSpore turns a KeyboardInterrupt raised inside a compile
                # into a RuntimeError ("analyze_fail.ir") now and then
                _interrupted(_signalled == signal.SIGTERM, ())
            _unmute_stderr()  # anything else on the way out keeps its traceback, visibly
            raise
        finally:  # in-process callers (tests) get their own handlers back
            for sig, handler in previous.items():
                if handler is not None:
                    signal.signal(sig, handler)

    return wrapper
