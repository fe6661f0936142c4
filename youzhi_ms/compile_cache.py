"""Reuse compiled MindSpore graphs across invocations, safely.

MindSpore's compile cache (`enable_compile_cache`) saves each compiled graph as `compile_cache_<k>.mindir`, where k
counts the cache-enabled compiles of the process, and on a later run hands back graph k for the k-th cache-enabled
compile without checking that it is the same graph: measured with MindSpore 2.10 on CPU, a prefill compiled for a
5-token prompt was returned for a 9-token prompt (wrong output shape, no error), and its own check only hashes the entry
script, not the youzhi_ms modules the graph is built from. So a `GraphCache` directory is keyed by everything that
shapes its graphs (the youzhi_ms sources, the MindSpore version and device, the model config, dtype, shapes, and the
planned graphs in order), the cache is switched on only around the planned compiles, in plan order, and a graph
outside the plan compiles with it switched off. A hit then always returns the graph this process would have compiled.

Measured on SmolLM2-135M (CPU, 2 cores, docs/benchmarks.md section 8): the prefill and decode graphs take 5-10 s each
to compile at load average ~4 (15-25 s at ~9) and 0.9 s each to load from the cache (3-6 s at ~9). Weights are not in the cache (they are graph inputs), so one entry
serves every checkpoint with the same config.

`YOUZHI_COMPILE_CACHE=0` turns it off; `YOUZHI_COMPILE_CACHE=DIR` moves it (default: the data cache's `compile/`).
The cache is switched through MindSpore's environment variables (MS_COMPILER_CACHE_ENABLE / _PATH), which it reads at
every compile; `set_context(enable_compile_cache=...)` does the same but prints a deprecation warning each time.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Optional, Sequence

import mindspore as ms

from youzhi_ms.data.text import cache_dir
from youzhi_ms.progress import step
from youzhi_ms.runtime import quiet_known_warnings

MARKER = "youzhi_graph_cache.json"
KEEP_ENTRIES = 32  # least recently used entries beyond this are removed (each is ~10 MB for SmolLM2)

_active: Optional["GraphCache"] = None  # MindSpore reads the cache path once per process: one cache per process


def _sources_digest() -> str:
    """sha256 over the youzhi_ms package sources and the entry script (any edit is a new cache entry)."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    files = []
    for root, dirs, names in os.walk(pkg):
        dirs.sort()
        files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".py")]
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if main and os.path.isfile(main):
        files.append(os.path.abspath(main))
    for path in files:
        h.update(os.path.relpath(path, pkg).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def cache_root() -> Optional[str]:
    setting = os.environ.get("YOUZHI_COMPILE_CACHE", "")
    if setting.lower() in ("0", "off", "false", "no"):
        return None
    if setting:
        return os.path.abspath(os.path.expanduser(setting))
    return os.path.join(cache_dir(), "compile")


class GraphCache:
    """The compile-cache entry for one planned sequence of graphs.

    purpose: a short name ("generate", "ppl"); key: JSON-able description of what shapes the graphs besides the code
    and the plan (model config, dtype); plan: the signatures (name and input shapes) of the graphs the process
    compiles, in order. Use `with cache.compiling(signature, what):` around the first call of each graph.
    """

    def __init__(self, purpose: str, key: dict, plan: Sequence[str], root: Optional[str] = None):
        self.plan = list(plan)
        self.done = 0  # planned graphs compiled (or loaded) so far, with the cache on
        self.path = None
        root = cache_root() if root is None else root
        if root is None:
            return
        global _active
        if _active is not None:
            return  # MindSpore fixes the cache path at the first use: later plans in this process compile uncached
        full = {"purpose": purpose, "key": key, "plan": self.plan, "sources": _sources_digest(),
                "mindspore": ms.__version__, "device": ms.get_context("device_target")}
        digest = hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:24]
        self.path = os.path.join(root, f"{purpose}-{digest}")
        os.makedirs(self.path, exist_ok=True)
        with self._locked():
            if not os.path.isfile(self._marker):
                self._write_marker({"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "compiled": [], **full})
            os.utime(self._marker)  # recency, for pruning
        os.environ["MS_COMPILER_CACHE_PATH"] = self.path
        os.environ["MS_COMPILER_CACHE_ENABLE"] = "0"  # on only around the planned compiles
        _active = self
        _prune(root, keep=self.path)

    @property
    def _marker(self) -> str:
        return os.path.join(self.path, MARKER)

    @contextlib.contextmanager
    def _locked(self):
        """Exclusive per entry: a concurrent run of the same plan waits for a compile, then loads its result."""
        with open(os.path.join(self.path, ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _write_marker(self, info: dict) -> None:
        tmp = self._marker + ".tmp"
        with open(tmp, "w") as f:
            json.dump(info, f, indent=1, default=str)
        os.replace(tmp, self._marker)

    def _read_marker(self) -> dict:
        with open(self._marker) as f:
            return json.load(f)

    def _graph_file(self, k: int) -> str:
        return os.path.join(self.path, "rank_0", "graph_cache", f"compile_cache_{k}.mindir")

    @contextlib.contextmanager
    def compiling(self, graph: str, what: str):
        """Around the first call of `graph`: a status line while it compiles (or loads), the cache on only if `graph`
        is the next planned one."""
        planned = self.path is not None and self.done < len(self.plan) and self.plan[self.done] == graph
        if not planned:
            with announce_compile(what):
                yield
            return
        k = self.done
        with self._locked():
            compiled = self._read_marker().get("compiled", [])
            hit = len(compiled) > k and compiled[k] == graph and os.path.isfile(self._graph_file(k))
            if not hit and os.path.exists(self._graph_file(k)):
                os.remove(self._graph_file(k))  # left by a run that died mid-compile: never load it
            os.environ["MS_COMPILER_CACHE_ENABLE"] = "1"
            try:
                with announce_compile(what, loading=hit):
                    yield
            finally:
                os.environ["MS_COMPILER_CACHE_ENABLE"] = "0"
            self.done += 1
            if not hit and os.path.isfile(self._graph_file(k)):
                info = self._read_marker()
                info["compiled"] = info.get("compiled", [])[:k] + [graph]
                self._write_marker(info)


@contextlib.contextmanager
def announce_compile(what: str, loading: bool = False):
    """Status lines around a graph's first call, with MindSpore's known-harmless compile warnings filtered out."""
    label = f"loading {what} from the compile cache" if loading else f"compiling {what} (first call only)"
    with step(label), quiet_known_warnings():
        yield


def _prune(root: str, keep: str) -> None:
    """Remove the least recently used entries beyond KEEP_ENTRIES (only directories this module created)."""
    try:
        entries = [os.path.join(root, n) for n in os.listdir(root)]
    except OSError:
        return
    ours = [p for p in entries if os.path.isfile(os.path.join(p, MARKER)) and p != keep]
    if len(ours) < KEEP_ENTRIES:
        return
    ours.sort(key=lambda p: os.path.getmtime(os.path.join(p, MARKER)))
    for p in ours[:len(ours) - KEEP_ENTRIES + 1]:
        shutil.rmtree(p, ignore_errors=True)
