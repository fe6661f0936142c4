"""Token generation over the static-cache decode path, for source (GQA cache k/v) and converted (MLA latent cache)
models alike: one prefill, then one compiled decode step per token against a preallocated cache."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, List, Optional

import mindspore as ms
import numpy as np

from youzhi_ms.compile_cache import announce_compile
from youzhi_ms.config import MLAConfig
from youzhi_ms.models.base import DecodeCell, PrefillCell


def cache_shapes(cfg, batch: int, max_len: int):
    """The two cache tensors' shapes and their sequence axis: GQA k/v [L,B,kv,T,d]; MLA c_kv [L,B,T,r], k_pe."""
    if isinstance(cfg, MLAConfig):
        return ((cfg.num_layers, batch, max_len, cfg.kv_lora_rank),
                (cfg.num_layers, batch, max_len, cfg.qk_rope_head_dim)), 2
    shp = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    return (shp, shp), 3


def decode_state(runner, prefilled, batch: int, max_len: int) -> tuple:
    """The decode state after a prefill: each cache the prefill returned (the model's `cache_names`: GQA k and v, MLA
    c_kv and k_pe) at the start of a zeroed cache of length max_len, as `runner.to_state` takes it."""
    shapes, axis = cache_shapes(runner.cfg, batch, max_len)
    state = []
    for arr, shape in zip(prefilled, shapes):
        full = np.zeros(shape, np.float32)
        idx = [slice(None)] * len(shape)
        idx[axis] = slice(0, arr.shape[axis])
        full[tuple(idx)] = arr
        state.append(runner.to_state(full))
    return tuple(state)


def sample_next(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy when temperature == 0; else softmax(logits / T) restricted to the smallest top-p nucleus."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))


class EagerRunner:
    """Prefill + decode cells of an in-memory MindSpore model (graph-compiled on first use).

    dynamic_length: compile the prefill once for every prompt length (MindSpore dynamic shape; bit-identical outputs)
    instead of once per length. graph_cache: a `youzhi_ms.compile_cache.GraphCache` whose plan is `graph_plan(B, T)`,
    to load both graphs from an earlier run. Each first compile (or load) is announced on stderr.
    """

    def __init__(self, model, cfg, dynamic_length: bool = False, graph_cache=None):
        self.cfg, self.model = cfg, model
        self.dynamic_length, self.graph_cache = dynamic_length, graph_cache
        self.prefill_cell, self.decode_cell = PrefillCell(model), DecodeCell(model)
        self._prefill_batch = None  # the batch the dynamic-length prefill was compiled for
        self._seen = set()

    def graph_plan(self, batch: int, max_len: int):
        """The graphs one generation at cache length max_len compiles, in order (a GraphCache plan)."""
        shapes, _ = cache_shapes(self.cfg, batch, max_len)
        return [self._prefill_signature(batch, None), self._decode_signature((batch, 1), shapes)]

    def _prefill_signature(self, batch, length):
        return f"prefill ids[{batch}, {'None' if self.dynamic_length else length}]"

    @staticmethod
    def _decode_signature(ids_shape, cache_shapes_):
        return f"decode ids{list(ids_shape)} caches{[list(c) for c in cache_shapes_]}"

    def _first_call(self, signature: str, what: str):
        """A context for the call that compiles `signature` (or a no-op when it is compiled already)."""
        if signature in self._seen:
            return contextlib.nullcontext()
        self._seen.add(signature)
        if self.graph_cache is not None:
            return self.graph_cache.compiling(signature, what)
        return announce_compile(what)

    def prefill(self, ids: np.ndarray):
        b, s = ids.shape
        if self.dynamic_length:
            if self._prefill_batch is None:
                self.prefill_cell.set_inputs(ms.Tensor(shape=[b, None], dtype=ms.int32))
                self._prefill_batch = b
            elif b != self._prefill_batch:
                raise ValueError(f"prefill batch {b}: this runner's dynamic-length prefill is compiled for batch "
                                 f"{self._prefill_batch}")
        with self._first_call(self._prefill_signature(b, s), "the prefill graph"):
            logits, a, c = self.prefill_cell(ms.Tensor(ids.astype(np.int32)))
            logits = logits.asnumpy()
        return logits, a.asnumpy(), c.asnumpy()

    def decode(self, ids: np.ndarray, pos: np.ndarray, *caches):
        with self._first_call(self._decode_signature(ids.shape, [c.shape for c in caches]), "the decode graph"):
            logits, a, b = self.decode_cell(ms.Tensor(ids.astype(np.int32)), ms.Tensor(pos.astype(np.int32)),
                                            *caches)
            logits = logits.asnumpy()
        return logits, a, b

    def to_state(self, arr):
        return ms.Tensor(arr)


def cache_length(needed: int) -> int:
    """The cache length T for `needed` positions: a power of two >= 256, so that prompts of different lengths share
    one compiled decode graph (and its compile-cache entry)."""
    t = 256
    while t < needed:
        t *= 2
    return t


def generate(runner, prompt_ids: List[int], max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, stop_ids: Iterable[int] = (), max_len: Optional[int] = None,
             on_token: Optional[Callable[[int], None]] = None) -> List[int]:
    """Generate for one prompt; returns the new token ids (stop token included when hit)."""
    rng = np.random.default_rng(seed)
    S = len(prompt_ids)
    T = max_len or cache_length(S + max_new_tokens)
    if S + max_new_tokens > T:
        raise ValueError(f"prompt ({S}) + max_new_tokens ({max_new_tokens}) exceed the cache length {T}")
    logits, *prefilled = runner.prefill(np.array([prompt_ids]))
    caches = decode_state(runner, prefilled, 1, T)
    out: List[int] = []
    nxt = sample_next(logits[0, -1], temperature, top_p, rng)
    stop = set(stop_ids)
    for step in range(max_new_tokens):
        out.append(nxt)
        last = nxt in stop or step == max_new_tokens - 1
        if on_token and (step > 0 or last):
            on_token(nxt)
        if last:
            break
        logits, *caches = runner.decode(np.array([[nxt]]), np.array([S + step]), *caches)
        if on_token and step == 0:
            on_token(nxt)  # shown after the first decode call, so its compile is announced before any text
        nxt = sample_next(logits[0, -1], temperature, top_p, rng)
    return out
