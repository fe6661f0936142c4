"""The source model: a Llama / Qwen2 / Mistral causal LM with grouped-query attention, in MindSpore.

Parameter names follow MindFormers (`decoder.layers.N.self_attention.linear_q`, ...); `names.py` maps them to Hugging
Face names. The decoder stack, the entry points (construct / prefill / decode) and the graph cells are shared with the
MLA model in base.py; this file holds only the attention, whose cache is the keys and values [L,B,kv,T,d].
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from youzhi_ms.config import SourceConfig
from youzhi_ms.models.base import CausalLMBase, write_cache
from youzhi_ms.models.layers import Linear, apply_rope_half, attention_probs


class GQAAttention(nn.Cell):
    def __init__(self, cfg: SourceConfig, dtype=ms.float32):
        super().__init__()
        d, h, kv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        self.head_dim, self.num_heads, self.num_kv_heads, self.group = d, h, kv, h // kv
        self.scale = d ** -0.5
        self.linear_q = Linear(cfg.hidden_size, h * d, bias=cfg.qkv_bias, dtype=dtype)
        self.linear_k = Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias, dtype=dtype)
        self.linear_v = Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias, dtype=dtype)
        self.linear_proj = Linear(h * d, cfg.hidden_size, bias=cfg.o_bias, dtype=dtype)

    def project(self, x, cos, sin):
        """x [B,S,D] -> q [B,H,S,d], k [B,kv,S,d] (both rotated), v [B,kv,S,d]."""
        b, s, _ = x.shape
        q = self.linear_q(x).reshape(b, s, self.num_heads, self.head_dim).swapaxes(1, 2)
        k = self.linear_k(x).reshape(b, s, self.num_kv_heads, self.head_dim).swapaxes(1, 2)
        v = self.linear_v(x).reshape(b, s, self.num_kv_heads, self.head_dim).swapaxes(1, 2)
        return apply_rope_half(q, cos, sin), apply_rope_half(k, cos, sin), v

    def attend(self, q, k, v, mask):
        """q [B,H,S,d]; k, v [B,kv,T,d] shared by `group` query heads each (HF repeat_kv order) -> [B,S,H*d]."""
        b, _, s, d = q.shape
        t = k.shape[2]
        qg = q.reshape(b, self.num_kv_heads, self.group * s, d)  # heads of one kv group stacked along rows
        scores = ops.matmul(qg, k.swapaxes(-1, -2)).reshape(b, self.num_heads, s, t)
        probs = attention_probs(scores, mask, self.scale, v.dtype)
        out = ops.matmul(probs.reshape(b, self.num_kv_heads, self.group * s, t), v)
        out = out.reshape(b, self.num_heads, s, d).swapaxes(1, 2).reshape(b, s, self.num_heads * d)
        return self.linear_proj(out)

    def construct(self, x, cos, sin, mask):
        q, k, v = self.project(x, cos, sin)
        return self.attend(q, k, v, mask), k, v

    def decode_step(self, x, cos, sin, mask, k_cache, v_cache, pos):
        """One new token per sequence against the cache [B,kv,T,d]: returns output and the updated caches."""
        q, k, v = self.project(x, cos, sin)
        t = k_cache.shape[2]
        k_cache, v_cache = write_cache(k_cache, k, pos, t), write_cache(v_cache, v, pos, t)
        return self.attend(q, k_cache, v_cache, mask), k_cache, v_cache


class GQACausalLM(CausalLMBase):
    cache_names = ("k_cache", "v_cache")
    cache_seq_axis = 3

    def __init__(self, cfg: SourceConfig, dtype=ms.float32, use_fused=None, table_len=None):
        self.rope_dim = cfg.head_dim
        super().__init__(cfg, GQAAttention, dtype, use_fused, table_len)
