"""The student (MLA) and the teacher (GQA) as MindSpore's semi-auto parallel compiler needs them, with the GKD / SFT
losses: every operator a primitive with an explicit strategy, MindFormers' layout.

Why a second implementation of the same forward: under `semi_auto_parallel` an operator without a strategy is split
along its first axis over all devices of its pipeline stage, which fails for a global batch of dp rows ("the input
shape is 2, but the slice number is 4"), and `auto_parallel` with sharding propagation from a few sharded linears
fails in its cost model on the rotary / mask / stack operators of `models/` ("Edge cost initialization failed";
/work/shared/design/ascend_dryrun.md). MindFormers avoids both by giving every operator its strategy, which is what
this file does. `models/` stays the plain-op CPU reference; `tests/test_sharded_model.py` checks on CPU (where the
strategies are inert) that this forward and its losses equal the reference models' to float32 rounding, with the same
parameter names, so checkpoints and the strategy table move between the two.

Layout (d = data_parallel, m = model_parallel), hidden states [B, S, D] split (d, 1, 1):
  column-parallel linear  MatMul(x[N, in], W[out, in]^T)  ((d, 1), (m, 1))   q / kv_up / q_up / gate / up / lm head
  row-parallel linear                                      ((d, m), (1, m))   o_proj / down (all-reduce after)
  replicated linear (the shared latent)                    ((d, 1), (1, 1))   kv_down / q_down
  attention [B, H, S, *]: heads split over m ((d, m, 1, 1)); the MLA rope key k_pe [B, 1, S, rope] is shared by all
  heads and replicated over m; the vocabulary of the logits [N, V] is split over m and the losses reduce over it
  with reductions that all-reduce (log-softmax as max / sum-exp), so no rank ever holds full-vocabulary logits.
  embedding Gather: table replicated ((1, 1), (d, 1)) with vocab_emb_dp, else split by vocabulary rows ((m, 1), (1, 1)).
RMSNorm uses the fused Ascend kernel when `use_fused` (as `models/` does on Ascend), plain ops otherwise; the SwiGLU
MLP is always SiLU(gate) * up (the fused Swiglu kernel takes gate and up concatenated along the axis mp splits).

Parameters are created as shape-only placeholders (MindSpore `initializer`, materialised only by `set_data` or
`init_data`): the dry run of a 14B pair builds in seconds without memory; training fills them from the checkpoint.
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.ops.auto_generate.gen_ops_prim import SiLU
from mindspore.common.initializer import initializer

from youzhi_ms.config import MLAConfig, SourceConfig
from youzhi_ms.models.base import NEG_INF
from youzhi_ms.models.layers import RotaryTable
from youzhi_ms.models.mla import softmax_scale

__all__ = ["ShardedCausalLM", "ShardedGKDNet", "ShardedSFTNet", "build_sharded"]


def _placeholder(shape, name, dtype):
    return Parameter(initializer("zeros", tuple(int(s) for s in shape), dtype), name=name)


class _Linear(nn.Cell):
    """y = x W^T (+ b) over the flattened tokens; kind: 'col' | 'row' | 'rep' (see the module docstring)."""

    def __init__(self, in_f, out_f, bias, kind, dp, mp, dtype):
        super().__init__()
        self.in_f, self.out_f = in_f, out_f
        self.weight = _placeholder((out_f, in_f), "weight", dtype)
        self.has_bias = bool(bias)
        self.bias = _placeholder((out_f,), "bias", dtype) if bias else None
        if kind == "col":
            strategy, out_split = ((dp, 1), (mp, 1)), (dp, mp)
        elif kind == "row":
            strategy, out_split = ((dp, mp), (1, mp)), (dp, 1)
        else:
            strategy, out_split = ((dp, 1), (1, 1)), (dp, 1)
        self.matmul = ops.MatMul(transpose_b=True).shard(strategy)
        self.add = ops.Add().shard((out_split, (out_split[1],)))

    def construct(self, x):
        shape = x.shape
        y = self.matmul(x.reshape(-1, self.in_f), self.weight)
        if self.has_bias:
            y = self.add(y, self.bias)
        return y.reshape(shape[:-1] + (self.out_f,))


class _RMSNorm(nn.Cell):
    """RMSNorm over the last axis of x [.., dim] whose leading axis is split over dp; same math as models/layers."""

    def __init__(self, dim, eps, dp, ndim, use_fused, dtype):
        super().__init__()
        self.weight = _placeholder((dim,), "weight", dtype)
        self.eps = float(eps)
        self.use_fused = use_fused
        x_s = (dp,) + (1,) * (ndim - 1)
        self.fused = ops.RmsNorm(self.eps).shard((x_s, (1,)))
        self.cast = ops.Cast()
        self.square = ops.Mul().shard((x_s, x_s))
        self.mean = ops.ReduceMean(keep_dims=True).shard((x_s,))
        self.add_eps = ops.Add().shard((x_s, ()))
        self.rsqrt = ops.Rsqrt().shard((x_s,))
        self.scale = ops.Mul().shard((x_s, x_s))
        self.mul_w = ops.Mul().shard(((1,), x_s))

    def construct(self, x):
        if self.use_fused:
            return self.fused(x, self.weight)[0]
        xf = self.cast(x, ms.float32)
        xf = self.scale(xf, self.rsqrt(self.add_eps(self.mean(self.square(xf, xf), -1), self.eps)))
        return self.mul_w(self.weight, self.cast(xf, x.dtype))


class _MLP(nn.Cell):
    def __init__(self, hidden, inter, dp, mp, dtype):
        super().__init__()
        self.gating = _Linear(hidden, inter, False, "col", dp, mp, dtype)
        self.hidden = _Linear(hidden, inter, False, "col", dp, mp, dtype)
        self.linear_fc2 = _Linear(inter, hidden, False, "row", dp, mp, dtype)
        s3 = (dp, 1, mp)
        self.silu = SiLU().shard((s3,))
        self.mul = ops.Mul().shard((s3, s3))

    def construct(self, x):
        gate, up = self.gating(x), self.hidden(x)
        h = self.mul(self.silu(gate), up)
        return self.linear_fc2(h)


class _Rope(nn.Cell):
    """x * cos + rotate(x) * sin for x [B, H, S, rope] with H split `heads_split` ways; interleaved pairs (DeepSeek-V3)
    or the half-split layout (Llama / Qwen2), as models/layers.py."""

    def __init__(self, rope, interleaved, dp, heads_split):
        super().__init__()
        self.rope, self.interleaved = rope, interleaved
        s4 = (dp, heads_split, 1, 1)
        s5 = s4 + (1,)
        self.neg = ops.Neg().shard((s5,) if interleaved else (s4,))
        self.slice = ops.StridedSlice().shard((s5,) if interleaved else (s4,))
        self.concat = ops.Concat(-1).shard((s5, s5) if interleaved else (s4, s4))
        self.mul_cos = ops.Mul().shard((s4, (1, 1, 1, 1)))
        self.mul_sin = ops.Mul().shard((s4, (1, 1, 1, 1)))
        self.add = ops.Add().shard((s4, s4))

    def rotate(self, x):
        b, h, s, r = x.shape
        if self.interleaved:  # (x0, y0, x1, y1, ...) -> (-y0, x0, -y1, x1, ...)
            pairs = x.reshape(b, h, s, r // 2, 2)
            first = self.slice(pairs, (0, 0, 0, 0, 0), (b, h, s, r // 2, 1), (1, 1, 1, 1, 1))
            second = self.slice(pairs, (0, 0, 0, 0, 1), (b, h, s, r // 2, 2), (1, 1, 1, 1, 1))
            return self.concat((self.neg(second), first)).reshape(b, h, s, r)
        half = r // 2
        lo = self.slice(x, (0, 0, 0, 0), (b, h, s, half), (1, 1, 1, 1))
        hi = self.slice(x, (0, 0, 0, half), (b, h, s, r), (1, 1, 1, 1))
        return self.concat((self.neg(hi), lo))

    def construct(self, x, cos, sin):
        return self.add(self.mul_cos(x, cos), self.mul_sin(self.rotate(x), sin))


class _Attention(nn.Cell):
    """Shared tail: scores -> softmax -> values -> o_proj, for q/k [B, H, S, *] split (dp, mp)."""

    def __init__(self, dp, mp):
        super().__init__()
        s4 = (dp, mp, 1, 1)
        self.s4 = s4
        self.qk = ops.BatchMatMul(transpose_b=True).shard((s4, s4))
        self.pv = ops.BatchMatMul().shard((s4, s4))
        self.mul_scale = ops.Mul().shard((s4, ()))
        self.add_mask = ops.Add().shard((s4, (1, 1, 1, 1)))
        self.softmax = ops.Softmax(-1).shard((s4,))
        self.cast = ops.Cast()
        self.slice = ops.StridedSlice().shard((s4,))
        self.split_heads = ops.Transpose().shard(((dp, 1, mp, 1),))
        self.merge_heads = ops.Transpose().shard((s4,))

    def heads(self, y, b, s, h, d):
        """[B, S, H*d] -> [B, H, S, d]."""
        return self.split_heads(y.reshape(b, s, h, d), (0, 2, 1, 3))

    def cut(self, x, start, stop):
        b, h, s, _ = x.shape
        return self.slice(x, (0, 0, 0, start), (b, h, s, stop), (1, 1, 1, 1))

    def merge(self, o):
        """[B, H, S, d] -> [B, S, H*d]."""
        b, h, s, d = o.shape
        return self.merge_heads(o, (0, 2, 1, 3)).reshape(b, s, h * d)


class ShardedGQAAttention(_Attention):
    def __init__(self, cfg: SourceConfig, dp, mp, dtype):
        super().__init__(dp, mp)
        d, h, kv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        self.head_dim, self.num_heads, self.num_kv_heads, self.group = d, h, kv, h // kv
        self.scale = d ** -0.5
        self.linear_q = _Linear(cfg.hidden_size, h * d, cfg.qkv_bias, "col", dp, mp, dtype)
        self.linear_k = _Linear(cfg.hidden_size, kv * d, cfg.qkv_bias, "col", dp, mp, dtype)
        self.linear_v = _Linear(cfg.hidden_size, kv * d, cfg.qkv_bias, "col", dp, mp, dtype)
        self.linear_proj = _Linear(h * d, cfg.hidden_size, cfg.o_bias, "row", dp, mp, dtype)
        self.rope = _Rope(d, False, dp, mp)

    def construct(self, x, cos, sin, mask):
        b, s, _ = x.shape
        q = self.rope(self.heads(self.linear_q(x), b, s, self.num_heads, self.head_dim), cos, sin)
        k = self.rope(self.heads(self.linear_k(x), b, s, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.heads(self.linear_v(x), b, s, self.num_kv_heads, self.head_dim)
        # the query heads of one kv group stacked along rows, as models/gqa.py (mp divides the kv heads)
        qg = q.reshape(b, self.num_kv_heads, self.group * s, self.head_dim)
        scores = self.mul_scale(self.qk(qg, k).reshape(b, self.num_heads, s, s), self.scale)
        probs = self.cast(self.softmax(self.add_mask(self.cast(scores, ms.float32), mask)), v.dtype)
        out = self.pv(probs.reshape(b, self.num_kv_heads, self.group * s, s), v)
        return self.linear_proj(self.merge(out.reshape(b, self.num_heads, s, self.head_dim)))


class ShardedMLAAttention(_Attention):
    def __init__(self, cfg: MLAConfig, dp, mp, dtype, use_fused):
        super().__init__(dp, mp)
        h, D = cfg.num_heads, cfg.hidden_size
        self.num_heads, self.nope, self.rope_dim, self.vdim, self.rank = (h, cfg.qk_nope_head_dim,
                                                                          cfg.qk_rope_head_dim, cfg.v_head_dim,
                                                                          cfg.kv_lora_rank)
        self.qk_dim = cfg.qk_head_dim
        self.scale = softmax_scale(cfg)
        self.q_lora = cfg.q_lora_rank is not None
        if self.q_lora:
            self.linear_q_down_proj = _Linear(D, cfg.q_lora_rank, cfg.attention_bias, "rep", dp, mp, dtype)
            self.q_layernorm = _RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dp, 3, use_fused, dtype)
            self.linear_q_up_proj = _Linear(cfg.q_lora_rank, h * self.qk_dim, False, "col", dp, mp, dtype)
        else:
            self.linear_q_proj = _Linear(D, h * self.qk_dim, cfg.q_bias, "col", dp, mp, dtype)
        self.linear_kv_down_proj = _Linear(D, self.rank + self.rope_dim, cfg.attention_bias, "rep", dp, mp, dtype)
        self.use_kv_norm = cfg.kv_layernorm
        self.kv_layernorm = _RMSNorm(self.rank, cfg.rms_norm_eps, dp, 3, use_fused, dtype) if cfg.kv_layernorm \
            else None
        self.linear_kv_up_proj = _Linear(self.rank, h * (self.nope + self.vdim), False, "col", dp, mp, dtype)
        self.linear_proj = _Linear(h * self.vdim, D, cfg.attention_bias, "row", dp, mp, dtype)
        self.rope_q = _Rope(self.rope_dim, cfg.rope_interleave, dp, mp)
        self.rope_k = _Rope(self.rope_dim, cfg.rope_interleave, dp, 1)
        self.slice_kv = ops.StridedSlice().shard(((dp, 1, 1),))
        self.k_heads = ops.Transpose().shard(((dp, 1, 1, 1),))
        # the rope key is shared by all heads: broadcast it to the local heads, then the per-head product
        self.tile_k = ops.Tile().shard(((dp, 1, 1, 1),))
        self.add_scores = ops.Add().shard((self.s4, self.s4))

    def construct(self, x, cos, sin, mask):
        b, s, _ = x.shape
        if self.q_lora:
            q = self.linear_q_up_proj(self.q_layernorm(self.linear_q_down_proj(x)))
        else:
            q = self.linear_q_proj(x)
        q = self.heads(q, b, s, self.num_heads, self.qk_dim)
        q_nope, q_pe = self.cut(q, 0, self.nope), self.rope_q(self.cut(q, self.nope, self.qk_dim), cos, sin)
        kv = self.linear_kv_down_proj(x)
        c_kv = self.slice_kv(kv, (0, 0, 0), (b, s, self.rank), (1, 1, 1))
        if self.use_kv_norm:
            c_kv = self.kv_layernorm(c_kv)
        k_pe = self.slice_kv(kv, (0, 0, self.rank), (b, s, self.rank + self.rope_dim), (1, 1, 1))
        k_pe = self.rope_k(self.k_heads(k_pe.reshape(b, s, 1, self.rope_dim), (0, 2, 1, 3)), cos, sin)
        kv = self.heads(self.linear_kv_up_proj(c_kv), b, s, self.num_heads, self.nope + self.vdim)
        k_nope, v = self.cut(kv, 0, self.nope), self.cut(kv, self.nope, self.nope + self.vdim)
        scores = self.add_scores(self.qk(q_nope, k_nope), self.qk(q_pe, self.tile_k(k_pe, (1, self.num_heads, 1, 1))))
        probs = self.cast(self.softmax(self.add_mask(self.mul_scale(self.cast(scores, ms.float32), self.scale),
                                                     mask)), v.dtype)
        return self.linear_proj(self.merge(self.pv(probs, v)))


class _DecoderLayer(nn.Cell):
    def __init__(self, attention, hidden, inter, eps, dp, mp, use_fused, dtype):
        super().__init__()
        self.input_layernorm = _RMSNorm(hidden, eps, dp, 3, use_fused, dtype)
        self.self_attention = attention
        self.pre_mlp_layernorm = _RMSNorm(hidden, eps, dp, 3, use_fused, dtype)
        self.mlp = _MLP(hidden, inter, dp, mp, dtype)
        s3 = (dp, 1, 1)
        self.add1 = ops.Add().shard((s3, s3))
        self.add2 = ops.Add().shard((s3, s3))

    def construct(self, x, cos, sin, mask):
        h = self.add1(x, self.self_attention(self.input_layernorm(x), cos, sin, mask))
        return self.add2(h, self.mlp(self.pre_mlp_layernorm(h)))


class _Decoder(nn.Cell):
    def __init__(self, layers, hidden, eps, dp, use_fused, dtype):
        super().__init__()
        self.layers = nn.CellList(layers)
        self.final_layernorm = _RMSNorm(hidden, eps, dp, 3, use_fused, dtype)


class _Embedding(nn.Cell):
    def __init__(self, vocab, hidden, dp, mp, vocab_emb_dp, dtype):
        super().__init__()
        self.weight = _placeholder((vocab, hidden), "weight", dtype)
        table, ids = ((1, 1), (dp, 1)) if vocab_emb_dp else ((mp, 1), (1, 1))
        self.gather = ops.Gather().shard((table, ids))

    def construct(self, ids):
        return self.gather(self.weight, ids, 0)


class _EmbeddingBlock(nn.Cell):
    def __init__(self, vocab, hidden, dp, mp, vocab_emb_dp, dtype):
        super().__init__()
        self.word_embeddings = _Embedding(vocab, hidden, dp, mp, vocab_emb_dp, dtype)

    def construct(self, ids):
        return self.word_embeddings(ids)


class ShardedCausalLM(nn.Cell):
    """input_ids [B, S] -> logits [B*S, V] (vocabulary split over mp). Parameter names as models/ (MindFormers)."""

    def __init__(self, cfg, seq_length: int, dp: int, mp: int, vocab_emb_dp: bool = True, use_fused: bool = False,
                 dtype=ms.float32):
        super().__init__()
        mla = isinstance(cfg, MLAConfig)
        self.cfg = cfg
        self.vocab = cfg.vocab_size
        self.embedding = _EmbeddingBlock(cfg.vocab_size, cfg.hidden_size, dp, mp, vocab_emb_dp, dtype)
        layers = []
        for _ in range(cfg.num_layers):
            att = ShardedMLAAttention(cfg, dp, mp, dtype, use_fused) if mla else ShardedGQAAttention(cfg, dp, mp,
                                                                                                     dtype)
            layers.append(_DecoderLayer(att, cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps, dp, mp,
                                        use_fused, dtype))
        self.decoder = _Decoder(layers, cfg.hidden_size, cfg.rms_norm_eps, dp, use_fused, dtype)
        self.tied = cfg.tie_word_embeddings
        if self.tied:
            self.head_matmul = ops.MatMul(transpose_b=True).shard(((dp, 1), (mp, 1)))
        else:
            self.output_layer = _Linear(cfg.hidden_size, cfg.vocab_size, False, "col", dp, mp, dtype)
        rope = cfg.qk_rope_head_dim if mla else cfg.head_dim
        table = RotaryTable(rope, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings, table_len=seq_length,
                            interleaved=mla and cfg.rope_interleave)
        # training positions are 0..S-1 for every row: the rotary rows and the causal mask are constants
        self.cos = Tensor(table.cos.asnumpy()[:seq_length][None, None], ms.float32)
        self.sin = Tensor(table.sin.asnumpy()[:seq_length][None, None], ms.float32)
        self.mask = Tensor(np.triu(np.full((seq_length, seq_length), NEG_INF, np.float32), 1)[None, None], ms.float32)

    def set_pp_stages(self, pipeline_stage: int) -> None:
        """Layer i of L on stage i * pp // L (parallel.plan_parallel uses the same split); embedding on the first stage,
        final norm and head on the last. Only leaf blocks get a stage: a stage set on an enclosing cell overrides its
        children's (measured: every parameter then lands on that stage)."""
        pp = int(pipeline_stage)
        self.embedding.pipeline_stage = 0
        n = len(self.decoder.layers)
        for i, layer in enumerate(self.decoder.layers):
            layer.pipeline_stage = i * pp // n
        self.decoder.final_layernorm.pipeline_stage = pp - 1
        if not self.tied:
            self.output_layer.pipeline_stage = pp - 1

    def construct(self, input_ids):
        h = self.embedding(input_ids)
        for layer in self.decoder.layers:
            h = layer(h, self.cos, self.sin, self.mask)
        h = self.decoder.final_layernorm(h)
        h = h.reshape(-1, h.shape[-1])
        if self.tied:
            return self.head_matmul(h, self.embedding.word_embeddings.weight)
        return self.output_layer(h)


