"""llama.cpp as an inference engine, through the C API that llama-cpp-python ships (`llama_cpp`, ctypes): load a GGUF,
decode batches of tokens from several sequences at once, read logits, and read back what the engine allocated for its
KV cache (from its own log line, "llama_kv_cache: size = ... K (f16): ... MiB, V (f16): ... MiB").

The low-level API, not llama-cpp-python's high-level `Llama` class: that one runs one sequence, while the benchmark
needs several sequences in one batch (a llama_batch entry per token with its sequence id), the cache size as the
engine reports it, and f32 caches for the exactness tests.
"""
from __future__ import annotations

import ctypes
import os
import re
import threading
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from youzhi_ms.errors import YouzhiError

INSTALL_HINT = ("pip install llama-cpp-python==0.3.36 (it builds llama.cpp from source, ~20 min on 2 cores; "
                "run_scripts/setup_env.sh --test does it with the flags CI uses)")
GGML_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "bf16": 30}
_KV_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers, +(\d+)/(\d+) seqs\), "
                      r"K \((\w+)\): +([\d.]+) MiB, V \((\w+)\): +([\d.]+) MiB")
MIB = 1 << 20

_lib = None
_log_lock = threading.Lock()
_log_lines: List[str] = []
_log_partial = [""]
_log_count = [0]  # lines logged since start-up; _log_lines keeps the newest LOG_KEEP of them
LOG_KEEP = 4000
_log_cb = None  # the ctypes callback must outlive every call into the library


