"""MindSpore context set-up shared by tools, tests and benchmarks (idempotent), and the filter for MindSpore log lines
known to be harmless here."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

from youzhi_ms import errors

_DONE = False


def init_context(mode: str = "graph", device: str | None = None, seed: int | None = None) -> None:
    """Graph mode on the requested device (default: $YOUZHI_DEVICE or CPU). Safe to call more than once."""
    global _DONE
    # lazy: tools import this module to set up the log filter and answer bad input before MindSpore (seconds) loads
    import mindspore as ms
    if not _DONE:
        ms.set_device(device or os.environ.get("YOUZHI_DEVICE", "CPU"))
        _DONE = True
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    if seed is not None:
        ms.set_seed(seed)


# MindSpore warnings that read like bugs but are expected in youzhi_ms' use, each with the reason:
KNOWN_HARMLESS = (
    # a graph with a dynamic prompt length (generation's prefill): the CPU op expander reports, once per op, that it
    # widened a static dimension to -1
    "does not match original cnode's abstract",
    # MindSpore's compile cache checks only the entry script; youzhi_ms/compile_cache.py keys and orders the entries
    # itself so that a hit is always the graph this process would compile, and says when it loads one
    "compile_dependency.hash failed",
    "Check the consistency of dependency files hash failed",
    "Use the compilation cache and execute the backend actions only",
    # ... and on a planned miss (a graph file removed after an interrupted compile) it says it compiles everything
    "Failed to find cache file, execute all the compilation actions",
)

# Runs in a child process: a filter thread inside this process would need the interpreter lock, which a compile can
# hold while it writes to a full pipe.
_FILTER = r"""
import signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the tool handles it, and
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # this filter ends when its input closes
drop = [p.encode() for p in sys.argv[1:]]
for line in sys.stdin.buffer:
    if not any(p in line for p in drop):
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
"""


@contextlib.contextmanager
def quiet_known_warnings(patterns=KNOWN_HARMLESS):
    """Drop MindSpore's known-harmless log lines from stderr (file descriptor 2, where its C++ logger writes) for the
    duration; every other line passes through. Set YOUZHI_MS_LOG=all to see everything."""
    if os.environ.get("YOUZHI_MS_LOG") == "all":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FILTER, *patterns], stdin=subprocess.PIPE,
                                stdout=saved, stderr=saved, close_fds=True)
    except OSError:
        os.close(saved)
        yield  # no way to filter here: show everything
        return
    os.dup2(proc.stdin.fileno(), 2)
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        if errors._saved_stderr is not None:
            # an interrupt muted stderr inside this block and saved a copy of our pipe to restore later: make that
            # copy the real stderr instead (the pipe's reader is about to end), and stay muted until the tool's line
            os.dup2(saved, errors._saved_stderr)
        else:
            os.dup2(saved, 2)
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.close(saved)