class _VocabParallel(nn.Cell):
    """Reductions over the vocabulary axis of [N, V] tensors split (dp, mp): each all-reduces over mp."""

    def __init__(self, dp, mp):
        super().__init__()
        s2, s1 = (dp, mp), (dp, 1)
        self.cast = ops.Cast()
        self.div = ops.RealDiv().shard((s2, ()))
        self.max = ops.ReduceMax(keep_dims=True).shard((s2,))
        self.sub = ops.Sub().shard((s2, s1))
        self.exp = ops.Exp().shard((s2,))
        self.sum_keep = ops.ReduceSum(keep_dims=True).shard((s2,))
        self.sum_rows = ops.ReduceSum(keep_dims=False).shard((s2,))
        self.log = ops.Log().shard((s1,))
        self.add = ops.Add().shard((s1, s1))
        self.stop = ops.StopGradient()

    def log_softmax(self, x):
        """x - logsumexp(x); the max is a constant for the gradient (it cancels exactly)."""
        m = self.stop(self.max(x, -1))
        return self.sub(x, self.add(m, self.log(self.sum_keep(self.exp(self.sub(x, m)), -1))))


class _MaskedSum(nn.Cell):
    """Sum over scored tokens of per-token values [N] (mask [N], nonzero = scored); NaN at ignored tokens cannot
    leak (selected away, not multiplied by 0)."""

    def __init__(self, dp):
        super().__init__()
        self.cast = ops.Cast()
        self.gt = ops.Greater().shard(((dp,), ()))
        self.select = ops.Select().shard(((dp,), (dp,), (dp,)))
        self.zeros = ops.ZerosLike().shard(((dp,),))
        self.sum = ops.ReduceSum(keep_dims=False).shard(((dp,),))

    def construct(self, per_token, mask):
        keep = self.gt(self.cast(mask, ms.float32), 0.0)
        return self.sum(self.select(keep, per_token, self.zeros(per_token)), ())


