"""The converted model: DeepSeek-V3-style multi-head latent attention (dense), in MindSpore.

Per token and layer the attention keeps one latent c_kv [kv_lora_rank] and one shared rope key k_pe [qk_rope_head_dim].
Two paths over the same weights:
  naive (construct / prefill, also training): c_kv is expanded by kv_b_proj into per-head k_nope and v, then ordinary
      attention with qk dim nope+rope.
  absorbed (decode): W_UK is folded into the query (q_lat = q_nope W_UK, [H, r]) and W_UV into the output, so attention
      runs directly over the cached latents; the cache is only c_kv [L,B,T,r] and k_pe [L,B,T,rope].
Parameter names follow MindFormers (linear_q_proj, linear_kv_down_proj, kv_layernorm, linear_kv_up_proj, linear_proj).
Extensions beyond stock DeepSeek-V3 so exact conversions are representable: `q_bias` (q_proj bias) and
`kv_layernorm=False` (no latent norm).
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import nn, ops

from youzhi_ms.config import MLAConfig
from youzhi_ms.models.base import CausalLMBase, write_cache
from youzhi_ms.models.layers import Linear, RMSNorm, apply_rope_half, apply_rope_interleaved, attention_probs


def softmax_scale(cfg: MLAConfig) -> float:
    """(nope+rope)^-1/2, times mscale^2 for yarn-scaled checkpoints (as DeepSeek-V3 does)."""
    scale = cfg.qk_head_dim ** -0.5
    rs = cfg.rope_scaling or {}
    if rs.get("mscale_all_dim"):
        m = 0.1 * rs["mscale_all_dim"] * math.log(rs["factor"]) + 1.0 if rs["factor"] > 1 else 1.0
        scale *= m * m
    return scale


class MLAAttention(nn.Cell):
    def __init__(self, cfg: MLAConfig, dtype=ms.float32):
        super().__init__()
        h, D = cfg.num_heads, cfg.hidden_size
        self.num_heads, self.nope_dim, self.rope_dim, self.v_dim, self.rank = (
            h, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank)
        self.qk_dim = cfg.qk_head_dim
        self.scale = softmax_scale(cfg)
        self.interleave = cfg.rope_interleave
        self.q_lora = cfg.q_lora_rank is not None
        if self.q_lora:
            self.linear_q_down_proj = Linear(D, cfg.q_lora_rank, bias=cfg.attention_bias, dtype=dtype)
            self.q_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dtype)
            self.linear_q_up_proj = Linear(cfg.q_lora_rank, h * self.qk_dim, dtype=dtype)
        else:
            self.linear_q_proj = Linear(D, h * self.qk_dim, bias=cfg.q_bias, dtype=dtype)
        self.linear_kv_down_proj = Linear(D, self.rank + self.rope_dim, bias=cfg.attention_bias, dtype=dtype)
        self.use_kv_norm = cfg.kv_layernorm
        self.kv_layernorm = RMSNorm(self.rank, cfg.rms_norm_eps, dtype) if cfg.kv_layernorm else None
        self.linear_kv_up_proj = Linear(self.rank, h * (self.nope_dim + self.v_dim), dtype=dtype)
        self.linear_proj = Linear(h * self.v_dim, D, bias=cfg.attention_bias, dtype=dtype)

    def rotate(self, x, cos, sin):
        if self.interleave:
            return apply_rope_interleaved(x, cos, sin)
        return apply_rope_half(x, cos, sin)

    def project(self, x, cos, sin):
        """x [B,S,D] -> q_nope [B,H,S,nope], q_pe [B,H,S,rope] (rotated), c_kv [B,S,r] (normed), k_pe [B,S,rope]."""
        b, s, _ = x.shape
        if self.q_lora:
            q = self.linear_q_up_proj(self.q_layernorm(self.linear_q_down_proj(x)))
        else:
            q = self.linear_q_proj(x)
        q = q.reshape(b, s, self.num_heads, self.qk_dim).swapaxes(1, 2)
        q_nope, q_pe = q[..., :self.nope_dim], self.rotate(q[..., self.nope_dim:], cos, sin)
        kv = self.linear_kv_down_proj(x)
        c_kv = kv[..., :self.rank]
        if self.use_kv_norm:
            c_kv = self.kv_layernorm(c_kv)
        k_pe = self.rotate(kv[..., self.rank:].expand_dims(1), cos, sin).squeeze(1)
        return q_nope, q_pe, c_kv, k_pe

    def attend_naive(self, q_nope, q_pe, c_kv, k_pe, mask):
        b, _, s, _ = q_nope.shape
        t = c_kv.shape[1]
        kv = self.linear_kv_up_proj(c_kv).reshape(b, t, self.num_heads, self.nope_dim + self.v_dim).swapaxes(1, 2)
        k_nope, v = kv[..., :self.nope_dim], kv[..., self.nope_dim:]
        scores = ops.matmul(q_nope, k_nope.swapaxes(-1, -2)) + ops.matmul(q_pe, k_pe.expand_dims(1).swapaxes(-1, -2))
        probs = attention_probs(scores, mask, self.scale, v.dtype)
        out = ops.matmul(probs, v).swapaxes(1, 2).reshape(b, s, self.num_heads * self.v_dim)
        return self.linear_proj(out)

    def absorbed_weights(self):
        """W_UK [H, nope, r] and W_UV^T [H, r, v] views of kv_b_proj (no copies kept between calls)."""
        w = self.linear_kv_up_proj.weight.reshape(self.num_heads, self.nope_dim + self.v_dim, self.rank)
        return w[:, :self.nope_dim, :], w[:, self.nope_dim:, :].swapaxes(1, 2)

    def attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Attention over the latent cache: c_kv [B,T,r], k_pe [B,T,rope]; q_* [B,H,S,*] -> [B,S,D].

        W_UK / W_UV are applied heads-first ([H, B*S, .] @ [H, ., .]) and the heads are folded into the rows of one
        matmul against the shared latent [B,1,T,r], so neither the weights nor the cache are broadcast."""
        b, h, s, _ = q_nope.shape
        w_uk, w_uv_t = self.absorbed_weights()
        q_lat = ops.matmul(q_nope.transpose(1, 0, 2, 3).reshape(h, b * s, self.nope_dim), w_uk)  # [H, B*S, r]
        q_lat = q_lat.reshape(h, b, s, self.rank).transpose(1, 0, 2, 3).reshape(b, 1, h * s, self.rank)
        c = c_kv.expand_dims(1)  # [B,1,T,r], shared by all heads (MQA over the latent)
        scores = ops.matmul(q_lat, c.swapaxes(-1, -2)) + \
            ops.matmul(q_pe.reshape(b, 1, h * s, self.rope_dim), k_pe.expand_dims(1).swapaxes(-1, -2))
        probs = attention_probs(scores.reshape(b, h, s, -1), mask, self.scale, c.dtype)
        o_lat = ops.matmul(probs.reshape(b, 1, h * s, -1), c).reshape(b, h, s, self.rank)
        out = ops.matmul(o_lat.transpose(1, 0, 2, 3).reshape(h, b * s, self.rank), w_uv_t)  # [H, B*S, v]
        out = out.reshape(h, b, s, self.v_dim).transpose(1, 2, 0, 3).reshape(b, s, h * self.v_dim)
        return self.linear_proj(out)

    def construct(self, x, cos, sin, mask):
        q_nope, q_pe, c_kv, k_pe = self.project(x, cos, sin)
        return self.attend_naive(q_nope, q_pe, c_kv, k_pe, mask), c_kv, k_pe

    def decode_step(self, x, cos, sin, mask, c_cache, pe_cache, pos):
        """Absorbed decode of one token per sequence over the latent cache c_kv [B,T,r], k_pe [B,T,rope]."""
        q_nope, q_pe, c_kv, k_pe = self.project(x, cos, sin)
        t = c_cache.shape[1]
        c_cache, pe_cache = write_cache(c_cache, c_kv, pos, t), write_cache(pe_cache, k_pe, pos, t)
        return self.attend_absorbed(q_nope, q_pe, c_cache, pe_cache, mask), c_cache, pe_cache


class MLACausalLM(CausalLMBase):
    cache_names = ("c_kv", "k_pe")
    cache_seq_axis = 2

    def __init__(self, cfg: MLAConfig, dtype=ms.float32, use_fused=None, table_len=None):
        self.rope_dim = cfg.qk_rope_head_dim
        self.rope_interleaved = cfg.rope_interleave
        super().__init__(cfg, MLAAttention, dtype, use_fused, table_len)
