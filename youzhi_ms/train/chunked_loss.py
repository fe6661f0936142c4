"""The GKD loss computed from hidden states in token chunks with a hand-written backward: no [tokens, vocab] tensor
is ever whole, and none is kept for the backward pass.

Why: with the plain loss (`losses.generalized_jsd` on full logits) MindSpore's autodiff keeps every vocabulary-sized
intermediate of the forward for the backward (logits, log-softmaxes, exps, the mixture, ... of both models: ~100 MB
each for 2 x 256 tokens x 49,152 words, a few GB in all on CPU, where the graph holds them to the end of the step).
Here the forward keeps only its inputs (final-norm hidden states [N, D] and the head weights), and `bprop` recomputes
one chunk of `chunk_rows` tokens at a time, so the vocabulary-sized working set is `chunk_rows x V` per tensor.
Consecutive chunks are chained with `ops.depend` so the scheduler cannot run them side by side.

Gradients (z = student logits / tau, p = softmax(z), per scored token, times `scale` and the incoming gradient):

    d JSD_beta / dp = (1 - jsd_beta) log(p / m)                  0 < jsd_beta < 1 (m = jsd_beta q + (1 - jsd_beta) p)
    d KL(p || q) / dp = log(p / q) + 1                        jsd_beta = 1 (the constant cancels below)
    dL/dz = p * (g - sum(p * g))  for g = dL/dp;  jsd_beta = 0 (KL(q || p)) gives p - q directly.

The same holds over *buckets*: in the offline mode (`TopKGKDLoss`) the teacher is known on k stored words plus one
tail bucket holding the rest of its mass, the student's distribution is folded onto the same k + 1 buckets, and the
generalized JSD is taken between the two (k + 1)-way distributions. The gradient of a bucketed loss w.r.t. a word's
logit is p_i (g_b(i) - sum_b p_b g_b) with b(i) the word's bucket; for jsd_beta = 0 it is p_i - q_b(i) p_i / p_b(i).
With k = V (no tail) the bucketed loss is the live one.

Values equal `losses.generalized_jsd` (the forward calls the same `jsd_from_logprobs`); the backward is checked against
float64 autograd in tests/test_chunked_loss.py.
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import nn, ops

from youzhi_ms.errors import YouzhiError
from youzhi_ms.models.layers import spread
from youzhi_ms.train.losses import _check_gkd_args, jsd_from_logprobs

__all__ = ["ChunkedGKDLoss", "TopKGKDLoss", "ChunkedGKDNet", "TeacherHidden", "TopKGKDNet", "head_weight",
           "final_hidden", "NEG_LOGMASS"]

# Floor for log-masses of empty buckets (k = V, or a tail the teacher gives no mass): exp(NEG) is exactly 0 and every
# product with it stays finite, where -inf would give 0 * inf = NaN in the gradient.
NEG_LOGMASS = -1.0e30


def head_weight(model):
    """The output head's [V, D] weight of a youzhi_ms causal LM (the embedding when tied)."""
    return model.embedding.word_embeddings.weight if model.tied else model.output_layer.weight


def weight_input(w):
    """A head weight as an input of a custom-bprop Cell. MindSpore 2.10 cannot compile a Parameter passed straight
    into a Cell with `bprop` ("start_offset exceeds the number of new args"), nor through identity/depend; a
    multiplication by 1 gives it a computed tensor (a copy of the [V, D] weight: 113 MB for SmolLM2)."""
    return w * 1.0


def final_hidden(model, input_ids):
    """Final-norm output [B, T, D]: what the head multiplies with its weight."""
    h, _, _ = model.hidden_states(input_ids)
    return model.decoder.final_layernorm(h)


# primitives, not the functional wrappers: some wrappers (zeros_like, logsumexp) fail to compile inside a bprop
_zeros_like = ops.ZerosLike()
_max_keep = ops.ReduceMax(keep_dims=True)
_sum_keep = ops.ReduceSum(keep_dims=True)