class ShardedGKDNet(nn.Cell):
    """Sum over scored tokens of the generalized JSD (losses.generalized_jsd, jsd_beta limits included), vocabulary
    split over mp. trainer.GKDNet's inputs without `scale`: the step applies it as the backward's sensitivity, because
    pipeline parallel cuts every input along the batch axis (parallel_step.py)."""

    def __init__(self, student, teacher, jsd_beta, temperature, dp, mp):
        super().__init__(auto_prefix=False)
        self.student, self.teacher = student, teacher
        self.jsd_beta, self.temperature = float(jsd_beta), float(temperature)
        self.vp = _VocabParallel(dp, mp)
        s2 = (dp, mp)
        self.mul_p = ops.Mul().shard((s2, s2))
        self.sub = ops.Sub().shard((s2, s2))
        self.add_c = ops.Add().shard((s2, ()))
        self.maximum = ops.Maximum().shard((s2, s2))
        self.add = ops.Add().shard((s2, s2))
        self.exp = ops.Exp().shard((s2,))
        self.log = ops.Log().shard((s2,))
        self.mix = ops.Add().shard(((dp,), (dp,)))
        self.weigh_t = ops.Mul().shard(((dp,), ()))
        self.weigh_s = ops.Mul().shard(((dp,), ()))
        self.masked_sum = _MaskedSum(dp)
        self.stop = ops.StopGradient()

    def kl_rows(self, logp, logq):
        return self.vp.sum_rows(self.mul_p(self.exp(logp), self.sub(logp, logq)), -1)

    def construct(self, input_ids, labels, loss_mask):
        vp = self.vp
        student = vp.cast(self.student(input_ids), ms.float32)
        teacher = self.stop(vp.cast(self.teacher(input_ids), ms.float32))
        if self.temperature != 1.0:
            student, teacher = vp.div(student, self.temperature), vp.div(teacher, self.temperature)
        logp_s, logp_t = vp.log_softmax(student), vp.log_softmax(teacher)
        if self.jsd_beta == 0.0:
            per_token = self.kl_rows(logp_t, logp_s)
        elif self.jsd_beta == 1.0:
            per_token = self.kl_rows(logp_s, logp_t)
        else:
            a = self.add_c(logp_t, math.log(self.jsd_beta))
            b = self.add_c(logp_s, math.log(1.0 - self.jsd_beta))
            shift = self.stop(self.maximum(a, b))
            log_m = self.add(shift, self.log(self.add(self.exp(self.sub(a, shift)), self.exp(self.sub(b, shift)))))
            per_token = self.mix(self.weigh_t(self.kl_rows(logp_t, log_m), self.jsd_beta),
                                 self.weigh_s(self.kl_rows(logp_s, log_m), 1.0 - self.jsd_beta))
        return self.masked_sum(per_token, loss_mask.reshape(-1))


