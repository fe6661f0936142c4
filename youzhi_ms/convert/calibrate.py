"""Part of stage 3 of 5 (with adaptive.py): calibration streams and one layer's statistics, what every stage decision
of a layer reads.

The converter pushes calibration hidden states through the model one layer at a time, in up to three streams:
  * `conv`: through the layers already converted at the target rank: the inputs the converted model will really see.
    The candidate scores are measured on it, so drift from earlier layers is seen and can be compensated.
  * `orig`: through the source layers: the reference the scores compare against, and (statistics 'standard') the keys
    of RoRoPE's PCA, as TransMLA takes them (its first calibration pass runs the original model).
  * `partial_rope`: (statistics 'standard' only) through the layers converted with their chosen bands at full rank,
    i.e. the partial-RoPE model that stage 2 (RoRoPE) makes: the inputs of the latent PCA, as TransMLA's second
    calibration pass takes them.
With statistics 'cascaded' every statistic comes from `conv` (each layer is fitted to the inputs it will get) and only
the proxy windows of `orig` are kept.

`LayerStats.build(bands, beta)` is the whole conversion of one layer from its statistics (RoRoPE rotation, then the
latent PCA); `ResidualScore` is the budget-aware objective every FreqFold and K/V-balance decision minimises.
The layer arithmetic is `attention_np`, the one numpy reference forward (the tests use it too).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from youzhi_ms.checkpoint.hf import HFCheckpoint
from youzhi_ms.config import SourceConfig
from youzhi_ms.convert.attention_np import block_output, gqa_attention, linear, mla_attention, rms_norm
from youzhi_ms.convert.latent_pca import LatentPCA, build_layer, input_moments, query_moments
from youzhi_ms.convert.rorope import (Band, assemble_rotation, band_moments, pca, qk_moments, query_band_moments,
                                     validate_bands)
from youzhi_ms.errors import YouzhiError

STATS = ("cascaded", "standard")


def layer_weights(ck: HFCheckpoint, i: int, cfg: SourceConfig) -> Dict[str, np.ndarray]:
    """Layer i's source weights (shape-checked): wq wk wv wo [+ bq bk bv bo], ln1 ln2, gate up down."""
    p = f"model.layers.{i}."
    D, H, kv, d, I = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    a = p + "self_attn."
    w = {"wq": ck.get(a + "q_proj.weight", (H * d, D)), "wk": ck.get(a + "k_proj.weight", (kv * d, D)),
         "wv": ck.get(a + "v_proj.weight", (kv * d, D)), "wo": ck.get(a + "o_proj.weight", (D, H * d)),
         "ln1": ck.get(p + "input_layernorm.weight", (D,)), "ln2": ck.get(p + "post_attention_layernorm.weight", (D,)),
         "gate": ck.get(p + "mlp.gate_proj.weight", (I, D)), "up": ck.get(p + "mlp.up_proj.weight", (I, D)),
         "down": ck.get(p + "mlp.down_proj.weight", (D, I))}
    for b, n, size in (("bq", "q_proj", H * d), ("bk", "k_proj", kv * d), ("bv", "v_proj", kv * d), ("bo", "o_proj", D)):
        if a + f"{n}.bias" in ck:
            w[b] = ck.get(a + f"{n}.bias", (size,))
    return w


@dataclass
class Geometry:
    n_heads: int
    n_kv: int
    d: int
    rope_dim: int  # qk_rope_head_dim
    rank: int  # kv_lora_rank
    eps: float
    cos: np.ndarray  # [S, d/2] source RoPE tables
    sin: np.ndarray

    @property
    def c(self) -> int:
        return self.d // self.rope_dim

    @property
    def cos_r(self):  # rope pair p rotates at omega_{c p}
        return self.cos[:, ::self.c]

    @property
    def sin_r(self):
        return self.sin[:, ::self.c]

    def mla(self, x: np.ndarray, m: Dict[str, np.ndarray], rank: Optional[int] = None, q_pos=None) -> np.ndarray:
        return mla_attention(x, m, self.n_heads, self.d, self.rope_dim, self.d, rank or self.rank, self.cos_r,
                             self.sin_r, q_pos=q_pos)

    def gqa(self, x: np.ndarray, src: Dict[str, np.ndarray], return_probs: bool = False):
        return gqa_attention(x, src, self.n_heads, self.n_kv, self.d, self.cos, self.sin, return_probs=return_probs)