def _lse(x):
    """logsumexp over the last axis, kept as a [.., 1] column."""
    m = _max_keep(x, -1)
    return m + ops.log(_sum_keep(ops.exp(x - spread(m, x)), -1))


def _chunks(n, rows):
    """(start, end) of consecutive row chunks (plain int arithmetic: graph mode folds it at compile time)."""
    out = []
    for s in range(0, n, rows):
        e = s + rows
        if e > n:
            e = n
        out.append((s, e))
    return out


def _soft_grad(p, g):
    """d/dz of a loss whose derivative w.r.t. p = softmax(z) is g (rows)."""
    return p * (g - spread(_sum_keep(p * g, -1), g))


class _ChunkedHead(nn.Cell):
    """Shared machinery: chunked student logits from (h [N, D], w [V, D]), the masked sum of per-token losses times
    `scale`, and a backward that returns dL/dh (and dL/dw when `weight_grad`)."""

    def __init__(self, jsd_beta, temperature, chunk_rows, weight_grad):
        super().__init__()
        jsd_beta, temperature = float(jsd_beta), float(temperature)
        _check_gkd_args(jsd_beta, temperature, "sum", YouzhiError)
        if int(chunk_rows) < 1:
            raise YouzhiError(f"loss chunk rows must be >= 1, got {chunk_rows}")
        self.jsd_beta = jsd_beta
        self.inv_tau = 1.0 / temperature
        self.rows = int(chunk_rows)
        self.weight_grad = bool(weight_grad)
        self.log_b = math.log(jsd_beta) if 0.0 < jsd_beta < 1.0 else 0.0
        self.log_1mb = math.log(1.0 - jsd_beta) if 0.0 < jsd_beta < 1.0 else 0.0

    def logp(self, h_c, w):
        return ops.log_softmax(ops.dense(ops.cast(h_c, ms.float32), ops.cast(w, ms.float32)) * self.inv_tau, -1)

    def grad_p(self, lp, lq):
        """dJSD/dp over the last axis (0 < jsd_beta < 1 and jsd_beta = 1)."""
        if self.jsd_beta == 1.0:
            return lp - lq
        a = lq + self.log_b
        b = lp + self.log_1mb
        shift = ops.maximum(a, b)
        log_m = shift + ops.log(ops.exp(a - shift) + ops.exp(b - shift))
        return (1.0 - self.jsd_beta) * (lp - log_m)

    def summed(self, h, w, teacher, mask, scale):
        """scale * sum over scored rows of `chunk_loss`, one chunk after the other (bounded working set)."""
        keep = ops.cast(mask, ms.float32) > 0.0
        total = ops.zeros((), ms.float32)
        for s, e in _chunks(h.shape[0], self.rows):
            per_token = self.chunk_loss(ops.depend(h[s:e], total), w, teacher, s, e)
            total = total + ops.sum(ops.where(keep[s:e], per_token, _zeros_like(per_token)))
        return total * ops.cast(scale, ms.float32)

    def backward(self, h, w, teacher, mask, scale, dout):
        """(dL/dh, dL/dw or zeros) from `chunk_dz` (d per-token loss / d logits*1/tau) chunk by chunk."""
        keep = ops.cast(mask, ms.float32) > 0.0
        coef = ops.cast(scale, ms.float32) * ops.cast(dout, ms.float32) * self.inv_tau
        w32 = ops.cast(w, ms.float32)
        dw = ops.zeros(w.shape, ms.float32)
        dhs = ()
        prev = coef
        for s, e in _chunks(h.shape[0], self.rows):
            h_c = ops.depend(h[s:e], prev)
            dz = self.chunk_dz(h_c, w, teacher, s, e) * coef
            dz = ops.masked_fill(dz, spread(ops.logical_not(ops.expand_dims(keep[s:e], -1)), dz), 0.0)
            dh_c = ops.matmul(dz, w32)
            if self.weight_grad:
                dw = dw + ops.matmul(dz.T, ops.cast(h_c, ms.float32))
            dhs += (dh_c,)
            prev = dh_c
        dh = ops.cast(ops.concat(dhs, 0), h.dtype)
        return dh, (ops.cast(dw, w.dtype) if self.weight_grad else _zeros_like(w))