class ShardedSFTNet(nn.Cell):
    """Sum over scored tokens of the next-token cross entropy (labels already shifted; no scale, as above); the label's
    log-probability is picked with a one-hot over the split vocabulary (a gather would need the whole row)."""

    def __init__(self, student, dp, mp):
        super().__init__(auto_prefix=False)
        self.student = student
        self.vocab = student.vocab
        self.vp = _VocabParallel(dp, mp)
        self.onehot = ops.OneHot().shard(((dp, mp), (), ()))
        self.pick = ops.Mul().shard(((dp, mp), (dp, mp)))
        self.neg = ops.Neg().shard(((dp,),))
        self.masked_sum = _MaskedSum(dp)
        self.on, self.off = Tensor(1.0, ms.float32), Tensor(0.0, ms.float32)

    def construct(self, input_ids, labels, loss_mask):
        logp = self.vp.log_softmax(self.vp.cast(self.student(input_ids), ms.float32))
        hot = self.onehot(labels.reshape(-1), self.vocab, self.on, self.off)
        nll = self.neg(self.vp.sum_rows(self.pick(logp, hot), -1))
        return self.masked_sum(nll, loss_mask.reshape(-1))


def build_sharded(student_cfg, teacher_cfg, seq_length, dp, mp, vocab_emb_dp=True, use_fused=False,
                  student_dtype=ms.float32, teacher_dtype=ms.float32, jsd_beta=0.5, temperature=1.0):
    """(loss_net, student, teacher) in the sharded form; teacher None -> SFT. Teacher parameters renamed 'teacher.*'
    and frozen, as the trainer does (both models live in one graph)."""
    student = ShardedCausalLM(student_cfg, seq_length, dp, mp, vocab_emb_dp, use_fused, student_dtype)
    if teacher_cfg is None:
        return ShardedSFTNet(student, dp, mp), student, None
    teacher = ShardedCausalLM(teacher_cfg, seq_length, dp, mp, vocab_emb_dp, use_fused, teacher_dtype)
    for p in teacher.get_parameters():
        p.name = "teacher." + p.name
        p.requires_grad = False
    return ShardedGKDNet(student, teacher, jsd_beta, temperature, dp, mp), student, teacher