class LayerStats:
    """Statistics of one layer: key moments for RoRoPE, input and query moments for the latent PCA.

    keys_x: normed layer inputs [T, D] the RoRoPE keys come from; pca_x: normed inputs [T, D] of the latent PCA."""

    def __init__(self, geo: Geometry, src: Dict[str, np.ndarray], keys_x: np.ndarray, pca_x: np.ndarray,
                 pca_metric: str, rorope_metric: str = "k", damping: float = 0.01):
        self.geo, self.src, self.damping = geo, src, damping
        self.pca_metric, self.rorope_metric = pca_metric, rorope_metric
        self.K = linear(keys_x, src["wk"], src.get("bk"))  # [T, L] pre-RoPE keys
        self.SX = input_moments(pca_x)
        self.Sq = query_moments(src, self.SX, geo.n_heads, geo.d)
        self._rotations: Dict[Tuple[Band, ...], np.ndarray] = {}
        self._band_pcas: Dict[Band, Tuple[np.ndarray, np.ndarray]] = {}
        self._latent: Optional[LatentPCA] = None

    def moments(self, bands: Sequence[Band]):
        g = self.geo
        km = band_moments(self.K, g.n_kv, g.d, bands)
        if self.rorope_metric == "qk":
            return qk_moments(km, query_band_moments(self.Sq, g.n_heads, g.n_kv, g.d, bands))
        return km

    def band_pca(self, band: Band):
        """RoRoPE's PCA of one band (eigenvalues, eigenvectors), computed once: tilings share bands."""
        band = tuple(band)
        if band not in self._band_pcas:
            self._band_pcas[band] = pca(self.moments([band])[0], self.damping)
        return self._band_pcas[band]

    def rotation(self, bands: Sequence[Band]) -> np.ndarray:
        key = tuple(tuple(b) for b in bands)
        if key not in self._rotations:
            validate_bands(key, self.geo.d, self.geo.c)
            self._rotations[key] = assemble_rotation(self.geo.n_kv, self.geo.d, self.geo.c, key,
                                                     [self.band_pca(b) for b in key])[0]
        return self._rotations[key]

    def build(self, bands: Sequence[Band], beta: float = 1.0, rank: Optional[int] = None,
              R_override: Optional[np.ndarray] = None):
        """One MLA layer (exact-export tensors) and its info dict."""
        g = self.geo
        return build_layer(self.src, self.rotation(bands), self.SX, g.n_heads, g.n_kv, g.d, g.rope_dim, rank or g.rank,
                           self.damping, R_override=R_override, metric=self.pca_metric, beta=beta, Sq=self.Sq)

    def fast_build(self, bands: Sequence[Band], beta: float = 1.0, R_override: Optional[np.ndarray] = None):
        """`build` at the target rank to float tolerance, from per-layer products (`LatentPCA`): what the fast FreqFold
        search scores candidates with. The exported layer always comes from `build`."""
        return self._latent_pca().build(self.rotation(bands), self.geo.rank, beta, R_override=R_override)

    def _latent_pca(self) -> LatentPCA:
        g = self.geo
        if self._latent is None:
            self._latent = LatentPCA(self.src, self.SX, g.n_heads, g.n_kv, g.d, g.rope_dim, self.damping,
                                     self.pca_metric, self.Sq)
        return self._latent

    def prepare_search(self, candidates, fast: bool) -> None:
        """Every band's PCA (and, for the fast search, the per-layer products) computed now: candidates scored in
        forked workers then share them instead of each worker computing its own."""
        for bands in candidates:
            for band in bands:
                self.band_pca(band)
        if fast:
            self._latent_pca()


