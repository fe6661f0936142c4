"""Training losses: generalized JSD for GKD recovery, and masked next-token cross entropy for SFT.

Both losses take logits of shape [B, T, V] and a per-token mask of shape [B, T] (1 = scored, 0 = ignored: prompt
or padding). They compute in float32 whatever the input dtype, and they work in PyNative and in graph mode (call them
from a `construct` or an `@ms.jit` function; `jsd_beta`, `temperature` and `reduction` must be Python constants there).

Generalized JSD (GKD, Agarwal et al. 2024; endpoint conventions as in TRL's `GKDTrainer`)
-----------------------------------------------------------------------------------------
With P_T = softmax(teacher_logits / τ) and P_S = softmax(student_logits / τ) per token,

    JSD_β(P_T ‖ P_S) = β · KL(P_T ‖ M) + (1 − β) · KL(P_S ‖ M),    M = β · P_T + (1 − β) · P_S.

β is `jsd_beta` in code (the conversion's `beta` is another thing, the key/value balance); the run yaml keeps TRL's
key `distill.beta`, which the trainer passes here.

log M is formed in log space as logsumexp(log β + log P_T, log(1 − β) + log P_S), with the running maximum held out of
the gradient so ties between the two terms give the exact gradient. The formula is 0 at β = 0 and β = 1 (M collapses to
one of the two distributions), so those two values are explicit special cases, not limits of the formula:

    β = 0  →  forward KL(P_T ‖ P_S)   (mass-covering, the usual distillation loss)
    β = 1  →  reverse KL(P_S ‖ P_T)   (mode-seeking)

Properties that hold (and are tested): JSD ≥ 0, and swapping the two distributions together with β ↔ 1 − β gives the
same value: `generalized_jsd(s, t, jsd_beta=b) == generalized_jsd(t, s, jsd_beta=1 - b)` (this also maps the β = 0
endpoint onto the β = 1 endpoint). No τ² factor is applied (as in TRL). Gradients flow into the student only: the
teacher logits go through `ops.stop_gradient`. Logits must be finite at scored positions (a −inf logit gives
0·(−inf) = NaN in the KL sums); ignored positions may hold anything.

Precision on CPU: MindSpore's CPU `exp` kernel is accurate to ~5e-6 relative (not to the float32 ulp), so results agree
with a float64 reference to ~3e-6 relative after "mean" reduction and ~2e-5 per token. Irrelevant for training.

SFT cross entropy
-----------------
Convention: **the caller has already shifted**. `logits[:, t]` is the prediction made after reading `input_ids[:, :t+1]`
and it is scored against `labels[:, t]`, which is `input_ids[:, t+1]` of the unshifted sequence. `build_sft_labels`
produces (input_ids, labels, loss_mask) in exactly this layout.
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from youzhi_ms.errors import YouzhiError

__all__ = ["generalized_jsd", "jsd_from_logprobs", "jsd_upper_bound", "GKDLoss", "sft_cross_entropy", "SFTLoss", "build_sft_labels",
           "GKDNet", "SFTNet"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction, error=ValueError):
    if reduction not in _REDUCTIONS:
        raise error(f"loss reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_gkd_args(jsd_beta, temperature, reduction, error=ValueError):
    """Validate the constant GKD arguments. Graph mode can only compile `raise` of builtin exception types, so the
    traced functions raise ValueError; the Cell constructors (run eagerly, with values from configs) raise YouzhiError.
    """
    if not 0.0 <= jsd_beta <= 1.0:
        raise error(f"GKD jsd_beta must be in [0, 1], got {jsd_beta}; use 0 for forward KL, 1 for reverse KL")
    if not temperature > 0.0:
        raise error(f"GKD temperature must be > 0, got {temperature}")
    _check_reduction(reduction, error)


def _reduce(per_token, mask, reduction):
    """per_token: float32 [B, T]. mask: None or [B, T] (any dtype, nonzero = scored).

    Ignored positions are selected away with `where` (not multiplied by 0), so NaN/inf at a masked position cannot leak
    into the loss. "mean" divides by max(number of scored tokens, 1): an all-masked batch gives 0, not NaN.
    """
    if mask is None:
        if reduction == "none":
            return per_token
        if reduction == "sum":
            return ops.sum(per_token)
        return ops.mean(per_token)
    keep = ops.cast(mask, ms.float32) > 0.0
    per_token = ops.where(keep, per_token, ops.zeros_like(per_token))
    if reduction == "none":
        return per_token
    total = ops.sum(per_token)
    if reduction == "sum":
        return total
    count = ops.sum(ops.cast(keep, ms.float32))
    return total / ops.maximum(count, ops.ones_like(count))


def _kl_rows(logp, logq):
    """KL(P ‖ Q) summed over the last axis, from log-probabilities: Σ_v p (log p − log q)."""
    return ops.sum(ops.exp(logp) * (logp - logq), -1)


def jsd_from_logprobs(logp_s, logp_t, jsd_beta):
    """Per-row JSD_β(P_T ‖ P_S) over the last axis from log-probabilities (float32), β a Python float: the body of
    `generalized_jsd`, shared with the chunked and top-k losses of `chunked_loss.py`."""
    if jsd_beta == 0.0:
        return _kl_rows(logp_t, logp_s)
    if jsd_beta == 1.0:
        return _kl_rows(logp_s, logp_t)
    a = logp_t + math.log(jsd_beta)
    b = logp_s + math.log(1.0 - jsd_beta)
    # log M = logsumexp(a, b). The shift is a constant for the gradient (its contribution cancels exactly), so at
    # a == b the gradient splits β : (1 − β) as it should instead of following one branch of `maximum`.
    shift = ops.stop_gradient(ops.maximum(a, b))
    log_m = shift + ops.log(ops.exp(a - shift) + ops.exp(b - shift))
    return jsd_beta * _kl_rows(logp_t, log_m) + (1.0 - jsd_beta) * _kl_rows(logp_s, log_m)


def generalized_jsd(student_logits, teacher_logits, mask=None, jsd_beta=0.5, temperature=1.0, reduction="mean"):
    """Token-level generalized Jensen–Shannon divergence JSD_β(P_T ‖ P_S) between teacher and student.

    Args:
        student_logits: [B, T, V] Tensor (any float dtype; computed in float32). Gradients flow into it.
        teacher_logits: [B, T, V] Tensor, same shape. Treated as a constant (stop_gradient).
        mask: optional [B, T] Tensor, 1 = scored token, 0 = ignored (prompt, padding). None = all scored.
        jsd_beta: Python float in [0, 1]. 0 → forward KL(P_T‖P_S), 1 → reverse KL(P_S‖P_T), else the JSD above.
        temperature: Python float > 0; both logit sets are divided by it before the softmax.
        reduction: "mean" (sum over scored tokens / number of scored tokens, 0 if none), "sum", or
            "none" (per-token [B, T] float32, 0 at ignored positions).

    Returns:
        float32 scalar Tensor ("mean", "sum") or [B, T] Tensor ("none").
    """
    jsd_beta = float(jsd_beta)
    temperature = float(temperature)
    _check_gkd_args(jsd_beta, temperature, reduction)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {student_logits.shape} and teacher logits {teacher_logits.shape} differ in shape; "
            "teacher and student must share the tokenizer and the vocabulary size"
        )
    student = ops.cast(student_logits, ms.float32)
    teacher = ops.stop_gradient(ops.cast(teacher_logits, ms.float32))
    if temperature != 1.0:
        student = student / temperature
        teacher = teacher / temperature
    per_token = jsd_from_logprobs(ops.log_softmax(student, -1), ops.log_softmax(teacher, -1), jsd_beta)
    return _reduce(per_token, mask, reduction)


def jsd_upper_bound(jsd_beta):
    """The largest value JSD_β can take (teacher and student with disjoint supports): −β ln β − (1 − β) ln(1 − β),
    ln 2 at β = 0.5. None at β = 0 or 1 (the KL endpoints are unbounded). A token-mean loss above it is not a number
    the formula can produce: the trainer treats it as a corrupted computation."""
    jsd_beta = float(jsd_beta)
    if jsd_beta <= 0.0 or jsd_beta >= 1.0:
        return None
    return -jsd_beta * math.log(jsd_beta) - (1.0 - jsd_beta) * math.log(1.0 - jsd_beta)


class GKDLoss(nn.Cell):
    """`generalized_jsd` as a Cell with jsd_beta / temperature / reduction fixed at construction (graph-mode constants).

    Call as `loss_fn(student_logits, teacher_logits, mask)`; `mask` may be omitted (all tokens scored).
    """

    def __init__(self, jsd_beta=0.5, temperature=1.0, reduction="mean"):
        super().__init__()
        jsd_beta = float(jsd_beta)
        temperature = float(temperature)
        _check_gkd_args(jsd_beta, temperature, reduction, YouzhiError)
        self.jsd_beta = jsd_beta
        self.temperature = temperature
        self.reduction = reduction

    def construct(self, student_logits, teacher_logits, mask=None):
        return generalized_jsd(student_logits, teacher_logits, mask, self.jsd_beta, self.temperature, self.reduction)


def sft_cross_entropy(logits, labels, loss_mask, reduction="mean"):
    """Masked next-token cross entropy; `logits[:, t]` is scored against `labels[:, t]` (labels already shifted).

    Args:
        logits: [B, T, V] Tensor (computed in float32).
        labels: [B, T] integer Tensor, the token each position must predict. Values at ignored positions may be
            anything (pad id, -100, ...): they are replaced by 0 before the lookup and their loss is dropped.
        loss_mask: [B, T] Tensor, 1 = scored (response token), 0 = ignored (prompt, padding).
        reduction: "mean" (over scored tokens, 0 if none), "sum", or "none" ([B, T], 0 at ignored positions).

    Returns:
        float32 scalar Tensor ("mean", "sum") or [B, T] Tensor ("none").
    """
    _check_reduction(reduction)
    logp = ops.log_softmax(ops.cast(logits, ms.float32), -1)
    keep = ops.cast(loss_mask, ms.float32) > 0.0
    labels = ops.cast(labels, ms.int32)
    safe_labels = ops.where(keep, labels, ops.zeros_like(labels))
    picked = ops.gather_elements(logp, 2, ops.expand_dims(safe_labels, -1))
    nll = -ops.squeeze(picked, -1)
    return _reduce(nll, keep, reduction)


class SFTLoss(nn.Cell):
    """`sft_cross_entropy` as a Cell: `loss_fn(logits, labels, loss_mask)`."""

    def __init__(self, reduction="mean"):
        super().__init__()
        _check_reduction(reduction, YouzhiError)
        self.reduction = reduction

    def construct(self, logits, labels, loss_mask):
        return sft_cross_entropy(logits, labels, loss_mask, self.reduction)


class GKDNet(nn.Cell):
    """The trainer's distill loss: student and teacher logits of the same ids -> sum of per-token generalized JSD over
    scored tokens * scale (scale = 1 / scored tokens of the global batch)."""

    def __init__(self, student, teacher, jsd_beta, temperature):
        super().__init__(auto_prefix=False)
        self.student = student
        self.teacher = teacher
        self.loss = GKDLoss(jsd_beta, temperature, "sum")

    def construct(self, input_ids, labels, loss_mask, scale):
        return self.loss(self.student(input_ids), self.teacher(input_ids), loss_mask) * scale


class SFTNet(nn.Cell):
    """The trainer's SFT loss: student logits -> sum of masked next-token cross entropy * scale."""

    def __init__(self, student):
        super().__init__(auto_prefix=False)
        self.student = student
        self.loss = SFTLoss("sum")

    def construct(self, input_ids, labels, loss_mask, scale):
        return self.loss(self.student(input_ids), labels, loss_mask) * scale