def lib():
    """The llama_cpp module, initialised once with the log routed into `_log_lines` (not onto stderr)."""
    global _lib, _log_cb
    if _lib is not None:
        return _lib
    try:
        import llama_cpp  # optional: the module loads without it, and saying how to install it is this function's job
    except ImportError:
        raise YouzhiError(f"llama.cpp is not installed; {INSTALL_HINT}") from None
    except (OSError, RuntimeError) as exc:  # the package is there but its shared library does not load
        raise YouzhiError(f"llama.cpp's library does not load ({str(exc).splitlines()[0]}); reinstall: "
                          f"{INSTALL_HINT}") from None

    def on_log(level, text, user_data):
        with _log_lock:
            s = _log_partial[0] + (text.decode("utf-8", "replace") if text else "")
            *done, _log_partial[0] = s.split("\n")
            _log_lines.extend(done)
            _log_count[0] += len(done)
            del _log_lines[:-LOG_KEEP]  # a bounded memory of the log

    _log_cb = llama_cpp.llama_log_callback(on_log)
    llama_cpp.llama_log_set(_log_cb, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    _lib = llama_cpp
    return _lib


def log_count() -> int:
    with _log_lock:
        return _log_count[0]


def log_since(count: int) -> List[str]:
    """The log lines written after `log_count()` returned `count` (as many of them as are still kept)."""
    with _log_lock:
        first_kept = _log_count[0] - len(_log_lines)
        return list(_log_lines[max(0, count - first_kept):])


def version() -> str:
    import llama_cpp  # optional (llama-cpp-python, the test extra): see lib()
    return getattr(llama_cpp, "__version__", "?")


@dataclass
class KVCache:
    """What llama.cpp logged when it allocated the cache (MiB rounded to 0.01 by the engine's log)."""
    cells: int  # per stream
    layers: int
    n_seq_max: int
    streams: int
    type_k: str
    k_mib: float
    type_v: str
    v_mib: float

    @property
    def total_cells(self) -> int:
        return self.cells * self.streams

    @property
    def bytes(self) -> float:
        return (self.k_mib + self.v_mib) * MIB

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.total_cells


class Engine:
    """One llama.cpp model + context. `n_ctx`: KV cells in all; `n_seq_max`: sequences decoded together (each gets
    n_ctx / n_seq_max cells unless `kv_unified`); `type_kv`: cache element type; `flash_attn`: None = llama.cpp's auto."""

    def __init__(self, gguf_path: str, n_ctx: int = 512, n_seq_max: int = 1, n_batch: int = 512,
                 n_threads: Optional[int] = None, type_kv: str = "f16", flash_attn: Optional[bool] = None,
                 kv_unified: bool = False):
        L = lib()
        if not os.path.isfile(gguf_path):
            raise YouzhiError(f"{gguf_path} does not exist; pass a .gguf file (tools/export_gguf.py writes one)")
        self._L = L
        self.path = gguf_path
        self.model = self.ctx = None
        start = log_count()
        mp = L.llama_model_default_params()
        # no repacked weight buffers: with them, any quantized file (Q4_1 / Q8_0, llama.cpp's own conversions too)
        # ends in a general protection fault inside libggml-cpu on this AVX-512 machine (llama.cpp 0c1e57098 built
        # with GGML_NATIVE, measured 2026-12-07); f32 / f16 weights are not repacked either way
        mp.use_extra_bufts = False
        self.model = L.llama_model_load_from_file(gguf_path.encode(), mp)
        if not self.model:
            raise YouzhiError(f"llama.cpp could not load {gguf_path}: {self._errors(start)}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, n_seq_max
        cp.n_threads = cp.n_threads_batch = n_threads or os.cpu_count() or 1
        cp.type_k = cp.type_v = GGML_TYPES[type_kv]
        cp.flash_attn_type = -1 if flash_attn is None else int(bool(flash_attn))
        cp.kv_unified = kv_unified
        cp.no_perf = True
        start = log_count()
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            self.close()
            raise YouzhiError(f"llama.cpp could not create a context for {gguf_path}: {self._errors(start)}")
        self.kv = self._kv_from_log(start)
        if self.kv is None:
            self.close()
            raise YouzhiError("llama.cpp did not log its KV cache allocation (llama_kv_cache: size = ...); this "
                              f"version of llama.cpp is not the one youzhi_ms reads ({INSTALL_HINT})")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.n_ctx = L.llama_n_ctx(self.ctx)
        self.n_batch = n_batch
        self.n_seq_max = n_seq_max
        self._batch = L.llama_batch_init(n_batch, 0, max(1, n_seq_max))

    @staticmethod
    def _errors(start: int) -> str:
        lines = [ln.strip() for ln in log_since(start) if ln.strip()]
        bad = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower() or "assert" in ln.lower()]
        return "; ".join((bad or lines)[-3:]) or "no reason logged"

    @staticmethod
    def _kv_from_log(start: int) -> Optional[KVCache]:
        for ln in log_since(start):
            m = _KV_LINE.search(ln)
            if m:
                g = m.groups()
                return KVCache(int(g[1]), int(g[2]), int(g[3]), int(g[4]), g[5], float(g[6]), g[7], float(g[8]))
        return None

    # ------------------------------------------------------------------------------------------------ decoding
    def decode(self, entries: Sequence[Tuple[int, int, int, bool]]) -> int:
        """One llama_decode of (token, position, sequence id, want logits) entries; returns llama.cpp's status
        (0 ok, 1 no room in the KV cache for this batch)."""
        if len(entries) > self.n_batch:
            raise YouzhiError(f"a batch of {len(entries)} tokens exceeds n_batch {self.n_batch}")
        b = self._batch
        for i, (tok, pos, seq, out) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if out else 0
        b.n_tokens = len(entries)
        return self._L.llama_decode(self.ctx, b)

    def logits(self, i: int) -> np.ndarray:
        """A copy of the float32 logits of output `i` of the last decode (-1: the last output)."""
        p = self._L.llama_get_logits_ith(self.ctx, i)
        if not p:
            raise YouzhiError(f"llama.cpp has no logits for output {i} of the last batch")
        return np.ctypeslib.as_array(p, shape=(self.n_vocab,)).copy()

    def forward(self, tokens: Sequence[int], seq: int = 0, start: int = 0, all_logits: bool = True):
        """Decode `tokens` of sequence `seq` from position `start` in n_batch chunks; yields the logits [n, V] of each
        chunk (every position when `all_logits`, else only the last position of the last chunk)."""
        tokens = list(tokens)
        for c0 in range(0, len(tokens), self.n_batch):
            chunk = tokens[c0:c0 + self.n_batch]
            last = c0 + len(chunk) == len(tokens)
            rc = self.decode([(t, start + c0 + i, seq, all_logits or (last and i == len(chunk) - 1))
                              for i, t in enumerate(chunk)])
            if rc != 0:
                raise YouzhiError(f"llama_decode returned {rc} at position {start + c0} of sequence {seq} "
                                  f"(1: the KV cache of {self.n_ctx} cells is full)")
            if all_logits:
                yield np.stack([self.logits(i) for i in range(len(chunk))])
            elif last:
                yield self.logits(-1)[None]

    def greedy(self, prompt: Sequence[int], n_new: int, seq: int = 0) -> Tuple[List[int], np.ndarray]:
        """Greedy continuation of `prompt`: (new tokens, logits [len(prompt) + n_new - 1, V] of every position)."""
        rows = list(self.forward(prompt, seq))
        out = []
        for k in range(n_new):
            nxt = int(rows[-1][-1].argmax())
            out.append(nxt)
            if k + 1 < n_new:
                rows += list(self.forward([nxt], seq, start=len(prompt) + k))
        return out, np.concatenate(rows)[: len(prompt) + n_new - 1]

    def nll(self, tokens: Sequence[int], seq: int = 0) -> np.ndarray:
        """Negative log-likelihood of tokens[1:] given their prefixes (float64), one chunk of logits at a time."""
        tokens = list(tokens)
        out, pos = [], 0
        for rows in self.forward(tokens, seq):
            rows = rows.astype(np.float64)
            lse = np.log(np.exp(rows - rows.max(1, keepdims=True)).sum(1)) + rows.max(1)
            for i in range(len(rows)):
                if pos + i + 1 < len(tokens):
                    out.append(lse[i] - rows[i, tokens[pos + i + 1]])
            pos += len(rows)
        return np.array(out)

    def seq_cp(self, src: int, dst: int) -> None:
        self._L.llama_memory_seq_cp(self._L.llama_get_memory(self.ctx), src, dst, -1, -1)

    def seq_rm(self, seq: int) -> None:
        self._L.llama_memory_seq_rm(self._L.llama_get_memory(self.ctx), seq, -1, -1)

    def clear(self) -> None:
        self._L.llama_memory_clear(self._L.llama_get_memory(self.ctx), True)

    def tokenize(self, text: str, add_special: bool = False) -> List[int]:
        L = self._L
        vocab = L.llama_model_get_vocab(self.model)
        raw = text.encode("utf-8")
        n = len(raw) + 8
        buf = (L.llama_token * n)()
        got = L.llama_tokenize(vocab, raw, len(raw), buf, n, add_special, False)
        if got < 0:
            raise YouzhiError(f"llama.cpp could not tokenize {len(raw)} bytes")
        return list(buf[:got])

    def close(self) -> None:
        L = self._L
        if getattr(self, "_batch", None) is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            L.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