SCORES = ("local-block", "local", "residual", "normed")  # the kinds of ResidualScore (ConvertOptions.score)


class ResidualScore:
    """The budget-aware objective: squared error of the residual stream after the attention block of the converted
    model, h + attn_MLA(norm(h)) with h from the converted layers before, against h0 + attn_GQA(norm(h0)) of the
    original model, on the scoring windows at every `stride`-th query position (keys at every position); relative to
    the energy of the original attention output there.

    kind 'normed' measures the same error after the layer's post-attention RMSNorm (what the MLP reads, so a few
    massive residual channels do not dominate); 'local' is the layer's own attention error on the converted inputs
    (no upstream drift): attn_MLA(norm(h)) against attn_GQA(norm(h))."""

    def __init__(self, geo: Geometry, w: Dict[str, np.ndarray], h_conv: np.ndarray, h_orig: np.ndarray,
                 a_orig: np.ndarray, kind: str = "residual", a_local: Optional[np.ndarray] = None, stride: int = 1):
        if kind not in SCORES:
            raise YouzhiError(f"FreqFold score {kind!r}: use one of {', '.join(SCORES)}")
        self.geo, self.kind, self.w = geo, kind, w
        S = h_conv.shape[1]
        self.q_pos = np.arange(stride - 1, S, stride)
        self.h = h_conv[:, self.q_pos].astype(np.float64)
        self.x = rms_norm(h_conv, w["ln1"], geo.eps)
        a_orig = a_orig[:, self.q_pos].astype(np.float64)
        self.ref_energy = float((a_orig ** 2).sum())
        if kind == "local":
            self.target = a_local[:, self.q_pos].astype(np.float64)
        elif kind == "local-block":
            self.target = self._block(a_local[:, self.q_pos])
            self.ref_energy = float((self.target ** 2).sum())
        elif kind == "normed":
            self.target = rms_norm(h_orig[:, self.q_pos] + a_orig, w["ln2"], geo.eps).astype(np.float64)
            self.ref_energy = float((self.target ** 2).sum())
        else:
            self.target = h_orig[:, self.q_pos] + a_orig
        energy = self.target if kind in ("local-block", "normed") else a_orig
        self.ref_pos = (energy ** 2).sum(-1)  # per window and position, so a subsample has its own reference energy

    def subsample(self, k: int, windows: int) -> "ResidualScore":
        """The same score on the first `windows` windows at every k-th of its query positions (keys at every position
        of those windows): it ranks candidates like the full score up to sampling noise, at a fraction of the cost
        (the fast search's first round)."""
        sub = copy.copy(self)
        sel = np.arange(min(k, len(self.q_pos)) - 1, len(self.q_pos), k)  # at least one position
        n = max(1, windows)
        sub.x = self.x[:n]
        sub.q_pos, sub.h, sub.target = self.q_pos[sel], self.h[:n, sel], self.target[:n, sel]
        sub.ref_pos = self.ref_pos[:n, sel]
        sub.ref_energy = float(sub.ref_pos.sum())
        return sub

    def __call__(self, m: Dict[str, np.ndarray]) -> float:
        a = self.geo.mla(self.x, m, q_pos=self.q_pos)
        if self.kind == "local":
            y = a
        elif self.kind == "local-block":
            y = self._block(a)
        elif self.kind == "normed":
            y = rms_norm(self.h + a, self.w["ln2"], self.geo.eps)
        else:
            y = self.h + a
        e = y - self.target
        return float((e * e).sum() / self.ref_energy)

    def _block(self, a):
        """The layer's output (attention + MLP residual block) at unit RMS per token: what the next layer reads."""
        y = block_output(self.h, a.astype(np.float64), self.w, self.geo.eps)
        return y / np.sqrt(np.mean(y * y, -1, keepdims=True) + self.geo.eps)
