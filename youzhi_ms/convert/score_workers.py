"""Part of stage 3 of 5: the FreqFold search's candidates scored in forked worker processes, one BLAS thread each.

Why processes: a candidate's build and score are many small numpy/LAPACK calls (eigendecompositions of a few hundred
rows, softmaxes, elementwise work) that one BLAS thread per call cannot spread over the cores, while the candidates are
independent. Why fork: the workers inherit the layer's statistics, the cached band PCAs and the scoring windows
(hundreds of MB for a 7B layer) copy-on-write, so nothing is serialised, and each worker sends back only
(candidate index, float64 score) records through a pipe. No pickle.

If a worker dies (out of memory, a signal) or its function raises, the candidates it did not deliver are scored again
in this process, so an error surfaces here with its own message and a lost worker costs time, never a result. Where
fork does not exist, or for one worker, the candidates are scored in this process, in order.
"""
from __future__ import annotations

import ctypes
import os
import select
import signal
import struct
from typing import Callable, List, Optional, Sequence

import numpy as np

RECORD = struct.Struct("<qd")  # candidate index, score
MAX_AUTO_WORKERS = 8  # a many-core host: each worker holds its own temporaries (~0.3 GB for a 7B layer)


def default_workers() -> int:
    """The cores this process may run on, at most MAX_AUTO_WORKERS."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_AUTO_WORKERS))


def _one_blas_thread() -> None:
    """Ask every OpenBLAS loaded in this process for one thread: a worker's share of the cores is its own process."""
    names = ("openblas_set_num_threads64_", "openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
             "scipy_openblas_set_num_threads")
    try:
        with open("/proc/self/maps") as maps:
            paths = {parts[-1] for parts in (line.split() for line in maps) if len(parts) >= 6}
        libs = {p for p in paths if "blas" in os.path.basename(p).lower() and ".so" in os.path.basename(p)}
    except OSError:
        return
    for path in libs:
        if not os.path.isfile(path):
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in names:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(1)
                break


def _die_with_parent() -> None:
    """Linux: the worker gets SIGKILL when the converter exits, so a stopped conversion leaves no process behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(fn: Callable, items: Sequence, indices: Sequence[int], fd: int) -> None:
    """In the forked child: score `indices`, write one record each; never returns."""
    status = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills the workers
        _die_with_parent()
        _one_blas_thread()
        for i in indices:
            value = float(fn(items[i]))
            os.write(fd, RECORD.pack(i, value))
    except BaseException:  # the parent scores what is missing itself, and raises the error there
        status = 1
    finally:
        os._exit(status)


def map_scores(fn: Callable, items: Sequence, workers: int = 1,
               done: Optional[Callable[[], None]] = None) -> List[float]:
    """[fn(item) for item in items], computed by up to `workers` forked processes; done() after every item."""
    n = len(items)
    out = [np.nan] * n
    k = min(max(1, workers), n)
    if k < 2 or not hasattr(os, "fork"):
        for i, item in enumerate(items):
            out[i] = float(fn(item))
            if done is not None:
                done()
        return out
    got = [False] * n
    children = {}  # read fd -> pid
    buffers = {}
    try:
        for j in range(k):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # child
                os.close(r)
                _worker(fn, items, range(j, n, k), w)
            os.close(w)
            children[r] = pid
            buffers[r] = b""
        while children:
            ready, _, _ = select.select(list(children), [], [])
            for r in ready:
                chunk = os.read(r, 1 << 16)
                if not chunk:  # the worker finished or died
                    os.close(r)
                    os.waitpid(children.pop(r), 0)
                    continue
                buf = buffers[r] + chunk
                whole = len(buf) - len(buf) % RECORD.size
                for i, value in RECORD.iter_unpack(buf[:whole]):
                    out[i], got[i] = value, True
                    if done is not None:
                        done()
                buffers[r] = buf[whole:]
    finally:
        for r, pid in children.items():  # interrupted: stop and reap the workers still running
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
            os.close(r)
    for i in range(n):
        if not got[i]:  # a worker died or raised: score it here (the error, if any, is raised here)
            out[i] = float(fn(items[i]))
            if done is not None:
                done()
    return out
