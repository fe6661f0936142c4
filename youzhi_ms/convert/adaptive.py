"""Layer-adaptive FreqFold: choose the RoRoPE bands of every layer from measured errors.

Two local proxies, both computed on calibration tokens of the layer being converted:
  * band proxy (separable, cheap): for a candidate band (f, F), the error its RoRoPE approximation adds to the attention
    logits, weighted like the second-order KL between the true and the perturbed attention distributions:
    E = sum_{h,t} Var_{s ~ p_t}(delta_logit_ts). Summing E over bands and minimising with dynamic programming gives the
    best tiling of the frequencies into bands (mixed fold sizes inside one layer).
  * budget-aware attention-output error: the relative squared error of the layer's attention output (after o_proj)
    when the whole layer is converted at the target kv_lora_rank, compared with the source layer on the same inputs.
    It arbitrates between candidates (uniform F per layer, and DP tilings with a cap on band size) because the band
    proxy does not see the low-rank step.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from youzhi_ms.convert.latent import kv_group
from youzhi_ms.convert.rorope import Band, pca, uniform_bands


def fold_sizes(d: int, c: int) -> List[int]:
    out, F = [], c
    while F <= d // 2:
        out.append(F)
        F *= 2
    return out


def _complex_heads(x: np.ndarray) -> np.ndarray:
    """[..., d] half-split -> complex [..., d/2]."""
    h = x.shape[-1] // 2
    return x[..., :h].astype(np.float64) + 1j * x[..., h:].astype(np.float64)


class BandProxy:
    """Logit-error proxy for every candidate band of one layer.

    q [N,S,H,d], k [N,S,kv,d] pre-RoPE; probs [N,H,S,S] the source attention; inv_freq [d/2]. Queries are subsampled
    every `q_stride` positions (keys are all kept) to bound time and memory; float32 real matmuls throughout."""

    def __init__(self, q, k, probs, inv_freq, n_kv, K_moments_fn, c: int, scale: float, q_stride: int = 4):
        self.N, self.S, self.H, d = q.shape
        self.d, self.c, self.n_kv = d, c, n_kv
        self.inv_freq = inv_freq.astype(np.float64)
        self.tq = np.arange(q_stride - 1, self.S, q_stride)
        self.qc = _complex_heads(q[:, self.tq])  # [N,Tq,H,d/2]
        self.kc = _complex_heads(k)  # [N,S,kv,d/2]
        self.p = probs[:, :, self.tq].astype(np.float32)  # [N,H,Tq,S]
        self.moments = K_moments_fn
        self.scale = scale
        self.group = np.array([kv_group(h, self.H, n_kv) for h in range(self.H)])
        rel = self.tq[:, None] - np.arange(self.S)[None, :]  # t - s
        n_units = d // 2 // c
        Tq = len(self.tq)
        # true per-frequency logit contributions, accumulated at multiples of c: prefix[u] = sum_{j < u*c}
        self.prefix = np.zeros((n_units + 1, self.N, self.H, Tq, self.S), np.float32)
        acc = np.zeros((self.N, self.H, Tq, self.S))
        for j in range(d // 2):
            qj = self.qc[:, :, :, j].transpose(0, 2, 1)  # [N,H,Tq]
            kj = self.kc[:, :, self.group, j].transpose(0, 2, 1)  # [N,H,S] (each head's kv group)
            acc += np.real(qj[..., :, None] * np.conj(kj[..., None, :]) * np.exp(1j * self.inv_freq[j] * rel))
            if (j + 1) % c == 0:
                self.prefix[(j + 1) // c] = acc

    def error(self, band: Band) -> float:
        f, F = band
        n_kv, c = self.n_kv, self.c
        _, U = pca(self.moments(band))
        keep = F // c
        true = self.prefix[(f + F) // c] - self.prefix[f // c]
        # components: k'_m(s) = sum_{i,j} U[(i,j), m] k_{i,j}(s); q'_{h,m}(t) = sum_j U[(g(h), j), m] q_{h,j}(t)
        kp = self.kc[:, :, :, f:f + F].reshape(self.N, self.S, n_kv * F) @ U  # [N,S,M], feature order (i, j)
        Ug = U.reshape(n_kv, F, -1)[self.group]  # [H,F,M]
        qp = np.matmul(self.qc[:, :, :, f:f + F].transpose(0, 2, 1, 3), Ug)  # [N,H,Tq,M]
        # rope components rotate at omega_{f + m c}; the rest carry no rotation
        w = np.zeros(qp.shape[-1])
        w[:keep] = self.inv_freq[f + np.arange(keep) * c]
        qr = qp * np.exp(1j * self.tq[:, None] * w[None, :])
        kr = kp * np.exp(1j * np.arange(self.S)[:, None] * w[None, :])
        Qf = np.concatenate([qr.real, qr.imag], -1).astype(np.float32)
        Kf = np.concatenate([kr.real, kr.imag], -1).astype(np.float32)
        approx = np.matmul(Qf, Kf[:, None].swapaxes(-1, -2))  # Re(q conj k) summed over components
        delta = (true - approx) * self.scale
        mean = (self.p * delta).sum(-1, dtype=np.float64)
        var = (self.p * delta * delta).sum(-1, dtype=np.float64) - mean * mean
        return float(var.sum() / (self.N * len(self.tq)))


def dp_tiling(errors: Dict[Band, float], d: int, c: int, max_F: int) -> Tuple[List[Band], float]:
    """Minimum-total-error tiling of frequencies 0..d/2-1 into bands of sizes c*2^k <= max_F (starts at multiples of c)."""
    n = d // 2 // c
    best = [0.0] + [np.inf] * n
    choice: List = [None] * (n + 1)
    for b in range(1, n + 1):
        size = 1
        while size <= b and size * c <= max_F:
            a = b - size
            e = errors.get((a * c, size * c))
            if e is not None and best[a] + e < best[b]:
                best[b], choice[b] = best[a] + e, (a * c, size * c)
            size *= 2
    bands, b = [], n
    while b > 0:
        f, F = choice[b]
        bands.append((f, F))
        b = f // c
    return bands[::-1], best[n]


def candidate_bands(d: int, c: int) -> List[Band]:
    out = []
    for F in fold_sizes(d, c):
        for f in range(0, d // 2 - F + 1, c):
            out.append((f, F))
    return out


def layer_candidates(mode: str, d: int, c: int, proxy_errors=None) -> Dict[str, List[Band]]:
    """Named band tilings to arbitrate between: uniform F for every fold size, plus (mode 'adaptive') DP tilings
    with the band size capped at each fold size."""
    cands = {f"F={F}": uniform_bands(d, F) for F in fold_sizes(d, c)}
    if mode == "adaptive" and proxy_errors is not None:
        for F in fold_sizes(d, c)[1:]:
            bands, _ = dp_tiling(proxy_errors, d, c, F)
            if bands not in cands.values():
                cands[f"dp<= {F}"] = bands
    return cands
