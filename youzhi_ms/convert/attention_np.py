"""The numpy reference forward of the source and converted decoder layers: the converter's statistics and proxies, and
the tests' independent checks, all use these functions.

Why not the MindSpore model: the converter holds one layer's weights at a time in float32/float64 and needs the
intermediate quantities (pre-RoPE keys, attention probabilities, second moments) that a compiled graph does not
expose; and a check of the MindSpore model should not run through the MindSpore model. Kept deliberately plain
(float32 matmuls, float64 where statistics accumulate) so every candidate is computed the same way.
Shapes: X [N, S, D] (already input-layernormed), heads-first inside.
"""
from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x32 = x.astype(np.float32)
    return (x32 / np.sqrt(np.mean(x32 * x32, -1, keepdims=True) + eps)) * w


def linear(x, w, b=None):
    y = x @ w.T
    return y + b if b is not None else y


def rope_half(x, cos, sin):
    """x [..., S, d] half-split layout; cos/sin [S, d/2]."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def rope_interleaved(x, cos, sin):
    """x [..., S, 2P] with pairs (2p, 2p+1); cos/sin [S, P]."""
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = b * cos + a * sin
    return out


def causal_softmax(scores, q_pos=None):
    """scores [..., T, S] -> probabilities with the causal mask applied, float32. Query row i sits at position
    q_pos[i] (default: T = S and row i at position i)."""
    S = scores.shape[-1]
    q_pos = np.arange(S) if q_pos is None else np.asarray(q_pos)
    s = np.where(q_pos[:, None] >= np.arange(S)[None, :], scores, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def gqa_qkv(X, w, n_heads, n_kv, d):
    """Pre-RoPE projections: q [N,S,H,d], k [N,S,kv,d], v [N,S,kv,d]."""
    N, S, _ = X.shape
    q = linear(X, w["wq"], w.get("bq")).reshape(N, S, n_heads, d)
    k = linear(X, w["wk"], w.get("bk")).reshape(N, S, n_kv, d)
    v = linear(X, w["wv"], w.get("bv")).reshape(N, S, n_kv, d)
    return q, k, v


def gqa_attention(X, w, n_heads, n_kv, d, cos, sin, return_probs=False):
    """Source attention incl. o_proj: [N,S,D] (and probabilities [N,H,S,S])."""
    q, k, v = gqa_qkv(X, w, n_heads, n_kv, d)
    g = n_heads // n_kv
    q = rope_half(q.transpose(0, 2, 1, 3), cos, sin)
    k = np.repeat(rope_half(k.transpose(0, 2, 1, 3), cos, sin), g, axis=1)
    v = np.repeat(v.transpose(0, 2, 1, 3), g, axis=1)
    p = causal_softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(d))
    o = (p @ v).transpose(0, 2, 1, 3).reshape(X.shape[0], X.shape[1], -1)
    out = linear(o, w["wo"], w.get("bo"))
    return (out, p) if return_probs else out


def mla_attention(X, m, n_heads, nope, rope, vdim, rank, cos_r, sin_r, kv_norm=None, eps=1e-6, q_pos=None):
    """MLA attention (naive path) incl. o_proj, from HF DeepSeek-V3 layer tensors `m` (keys without the layer
    prefix, e.g. 'q_proj.weight'); cos_r/sin_r [S, rope/2] for the interleaved rope head. With q_pos, only the
    queries at those positions are computed (keys and values at every position): [N, len(q_pos), D]."""
    N, S, _ = X.shape
    q_pos = np.arange(S) if q_pos is None else np.asarray(q_pos)
    Xq = X if len(q_pos) == S else X[:, q_pos]
    T = len(q_pos)
    q = linear(Xq, m["q_proj.weight"], m.get("q_proj.bias")).reshape(N, T, n_heads, nope + rope).transpose(0, 2, 1, 3)
    kv = linear(X, m["kv_a_proj_with_mqa.weight"], m.get("kv_a_proj_with_mqa.bias"))
    c, k_pe = kv[..., :rank], kv[..., rank:]
    if kv_norm is not None:
        c = rms_norm(c, kv_norm, eps)
    q_pe = rope_interleaved(q[..., nope:], cos_r[q_pos], sin_r[q_pos])
    k_pe = rope_interleaved(k_pe, cos_r, sin_r)[:, None]
    up = (c @ m["kv_b_proj.weight"].T).reshape(N, S, n_heads, nope + vdim).transpose(0, 2, 1, 3)
    scores = q[..., :nope] @ up[..., :nope].transpose(0, 1, 3, 2) + q_pe @ k_pe.transpose(0, 1, 3, 2)
    p = causal_softmax(scores / np.sqrt(nope + rope), q_pos)
    o = (p @ up[..., nope:]).transpose(0, 2, 1, 3).reshape(N, T, -1)
    return linear(o, m["o_proj.weight"], m.get("o_proj.bias"))


def mlp(x, w):
    """SwiGLU MLP from layer weights w (gate, up, down)."""
    g = x @ w["gate"].T
    return ((g / (1 + np.exp(-g))) * (x @ w["up"].T)) @ w["down"].T


def block_output(h, attn, w, eps):
    """The decoder layer's output from its input h and its attention output (pre-norm residual block)."""
    h = h + attn
    return h + mlp(rms_norm(h, w["ln2"], eps), w)
