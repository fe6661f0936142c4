"""MindSpore context set-up shared by tools, tests and benchmarks (idempotent)."""
from __future__ import annotations

import os

_DONE = False


def init_context(mode: str = "graph", device: str | None = None, seed: int | None = None) -> None:
    """Graph mode on the requested device (default: $YOUZHI_DEVICE or CPU). Safe to call more than once."""
    global _DONE
    import mindspore as ms
    if not _DONE:
        ms.set_device(device or os.environ.get("YOUZHI_DEVICE", "CPU"))
        _DONE = True
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    if seed is not None:
        ms.set_seed(seed)
