"""What the source (GQA) and converted (MLA) models share: the pre-norm decoder layer, the stack, the output head, the
masks and cache writes, and the two graph cells that serve generation and MindIR export.

An attention cell (`GQAAttention` in gqa.py, `MLAAttention` in mla.py) plugs in with one interface:
  construct(x, cos, sin, mask)                         -> out [B,S,D], and its two per-token cache entries
  decode_step(x, cos, sin, mask, cache, cache, pos)    -> out [B,1,D], the two caches with row pos written
and names its two cache tensors in `cache_names` (GQA: keys and values; MLA: the latent c_kv and the shared rope key
k_pe). A model's cache state is that pair stacked over the layers, passed in and out as plain tensors (no hidden
state), so the decode graph exports to MindIR with its state visible in the signature.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from youzhi_ms.models.layers import Embedding, Linear, RMSNorm, RotaryTable, SwiGLUMLP, fused_kernels_available

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


class DecoderLayer(nn.Cell):
    """Pre-norm block around any attention cell with the interface above; the residual path is written once and
    shared by the full forward and the one-token decode step."""

    def __init__(self, attention, hidden, inter, eps, dtype=ms.float32, use_fused=False):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps, dtype, use_fused)
        self.self_attention = attention
        self.pre_mlp_layernorm = RMSNorm(hidden, eps, dtype, use_fused)
        self.mlp = SwiGLUMLP(hidden, inter, dtype, use_fused)

    def residual(self, x, attn_out):
        h = x + attn_out
        return h + self.mlp(self.pre_mlp_layernorm(h))

    def construct(self, x, cos, sin, mask):
        out, entry_0, entry_1 = self.self_attention(self.input_layernorm(x), cos, sin, mask)
        return self.residual(x, out), entry_0, entry_1

    def decode_step(self, x, cos, sin, mask, cache_0, cache_1, pos):
        out, cache_0, cache_1 = self.self_attention.decode_step(self.input_layernorm(x), cos, sin, mask, cache_0,
                                                                cache_1, pos)
        return self.residual(x, out), cache_0, cache_1


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
    """Embedding, decoder stack, final norm and (tied or untied) output head; subclasses choose the attention.

    Three entry points share the weights:
      construct(ids)               -> logits                              full forward (eval, training, calibration)
      prefill(ids)                 -> logits, the two caches [L,B,..,S,..]  full forward that also returns the caches
      decode(ids[B,1], pos[B], *caches) -> logits, caches'               one token against a preallocated cache
    """

    rope_dim: int
    rope_interleaved = False
    cache_names: tuple  # the attention's two cache tensors, as the MindIR manifest names them
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
        entries_0, entries_1 = (), ()
        for layer in self.decoder.layers:
            h, entry_0, entry_1 = layer(h, cos, sin, mask)
            entries_0 += (entry_0,)
            entries_1 += (entry_1,)
        return h, entries_0, entries_1

    def construct(self, input_ids, attention_mask=None):
        return self.head(self.hidden_states(input_ids, attention_mask)[0])

    def prefill(self, input_ids, attention_mask=None):
        h, entries_0, entries_1 = self.hidden_states(input_ids, attention_mask)
        return self.head(h), ops.stack(entries_0), ops.stack(entries_1)

    def decode(self, input_ids, pos, *caches):
        """input_ids [B,1], pos [B] (absolute position of the new token), the two stacked caches (`cache_names`;
        GQA k, v [L,B,kv,T,d]; MLA c_kv [L,B,T,r], k_pe [L,B,T,rope]) -> logits [B,1,V] and the updated caches."""
        cache_0, cache_1 = caches
        t = cache_0.shape[self.cache_seq_axis]
        cos, sin = self.rotary(pos.reshape(-1, 1))
        mask = position_mask(pos.reshape(-1, 1), t)
        h = self.embedding(input_ids)
        # split once: indexing cache[i] per layer copies a slice each time (measured ~47 ms per 6 MB on CPU)
        layers_0, layers_1 = ops.unstack(cache_0, 0), ops.unstack(cache_1, 0)
        new_0, new_1 = (), ()
        i = 0
        for layer in self.decoder.layers:
            h, c0, c1 = layer.decode_step(h, cos, sin, mask, layers_0[i], layers_1[i], pos)
            new_0 += (c0,)
            new_1 += (c1,)
            i += 1
        return self.head(h), ops.stack(new_0), ops.stack(new_1)


class PrefillCell(nn.Cell):
    """Graph-compilable prefill: ids [B,S] -> logits and the model's two caches (`cache_names`)."""

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

    def construct(self, input_ids, pos, *caches):
        return self.model.decode(input_ids, pos, *caches)