class ChunkedGKDLoss(_ChunkedHead):
    """Live teacher: `loss(h, w, t_h, t_w, mask, scale)` = scale * sum over scored tokens of JSD_beta(P_T || P_S),
    P_S = softmax(h w^T / tau), P_T = softmax(t_h t_w^T / tau). h, t_h: [N, D] final-norm hidden states; w, t_w:
    [V, D] head weights; mask [N]. Gradient flows into h (and w when `weight_grad`); the teacher is a constant."""

    def chunk_loss(self, h_c, w, teacher, s, e):
        t_h, t_w = teacher
        return jsd_from_logprobs(self.logp(h_c, w), self.logp(t_h[s:e], t_w), self.jsd_beta)

    def chunk_dz(self, h_c, w, teacher, s, e):
        t_h, t_w = teacher
        lp = self.logp(h_c, w)
        lq = self.logp(t_h[s:e], t_w)
        p = ops.exp(lp)
        if self.jsd_beta == 0.0:
            return p - ops.exp(lq)
        return _soft_grad(p, self.grad_p(lp, lq))

    def construct(self, h, w, t_h, t_w, mask, scale):
        return self.summed(h, w, (t_h, t_w), mask, scale)

    def bprop(self, h, w, t_h, t_w, mask, scale, out, dout):
        dh, dw = self.backward(h, w, (t_h, t_w), mask, scale, dout)
        return dh, dw, _zeros_like(t_h), _zeros_like(t_w), _zeros_like(mask), _zeros_like(scale)


class TopKGKDLoss(_ChunkedHead):
    """Offline teacher: `loss(h, w, ids, lq_top, lq_tail, mask, scale)`; ids [N, k] int32 (distinct per row), lq_top
    [N, k] the teacher's log-probabilities (at the loss temperature) of those words, lq_tail [N] the log of its
    remaining mass. The generalized JSD over the k + 1 buckets (module docstring)."""

    def buckets(self, h_c, w, ids_c):
        """Student log-probs: per word [c, V], per bucket [c, k + 1] (the stored words, then the tail)."""
        z = ops.dense(ops.cast(h_c, ms.float32), ops.cast(w, ms.float32)) * self.inv_tau
        lse = _lse(z)
        lp = z - spread(lse, z)
        off = ops.tensor_scatter_elements(z, ids_c, _zeros_like(ops.cast(ids_c, ms.float32)) + NEG_LOGMASS, 1)
        lp_tail = ops.maximum(_lse(off) - lse, NEG_LOGMASS)
        return lp, ops.concat((ops.gather_elements(lp, 1, ids_c), lp_tail), -1)

    @staticmethod
    def teacher_buckets(teacher, s, e):
        _, lq_top, lq_tail = teacher
        return ops.concat((ops.cast(lq_top[s:e], ms.float32),
                           ops.maximum(ops.cast(ops.expand_dims(lq_tail[s:e], -1), ms.float32), NEG_LOGMASS)), -1)

    def chunk_loss(self, h_c, w, teacher, s, e):
        _, lp_b = self.buckets(h_c, w, teacher[0][s:e])
        return jsd_from_logprobs(lp_b, self.teacher_buckets(teacher, s, e), self.jsd_beta)

    def chunk_dz(self, h_c, w, teacher, s, e):
        ids_c = teacher[0][s:e]
        lp, lp_b = self.buckets(h_c, w, ids_c)
        lq_b = self.teacher_buckets(teacher, s, e)
        p = ops.exp(lp)
        if self.jsd_beta == 0.0:
            # p_i - q_b p_i / p_b: for a stored word p_i = p_b; for the tail, q_tail exp(lp_i - lp_tail)
            q_word = ops.exp(lp + spread(lq_b[:, -1:] - lp_b[:, -1:], lp))
            return p - ops.tensor_scatter_elements(q_word, ids_c, ops.exp(lq_b[:, :-1]), 1)
        g = self.grad_p(lp_b, lq_b)  # per bucket [c, k + 1]
        g_mean = _sum_keep(ops.exp(lp_b) * g, -1)
        g_word = ops.tensor_scatter_elements(ops.broadcast_to(g[:, -1:], lp.shape), ids_c, g[:, :-1], 1)
        return p * (g_word - spread(g_mean, g_word))

    def construct(self, h, w, ids, lq_top, lq_tail, mask, scale):
        return self.summed(h, w, (ids, lq_top, lq_tail), mask, scale)

    def bprop(self, h, w, ids, lq_top, lq_tail, mask, scale, out, dout):
        dh, dw = self.backward(h, w, (ids, lq_top, lq_tail), mask, scale, dout)
        return (dh, dw, _zeros_like(ids), _zeros_like(lq_top), _zeros_like(lq_tail), _zeros_like(mask),
                _zeros_like(scale))


