"""Graph-mode update machinery for the trainer: AdamW with per-group learning rates, global-norm gradient clipping,
gradient accumulation and the data-parallel gradient all-reduce, plus the host-side cosine schedule.

Everything that MindSpore compiles lives in this file as Cell methods / registered functions (no lambdas on Cells).

Conventions
-----------
- The loss a step differentiates is already normalised by the number of scored tokens of the whole *global* batch
  (all ranks, all accumulation micro-batches): `loss = sum_over_local_tokens / n_global`. Gradients are therefore
  **summed** over micro-batches and ranks (all-reduce SUM, no division), which gives exactly the gradient of the global
  token-mean, however the batch is split. This is what makes a 2-worker run equal a 1-process run with the same batch.
- AdamW is the decoupled-weight-decay Adam of Loshchilov & Hutter with bias correction (as in torch.optim.AdamW):
      m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
      p = p - lr * ( (m / bc1) / (sqrt(v / bc2) + eps) + wd * p ),   bc_i = 1 - b_i^t
  Learning rates arrive each step as a tensor `lrs[G]` (one per parameter group, schedule already applied) and the
  bias corrections as scalars, so nothing in the graph depends on the step count and one compiled graph serves the run.
- Optimizer state is two Parameter tuples, `adam_m.<param name>` and `adam_v.<param name>`, saved with the checkpoint.
"""
from __future__ import annotations

import math
from typing import Sequence

import mindspore as ms
from mindspore import nn, ops, ParameterTuple

__all__ = ["UpdateCore", "FusedStep", "MicroStep", "ApplyStep", "ResetAccumulators", "AllReduceSum", "lr_factor"]

_adamw = ops.MultitypeFuncGraph("youzhi_adamw")
_accumulate = ops.MultitypeFuncGraph("youzhi_accumulate")
_zero = ops.MultitypeFuncGraph("youzhi_zero")
_square_sum = ops.MultitypeFuncGraph("youzhi_square_sum")


@_adamw.register("Number", "Number", "Number", "Tensor", "Tensor", "Tensor", "Tensor", "Number", "Number", "Tensor",
                 "Tensor", "Tensor", "Tensor")
def _adamw_update(beta1, beta2, eps, lrs, bc1, bc2, coef, group, weight_decay, param, m, v, grad):
    """The AdamW step of the module docstring, written in place by MindSpore's fused AdamWeightDecay kernel.

    Why fused: a graph of element-wise ops keeps every intermediate of every parameter allocated on CPU (measured:
    1.65 GB for SmolLM2's 31M attention parameters, 0.26 GB fused). The kernel has no bias correction, so it gets
    rescaled scalars that make its step torch's exactly: (m/bc1) / (sqrt(v/bc2) + eps) equals
    (sqrt(bc2)/bc1) * m / (sqrt(v) + eps sqrt(bc2)), hence lr' = lr sqrt(bc2)/bc1, eps' = eps sqrt(bc2) and
    weight decay wd' = wd bc1/sqrt(bc2) (so that lr' wd' = lr wd). tests/test_optim.py checks it against torch."""
    root_bc2 = ops.sqrt(bc2)
    g = ops.cast(grad, param.dtype) * ops.cast(coef, param.dtype)
    lr = lrs[group] * root_bc2 / bc1
    return _fused_adamw(param, m, v, lr, beta1, beta2, eps * root_bc2, weight_decay * bc1 / root_bc2, g)


_fused_adamw = ops.AdamWeightDecay()


def adamw_values(beta1, beta2, eps, lr, bc1, bc2, coef, weight_decay, param, m, v, grad):
    """One AdamW step's new (m, v, param) in float32 moments (param back in its own dtype), without writing them, for
    the guarded sharded update (parallel_step.py), which selects them first. The plain update is the fused kernel
    above; tests/test_optim.py and tests/test_sharded_model.py hold both to torch.optim.AdamW."""
    g = ops.cast(grad, ms.float32) * coef
    m_new = beta1 * m + (1.0 - beta1) * g
    v_new = beta2 * v + (1.0 - beta2) * g * g
    update = (m_new / bc1) / (ops.sqrt(v_new / bc2) + eps)
    p32 = ops.cast(param, ms.float32)
    p_new = p32 - lr * (update + weight_decay * p32)
    return m_new, v_new, ops.cast(p_new, param.dtype)


@_accumulate.register("Tensor", "Tensor")
def _accumulate_grad(acc, grad):
    ops.assign_add(acc, ops.cast(grad, acc.dtype))
    return True


@_zero.register("Tensor")
def _zero_param(p):
    ops.assign(p, ops.zeros_like(p))
    return True


@_square_sum.register("Tensor")
def _square_sum_of(g):
    g = ops.cast(g, ms.float32)
    return ops.sum(g * g)