def build_sft_labels(prompt_ids, response_ids, max_len, pad_id):
    """Lay out one SFT example as (input_ids, labels, loss_mask), each a length-`max_len` numpy vector.

    The full sequence is `seq = prompt_ids + response_ids` (append EOS to `response_ids` yourself if the model should
    learn to stop). The shift is applied here:

        input_ids[t] = seq[t]        labels[t] = seq[t + 1]        loss_mask[t] = 1 iff seq[t + 1] is a response token

    for t < len(seq) − 1, so position t's logits predict labels[t] and only response tokens are scored. The remaining
    positions are padding: input_ids = labels = pad_id, loss_mask = 0. If `len(seq) − 1 > max_len` the sequence is cut
    on the right (the end of the response is lost; if the prompt alone fills `max_len`, nothing is scored). With an
    empty prompt the first response token is context only (nothing precedes it to predict it from).

    Example: prompt [5, 6, 7], response [8, 9], max_len 6, pad_id 0 →
        input_ids [5, 6, 7, 8, 0, 0], labels [6, 7, 8, 9, 0, 0], loss_mask [0, 0, 1, 1, 0, 0].

    Returns:
        input_ids int32 [max_len], labels int32 [max_len], loss_mask float32 [max_len].
    """
    prompt = [int(x) for x in np.asarray(prompt_ids).reshape(-1)]
    response = [int(x) for x in np.asarray(response_ids).reshape(-1)]
    max_len = int(max_len)
    if max_len < 1:
        raise YouzhiError(f"max_len must be >= 1, got {max_len}")
    if not response:
        raise YouzhiError("SFT example has an empty response; there is nothing to train on")
    seq = prompt + response
    n = min(len(seq) - 1, max_len)
    input_ids = np.full(max_len, pad_id, dtype=np.int32)
    labels = np.full(max_len, pad_id, dtype=np.int32)
    loss_mask = np.zeros(max_len, dtype=np.float32)
    if n > 0:
        input_ids[:n] = seq[:n]
        labels[:n] = seq[1 : n + 1]
        # labels[t] = seq[t + 1] is a response token when t + 1 >= len(prompt).
        loss_mask[max(len(prompt) - 1, 0) : n] = 1.0
    return input_ids, labels, loss_mask
