"""Building blocks shared by the GQA source model and the MLA model.

On CPU everything is plain ops in float32. On Ascend (`use_fused=True`) RMSNorm and SwiGLU switch to the fused
kernels, which compute the same math; the choice is made once per model from the device, never silently per call.
"""
from __future__ import annotations

import contextlib

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from youzhi_ms.config import rope_inv_freq, rope_tables


def device_target() -> str:
    return ms.get_context("device_target") or "CPU"


def fused_kernels_available() -> bool:
    """Fused RmsNorm / Swiglu / RoPE kernels exist only on Ascend (measured: 'Unsupported op [RmsNorm] on CPU')."""
    return device_target() == "Ascend"


_RANDOM_INIT = [True]


@contextlib.contextmanager
def weights_to_be_loaded():
    """Build models whose every parameter is about to be overwritten from a checkpoint: "normal" parameters start as
    zeros instead of random draws (drawing SmolLM2's 135M values took 3.6 s of a 4.4 s load)."""
    _RANDOM_INIT[0] = False
    try:
        yield
    finally:
        _RANDOM_INIT[0] = True


def _param(shape, name, dtype=ms.float32, init="normal"):
    if init == "ones":
        data = np.ones(shape, np.float32)
    elif init == "zeros" or not _RANDOM_INIT[0]:
        data = np.zeros(shape, np.float32)
    else:
        data = (np.random.default_rng(0).standard_normal(shape) * 0.02).astype(np.float32)
    return Parameter(Tensor(data, dtype), name=name)


class Linear(nn.Cell):
    """y = x W^T (+ b), W stored [out, in] as in Hugging Face and MindFormers checkpoints."""

    def __init__(self, in_features, out_features, bias=False, dtype=ms.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param((out_features, in_features), "weight", dtype)
        self.has_bias = bias
        self.bias = _param((out_features,), "bias", dtype, "zeros") if bias else None

    def construct(self, x):
        return ops.dense(x, self.weight, self.bias)


def spread(a, like):
    """`a` broadcast to `like`'s shape, as its own op, before an element-wise op with `like`.

    Why: MindSpore 2.10's CPU kernels for an element-wise op whose operands differ in shape ([N,D] * [N,1],
    [B,H,S,d] * [B,1,S,d], masked_fill with a [.., 1] mask) take about four output-sized temporaries per op
    (benchmarks/bench_broadcast_memory.py: 8 such ops on 100 MB peak at 3.2 GB, 0.3 GB with this). In a training
    step they add to the held activations: 8.67 -> 5.31 GB with this and the fused AdamW (docs/benchmarks.md 6b).
    The values are the same; broadcast_to's gradient is the reduce-sum the implicit broadcast would use.
    """
    return ops.broadcast_to(a, like.shape)


class RMSNorm(nn.Cell):
    def __init__(self, dim, eps=1e-6, dtype=ms.float32, use_fused=False):
        super().__init__()
        self.weight = _param((dim,), "weight", dtype, "ones")
        self.eps = eps
        self.use_fused = use_fused

    def construct(self, x):
        if self.use_fused:
            return ops.rms_norm(x, self.weight, self.eps)[0]
        xf = x.astype(ms.float32)
        xf = xf * spread(ops.rsqrt(ops.mean(xf * xf, -1, keep_dims=True) + self.eps), xf)
        xf = xf.astype(x.dtype)
        return spread(self.weight, xf) * xf


class SwiGLUMLP(nn.Cell):
    """down(silu(gate(x)) * up(x)); MindFormers names gate -> gating, up -> hidden, down -> linear_fc2."""

    def __init__(self, hidden, inter, dtype=ms.float32, use_fused=False):
        super().__init__()
        self.gating = Linear(hidden, inter, dtype=dtype)
        self.hidden = Linear(hidden, inter, dtype=dtype)
        self.linear_fc2 = Linear(inter, hidden, dtype=dtype)
        self.use_fused = use_fused

    def construct(self, x):
        if self.use_fused:
            h = ops.swiglu(ops.concat((self.gating(x), self.hidden(x)), -1), -1)
        else:
            h = ops.silu(self.gating(x)) * self.hidden(x)
        return self.linear_fc2(h)


class Embedding(nn.Cell):
    def __init__(self, vocab, hidden, dtype=ms.float32):
        super().__init__()
        self.weight = _param((vocab, hidden), "weight", dtype)

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


class RotaryTable(nn.Cell):
    """cos/sin for positions, in the layout one head needs.

    `interleaved=False` is Hugging Face Llama/Qwen2's half-split layout (dim j pairs with j + d/2);
    `interleaved=True` is DeepSeek-V3's (dim 2p pairs with 2p+1). Tables are constants, not parameters.
    """

    def __init__(self, rot_dim, theta, scaling, max_pos, table_len=None, interleaved=False):
        super().__init__()
        inv, att = rope_inv_freq(rot_dim, theta, scaling, max_pos)
        cos, sin = rope_tables(inv, table_len or max_pos, att)
        if interleaved:
            cos, sin = np.repeat(cos, 2, axis=-1), np.repeat(sin, 2, axis=-1)
        else:
            cos, sin = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)
        self.cos = Tensor(cos, ms.float32)
        self.sin = Tensor(sin, ms.float32)
        self.interleaved = interleaved
        self.rot_dim = rot_dim

    def construct(self, positions):
        """positions [B, S] int -> cos, sin [B, 1, S, rot_dim] (broadcast over heads)."""
        cos = ops.gather(self.cos, positions, 0)
        sin = ops.gather(self.sin, positions, 0)
        return cos.expand_dims(1), sin.expand_dims(1)


def rotate_half(x):
    h = x.shape[-1] // 2
    return ops.concat((-x[..., h:], x[..., :h]), -1)


def rotate_interleaved(x):
    """(x0, y0, x1, y1, ...) -> (-y0, x0, -y1, x1, ...)."""
    shp = x.shape
    pairs = x.reshape(shp[:-1] + (shp[-1] // 2, 2))
    out = ops.stack((-pairs[..., 1], pairs[..., 0]), -1)
    return out.reshape(shp)


def apply_rope_half(x, cos, sin):
    return x * spread(cos, x) + rotate_half(x) * spread(sin, x)


def apply_rope_interleaved(x, cos, sin):
    return x * spread(cos, x) + rotate_interleaved(x) * spread(sin, x)


def attention_probs(scores, mask, scale, dtype):
    """The one masked softmax of every attention path: float32 scores * scale + additive mask, softmax over the keys,
    cast back to the value dtype."""
    scores = scores.astype(ms.float32) * scale
    return ops.softmax(scores + spread(mask, scores), -1).astype(dtype)