class UpdateCore(nn.Cell):
    """All-reduce (data parallel) -> global norm -> clip -> AdamW over `params` (the trainable parameters).

    group_ids[i] picks params[i]'s learning rate from `lrs`; weight_decays[i] is its decoupled decay (0 for norms and
    biases). world > 1 adds `nn.DistributedGradReducer` (SUM, see the module docstring).
    """

    def __init__(self, params: Sequence, group_ids: Sequence[int], weight_decays: Sequence[float], betas=(0.9, 0.95),
                 eps: float = 1e-8, max_grad_norm: float = 1.0, world: int = 1):
        super().__init__(auto_prefix=False)
        self.params = ParameterTuple(params)
        self.m = self.params.clone(prefix="adam_m", init="zeros")
        self.v = self.params.clone(prefix="adam_v", init="zeros")
        self.group_ids = tuple(int(g) for g in group_ids)
        self.weight_decays = tuple(float(w) for w in weight_decays)
        self.beta1, self.beta2, self.eps = float(betas[0]), float(betas[1]), float(eps)
        self.max_grad_norm = float(max_grad_norm)
        self.clip = self.max_grad_norm > 0
        self.hyper_map = ops.HyperMap()
        self.distributed = world > 1
        if self.distributed:
            self.reducer = nn.DistributedGradReducer(self.params, mean=False, degree=world)

    def global_norm(self, grads):
        return ops.sqrt(ops.addn(self.hyper_map(_square_sum, grads)))

    def update(self, grads, lrs, bc1, bc2):
        """Returns the global gradient norm before clipping."""
        if self.distributed:
            grads = self.reducer(grads)
        norm = self.global_norm(grads)
        if self.clip:
            coef = ops.minimum(ops.ones_like(norm), self.max_grad_norm / (norm + 1e-6))
        else:
            coef = ops.ones_like(norm)
        done = self.hyper_map(ops.partial(_adamw, self.beta1, self.beta2, self.eps, lrs, bc1, bc2, coef),
                              self.group_ids, self.weight_decays, self.params, self.m, self.v, grads)
        return ops.depend(norm, done)


class FusedStep(nn.Cell):
    """One optimizer step on one micro-batch (no accumulation): forward, backward, update. -> (loss, grad_norm).
    Called as (lrs, bc1, bc2, tuple of the loss_net's inputs).

    The loss comes out of the same forward pass the gradients are taken through (value_and_grad), and is returned
    only after the update, so no separate forward can be scheduled next to the parameter writes."""

    def __init__(self, loss_net, core: UpdateCore):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net
        self.core = core
        self.value_and_grad = ms.value_and_grad(self.loss_net, None, self.core.params)

    def construct(self, lrs, bc1, bc2, batch):
        loss, grads = self.value_and_grad(*batch)
        norm = self.core.update(grads, lrs, bc1, bc2)
        return ops.depend(loss, norm), norm


class MicroStep(nn.Cell):
    """Forward + backward of one micro-batch (a tuple of the loss_net's inputs), gradients added into the
    accumulators. -> loss."""

    def __init__(self, loss_net, core: UpdateCore, accumulators: ParameterTuple):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net
        self.params = core.params
        self.accumulators = accumulators
        self.value_and_grad = ms.value_and_grad(self.loss_net, None, self.params)
        self.hyper_map = ops.HyperMap()

    def construct(self, batch):
        loss, grads = self.value_and_grad(*batch)
        done = self.hyper_map(_accumulate, self.accumulators, grads)
        return ops.depend(loss, done)


class ApplyStep(nn.Cell):
    """The update from the accumulated gradients, then the accumulators are zeroed. -> grad_norm."""

    def __init__(self, core: UpdateCore, accumulators: ParameterTuple):
        super().__init__(auto_prefix=False)
        self.core = core
        self.accumulators = accumulators
        self.hyper_map = ops.HyperMap()

    def construct(self, lrs, bc1, bc2):
        grads = self.hyper_map(ops.identity, self.accumulators)
        norm = self.core.update(grads, lrs, bc1, bc2)
        done = self.hyper_map(_zero, ops.depend(self.accumulators, norm))
        return ops.depend(norm, done)


class ResetAccumulators(nn.Cell):
    """Zero the accumulators without an update (drops the gradients of a micro-batch that is computed again)."""

    def __init__(self, accumulators: ParameterTuple):
        super().__init__(auto_prefix=False)
        self.accumulators = accumulators
        self.hyper_map = ops.HyperMap()

    def construct(self):
        return self.hyper_map(_zero, self.accumulators)


class AllReduceSum(nn.Cell):
    """Host helper under msrun: element-wise SUM of a small float32 vector over all ranks."""

    def __init__(self):
        super().__init__()
        self.op = ops.AllReduce()

    def construct(self, x):
        return self.op(x)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based): linear warm-up over `warmup_steps`
    steps ((step+1)/warmup, so the first step is not wasted at lr 0), then cosine decay to `min_lr_ratio` at the
    last step (`total_steps - 1`)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay = max(total_steps - 1 - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
