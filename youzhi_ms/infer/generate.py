"""Token generation over the static-cache decode path, for source (GQA cache k/v) and converted (MLA latent cache)
models alike: one prefill, then one compiled decode step per token against a preallocated cache."""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional

import numpy as np

from youzhi_ms.config import MLAConfig


def cache_shapes(cfg, batch: int, max_len: int):
    """The two cache tensors' shapes and their sequence axis: GQA k/v [L,B,kv,T,d]; MLA c_kv [L,B,T,r], k_pe."""
    if isinstance(cfg, MLAConfig):
        return ((cfg.num_layers, batch, max_len, cfg.kv_lora_rank),
                (cfg.num_layers, batch, max_len, cfg.qk_rope_head_dim)), 2
    shp = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    return (shp, shp), 3


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
    """Prefill + decode cells of an in-memory MindSpore model (graph-compiled on first use)."""

    def __init__(self, model, cfg):
        from youzhi_ms.models.base import DecodeCell, PrefillCell
        self.cfg = cfg
        self.prefill_cell, self.decode_cell = PrefillCell(model), DecodeCell(model)

    def prefill(self, ids: np.ndarray):
        import mindspore as ms
        logits, a, b = self.prefill_cell(ms.Tensor(ids.astype(np.int32)))
        return logits.asnumpy(), a.asnumpy(), b.asnumpy()

    def decode(self, ids: np.ndarray, pos: np.ndarray, *caches):
        import mindspore as ms
        logits, a, b = self.decode_cell(ms.Tensor(ids.astype(np.int32)), ms.Tensor(pos.astype(np.int32)), *caches)
        return logits.asnumpy(), a, b

    def to_state(self, arr):
        import mindspore as ms
        return ms.Tensor(arr)


def generate(runner, prompt_ids: List[int], max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, stop_ids: Iterable[int] = (), max_len: Optional[int] = None,
             on_token: Optional[Callable[[int], None]] = None) -> List[int]:
    """Generate for one prompt; returns the new token ids (stop token included when hit)."""
    rng = np.random.default_rng(seed)
    S = len(prompt_ids)
    T = max_len or int(np.ceil((S + max_new_tokens) / 64) * 64)  # round up so compiled shapes are reused
    if S + max_new_tokens > T:
        raise ValueError(f"prompt ({S}) + max_new_tokens ({max_new_tokens}) exceed the cache length {T}")
    (sa, sb), axis = cache_shapes(runner.cfg, 1, T)
    logits, a, b = runner.prefill(np.array([prompt_ids]))
    ca, cb = np.zeros(sa, np.float32), np.zeros(sb, np.float32)
    idx = [slice(None)] * len(sa)
    idx[axis] = slice(0, S)
    ca[tuple(idx)], cb[tuple(idx)] = a, b
    ca, cb = runner.to_state(ca), runner.to_state(cb)
    out: List[int] = []
    nxt = sample_next(logits[0, -1], temperature, top_p, rng)
    stop = set(stop_ids)
    for step in range(max_new_tokens):
        out.append(nxt)
        if on_token:
            on_token(nxt)
        if nxt in stop or step == max_new_tokens - 1:
            break
        logits, ca, cb = runner.decode(np.array([[nxt]]), np.array([S + step]), ca, cb)
        nxt = sample_next(logits[0, -1], temperature, top_p, rng)
    return out
