"""The FreqFold search's worker processes: the same scores as in-process, a lost or failing worker costs time but no
result and no process left behind, and the BLAS of each worker runs one thread."""
import os
import signal

import numpy as np
import pytest

from youzhi_ms.convert import score_workers

PARENT = os.getpid()


def _children():
    with open(f"/proc/{PARENT}/task/{PARENT}/children") as f:
        return f.read().split()


def _square_sum(i):
    rng = np.random.default_rng(i)
    a = rng.normal(size=(64, 64))
    return float(np.linalg.eigvalsh(a @ a.T).sum())


def test_workers_return_what_one_process_returns_in_order():
    before = set(_children())  # processes an earlier test may have left running are not ours to judge
    items = list(range(11))
    ticks = []
    one = score_workers.map_scores(_square_sum, items, 1)
    three = score_workers.map_scores(_square_sum, items, 3, lambda: ticks.append(1))
    np.testing.assert_allclose(three, one, rtol=1e-12)
    assert len(ticks) == len(items) and set(_children()) <= before


def _dies_in_a_worker(i):
    if i == 3 and os.getpid() != PARENT:
        os.kill(os.getpid(), signal.SIGKILL)
    return float(i * i)


def test_a_killed_worker_costs_time_not_results():
    before = set(_children())
    assert score_workers.map_scores(_dies_in_a_worker, list(range(8)), 2) == [float(i * i) for i in range(8)]
    assert set(_children()) <= before


def _fails_on_five(i):
    if i == 5:
        raise ValueError("candidate 5 is broken")
    return float(i)


def test_an_error_in_a_worker_is_raised_here_with_its_message():
    before = set(_children())
    with pytest.raises(ValueError, match="candidate 5 is broken"):
        score_workers.map_scores(_fails_on_five, list(range(8)), 2)
    assert set(_children()) <= before


def _blas_threads(_):
    """The OpenBLAS thread count this process would use, as OpenBLAS reports it."""
    import ctypes
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
    for path in paths:
        lib = ctypes.CDLL(path)
        for name in ("openblas_get_num_threads64_", "openblas_get_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                return float(fn())
    return -1.0


def test_each_worker_runs_one_blas_thread():
    here = _blas_threads(0)
    if here < 0:
        pytest.fail("numpy's OpenBLAS was not found in /proc/self/maps: the workers' thread limit cannot work")
    assert score_workers.map_scores(_blas_threads, [0, 1], 2) == [1.0, 1.0]
    assert _blas_threads(0) == here  # this process keeps its own threads
