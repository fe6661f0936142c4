"""The source model: a Llama / Qwen2 / Mistral causal LM with grouped-query attention, in MindSpore.

Parameter names follow MindFormers (`decoder.layers.N.self_attention.linear_q`, ...); `names.py` maps them to Hugging
Face names. Three entry points share the weights:
  construct(ids)                 -> logits                         full forward (eval, training, calibration)
  prefill(ids)                   -> logits, k [L,B,kv,S,d], v      full forward that also returns the keys/values
  decode(ids[B,1], pos[B], k, v) -> logits, k', v'                 one token against a preallocated cache [L,B,kv,T,d]
The cache is a plain tensor passed in and out (no hidden state), so the decode graph exports to MindIR with its state
visible in the signature.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from youzhi_ms.config import SourceConfig
from youzhi_ms.models.layers import (Embedding, Linear, RMSNorm, RotaryTable, SwiGLUMLP, apply_rope_half,
                                     fused_kernels_available)

NEG_INF = -1e9


def position_mask(q_pos, kv_len, key_mask=None):
    """Additive mask [B, 1, S, T]: query at absolute position q_pos[b, s] sees keys 0..q_pos[b, s].

    key_mask [B, T] (1 = real token) additionally hides padded keys.
    """
    k_pos = ops.arange(kv_len, dtype=ms.int32).reshape(1, 1, 1, kv_len)
    visible = k_pos <= q_pos.astype(ms.int32).expand_dims(1).expand_dims(-1)
    if key_mask is not None:
        visible = ops.logical_and(visible, key_mask.astype(ms.bool_).expand_dims(1).expand_dims(1))
    return ops.where(visible, ops.zeros((), ms.float32), ops.full((), NEG_INF, dtype=ms.float32))


def write_cache(cache, new, pos, axis_len):
    """cache [B, ..., T, w], new [B, ..., 1, w]; returns cache with row pos[b] replaced, static shapes throughout."""
    onehot = ops.arange(axis_len, dtype=ms.int32).reshape(1, axis_len) == pos.astype(ms.int32).reshape(-1, 1)
    shape = [cache.shape[0]] + [1] * (cache.ndim - 3) + [axis_len, 1]
    return ops.where(onehot.reshape(shape), new, cache)


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
        scores = ops.matmul(qg, k.swapaxes(-1, -2)).reshape(b, self.num_heads, s, t) * self.scale
        probs = ops.softmax(scores.astype(ms.float32) + mask, -1).astype(v.dtype)
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


class DecoderLayer(nn.Cell):
    """Pre-norm block; `attention` is GQA here and MLA in mla.py (same interface)."""

    def __init__(self, attention, hidden, inter, eps, dtype=ms.float32, use_fused=False):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps, dtype, use_fused)
        self.self_attention = attention
        self.pre_mlp_layernorm = RMSNorm(hidden, eps, dtype, use_fused)
        self.mlp = SwiGLUMLP(hidden, inter, dtype, use_fused)

    def construct(self, x, cos, sin, mask):
        a, k, v = self.self_attention(self.input_layernorm(x), cos, sin, mask)
        h = x + a
        return h + self.mlp(self.pre_mlp_layernorm(h)), k, v


class Decoder(nn.Cell):
    def __init__(self, layers, hidden, eps, dtype=ms.float32, use_fused=False):
        super().__init__()
        self.layers = nn.CellList(layers)
        self.final_layernorm = RMSNorm(hidden, eps, dtype, use_fused)


class EmbeddingBlock(nn.Cell):
    def __init__(self, vocab, hidden, dtype=ms.float32):
        super().__init__()
        self.word_embeddings = Embedding(vocab, hidden, dtype)

    def construct(self, ids):
        return self.word_embeddings(ids)


class CausalLMBase(nn.Cell):
    """Embedding, decoder stack, final norm and (tied or untied) output head; subclasses choose the attention."""

    rope_dim: int
    rope_interleaved = False
    cache_seq_axis: int  # sequence axis of the stacked cache tensors [L, B, ...]

    def __init__(self, cfg, attention_factory, dtype=ms.float32, use_fused=None, table_len=None):
        super().__init__()
        use_fused = fused_kernels_available() if use_fused is None else use_fused
        self.cfg = cfg
        self.num_layers = cfg.num_layers
        self.embedding = EmbeddingBlock(cfg.vocab_size, cfg.hidden_size, dtype)
        layers = [DecoderLayer(attention_factory(cfg, dtype), cfg.hidden_size, cfg.intermediate_size,
                               cfg.rms_norm_eps, dtype, use_fused) for _ in range(cfg.num_layers)]
        self.decoder = Decoder(layers, cfg.hidden_size, cfg.rms_norm_eps, dtype, use_fused)
        self.tied = cfg.tie_word_embeddings
        self.output_layer = None if self.tied else Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype)
        self.rotary = RotaryTable(self.rope_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings,
                                  table_len=max(table_len or 0, cfg.max_position_embeddings),
                                  interleaved=self.rope_interleaved)

    def head(self, h):
        h = self.decoder.final_layernorm(h)
        if self.tied:
            return ops.dense(h, self.embedding.word_embeddings.weight)
        return self.output_layer(h)

    def positions(self, input_ids):
        b, s = input_ids.shape
        return ops.broadcast_to(ops.arange(s, dtype=ms.int32).reshape(1, s), (b, s))

    def hidden_states(self, input_ids, attention_mask=None):
        """Final-norm input [B,S,D] and the per-layer cache entries, for a right-padded batch."""
        pos = self.positions(input_ids)
        cos, sin = self.rotary(pos)
        mask = position_mask(pos, input_ids.shape[1], attention_mask)
        h = self.embedding(input_ids)
        ks, vs = (), ()
        for layer in self.decoder.layers:
            h, k, v = layer(h, cos, sin, mask)
            ks += (k,)
            vs += (v,)
        return h, ks, vs

    def construct(self, input_ids, attention_mask=None):
        h, _, _ = self.hidden_states(input_ids, attention_mask)
        return self.head(h)

    def prefill(self, input_ids, attention_mask=None):
        h, ks, vs = self.hidden_states(input_ids, attention_mask)
        return self.head(h), ops.stack(ks), ops.stack(vs)

    def decode(self, input_ids, pos, cache_a, cache_b):
        """input_ids [B,1], pos [B] (absolute position of the new token), the stacked per-layer caches (GQA: k, v
        [L,B,kv,T,d]; MLA: c_kv [L,B,T,r], k_pe [L,B,T,rope]) -> logits [B,1,V] and the updated caches."""
        t = cache_a.shape[self.cache_seq_axis]
        cos, sin = self.rotary(pos.reshape(-1, 1))
        mask = position_mask(pos.reshape(-1, 1), t)
        h = self.embedding(input_ids)
        # split once: indexing cache[i] per layer copies a slice each time (measured ~47 ms per 6 MB on CPU)
        layers_a, layers_b = ops.unstack(cache_a, 0), ops.unstack(cache_b, 0)
        new_a, new_b = (), ()
        i = 0
        for layer in self.decoder.layers:
            out, ca, cb = layer.self_attention.decode_step(layer.input_layernorm(h), cos, sin, mask, layers_a[i],
                                                           layers_b[i], pos)
            h = h + out
            h = h + layer.mlp(layer.pre_mlp_layernorm(h))
            new_a += (ca,)
            new_b += (cb,)
            i += 1
        return self.head(h), ops.stack(new_a), ops.stack(new_b)


class GQACausalLM(CausalLMBase):
    cache_seq_axis = 3

    def __init__(self, cfg: SourceConfig, dtype=ms.float32, use_fused=None, table_len=None):
        self.rope_dim = cfg.head_dim
        super().__init__(cfg, GQAAttention, dtype, use_fused, table_len)


class PrefillCell(nn.Cell):
    """Graph-compilable prefill: ids [B,S] -> logits, cache_a, cache_b (k, v for GQA; c_kv, k_rope for MLA)."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)  # keep the wrapped model's parameter names (MindFormers names)
        self.model = model

    def construct(self, input_ids):
        return self.model.prefill(input_ids)


class DecodeCell(nn.Cell):
    """Graph-compilable single-token step over a preallocated cache pair; the state is exactly the cache tensors."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)  # keep the wrapped model's parameter names (MindFormers names)
        self.model = model

    def construct(self, input_ids, pos, cache_a, cache_b):
        return self.model.decode(input_ids, pos, cache_a, cache_b)