# ---------------------------------------------------------------------------------------------------- trainer nets
class ChunkedGKDNet(nn.Cell):
    """The trainer's distill loss with `ChunkedGKDLoss` (same call as losses.GKDNet). `teacher_outside`: the teacher's
    final hidden states arrive as a fifth input (computed by `TeacherHidden` in its own no-grad graph) instead of
    being computed here under stop_gradient."""

    def __init__(self, student, teacher, jsd_beta, temperature, chunk_rows, weight_grad, teacher_outside=False):
        super().__init__(auto_prefix=False)
        self.student = student
        self.teacher = None if teacher_outside else teacher
        self.t_w = head_weight(teacher)
        self.loss = ChunkedGKDLoss(jsd_beta, temperature, chunk_rows, weight_grad)

    def construct(self, input_ids, labels, loss_mask, scale, teacher_h=None):
        h = final_hidden(self.student, input_ids)
        if teacher_h is None:
            teacher_h = ops.stop_gradient(final_hidden(self.teacher, input_ids))
        n = h.shape[0] * h.shape[1]
        return self.loss(h.reshape(n, -1), weight_input(head_weight(self.student)), teacher_h.reshape(n, -1),
                         weight_input(self.t_w), loss_mask.reshape(n), scale)


class TeacherHidden(nn.Cell):
    """The teacher's final hidden states [B, T, D] in a graph of its own (no gradient, nothing kept for a backward)."""

    def __init__(self, teacher):
        super().__init__(auto_prefix=False)
        self.teacher = teacher

    def construct(self, input_ids):
        return final_hidden(self.teacher, input_ids)


class TopKGKDNet(nn.Cell):
    """The trainer's distill loss against a stored teacher (`teacher_topk.TopKStore`): no teacher model in memory.
    Inputs: the usual four, then ids [B, T, k] int32, lq_top [B, T, k], lq_tail [B, T]."""

    def __init__(self, student, jsd_beta, temperature, chunk_rows, weight_grad):
        super().__init__(auto_prefix=False)
        self.student = student
        self.loss = TopKGKDLoss(jsd_beta, temperature, chunk_rows, weight_grad)

    def construct(self, input_ids, labels, loss_mask, scale, ids, lq_top, lq_tail):
        h = final_hidden(self.student, input_ids)
        n = h.shape[0] * h.shape[1]
        k = ids.shape[-1]
        return self.loss(h.reshape(n, -1), weight_input(head_weight(self.student)), ids.reshape(n, k),
                         lq_top.reshape(n, k), lq_tail.reshape(n), loss_mask.reshape(n), scale)
