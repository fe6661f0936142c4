"""One optimizer step of a model / pipeline parallel run (MindSpore semi-auto parallel, Ascend) as one compiled graph:
forward and backward of the sharded loss (sharded_model.py) over `micro_batch_num` pipeline micro-batches, global-norm
clipping across all slices and stages, and AdamW (optim.py's update rule), guarded like the CPU trainer's GKD steps.

Differences from the data-parallel step of optim.py, and why:
- The loss net returns the unscaled sum over the global batch's scored tokens; the 1 / (scored tokens) factor enters
  as the backward's sensitivity (sens), which is the same gradient as scaling the loss, because pipeline parallel
  slices every network input along the batch axis and a scalar input cannot be sliced.
- Gradient accumulation is the pipeline's micro-batches (MindFormers' rule: with pipeline stages the micro-batches are
  the accumulation); `nn.PipelineGradReducer` collects them. Without pipeline stages a step is one batch.
- The global norm is built from per-tensor square sums tagged `grad_scale`, which MindSpore's parallel pass recognises
  and all-reduces over the model-parallel slices and between pipeline stages (each stage holds different layers), so
  every rank clips with the same coefficient (a local norm would let replicated weights drift apart).
- The corrupted-step guard (loss above the generalized JSD's maximum, trainer.py) cannot drop accumulated gradients
  between graphs here; the update is computed and then selected away (`applied` = False) for parameters and moments
  alike, so a rejected step changes nothing. Under pipeline parallel only the last stage sees the loss: its verdict
  reaches the other stages through an all-reduce (min) over the ranks that hold the same slice in every stage.
- `enable_parallel_optimizer` (optional, data parallel > 1): MindSpore shards the AdamW moments (and the update) of
  every parameter over the data-parallel ranks; the parameters are all-gathered for the forward.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.communication import create_group

from youzhi_ms.train.optim import UpdateCore, adamw_values

__all__ = ["ShardedUpdateCore", "ShardedStep", "pp_stage_peers"]

_square_sum = ops.MultitypeFuncGraph("youzhi_sharded_square_sum")
_adamw_guarded = ops.MultitypeFuncGraph("youzhi_adamw_guarded")
# MindSpore's parallel pass inserts the all-reduces of a global norm after square sums expanded by an op carrying
# this attribute (the same mechanism as mindspore.ops.clip_by_global_norm in semi-auto parallel).
_norm_expand = ops.ExpandDims().add_prim_attr("grad_scale", True)


@_square_sum.register("Tensor")
def _sharded_square_sum(g):
    g = ops.cast(g, ms.float32)
    return _norm_expand(ops.sum(g * g), 0)


@_adamw_guarded.register("Number", "Number", "Number", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Number",
                         "Number", "Tensor", "Tensor", "Tensor", "Tensor")
def _adamw_guarded_update(beta1, beta2, eps, lrs, bc1, bc2, coef, ok, group, weight_decay, param, m, v, grad):
    """optim._adamw_update, with every write selected by `ok` (False: parameter and moments keep their values)."""
    m_new, v_new, p_new = adamw_values(beta1, beta2, eps, lrs[group], bc1, bc2, coef, weight_decay, param, m, v, grad)
    ops.assign(m, ops.select(ok, m_new, m))
    ops.assign(v, ops.select(ok, v_new, v))
    ops.assign(param, ops.select(ok, p_new, param))
    return True


class ShardedUpdateCore(UpdateCore):
    """UpdateCore (AdamW, per-group learning rates, per-parameter decay, clipping) for sliced parameters."""

    def __init__(self, params: Sequence, group_ids: Sequence[int], weight_decays: Sequence[float], betas=(0.9, 0.95),
                 eps: float = 1e-8, max_grad_norm: float = 1.0):
        super().__init__(params, group_ids, weight_decays, betas, eps, max_grad_norm, world=1)

    def global_norm(self, grads):
        return ops.sqrt(ops.addn(self.hyper_map(_square_sum, grads)))[0]

    def guarded_update(self, grads, lrs, bc1, bc2, ok):
        norm = self.global_norm(grads)
        if self.clip:
            coef = ops.minimum(ops.ones_like(norm), self.max_grad_norm / (norm + 1e-6))
        else:
            coef = ops.ones_like(norm)
        done = self.hyper_map(ops.partial(_adamw_guarded, self.beta1, self.beta2, self.eps, lrs, bc1, bc2, coef, ok),
                              self.group_ids, self.weight_decays, self.params, self.m, self.v, grads)
        return ops.depend(norm, done)


def pp_stage_peers(rank: int, world: int, pipeline_stage: int):
    """The ranks holding the same slice as `rank` in every pipeline stage (MindSpore numbers stage s's devices
    s * world / pp ... (s + 1) * world / pp - 1)."""
    ranks_per_pp_stage = world // pipeline_stage
    return [rank % ranks_per_pp_stage + s * ranks_per_pp_stage for s in range(pipeline_stage)]


class ShardedStep(nn.Cell):
    """(input_ids, labels, loss_mask) -> (loss = scale * sum of token losses, grad norm, applied).

    The step's scalars live in `self.hyper` = [scale, bc1, bc2, lr_0 .. lr_G-1] (set with `set_hyper` before each
    call): MindSpore's parallel compiler accepts a dataset strategy only for the inputs the network consumes, so the
    graph inputs are the three batch tensors alone.
    `loss_bound` (GKD with 0 < jsd_beta < 1): a loss above it is a corrupted computation and nothing is applied.
    `pipeline_stage` > 1 wraps the loss net in nn.PipelineCell with `micro_batch_num` micro-batches; `rank` / `world`
    then locate this rank's stage (only the last one computes the loss) and its peers in the other stages."""

    def __init__(self, loss_net, core: ShardedUpdateCore, num_groups: int = 1, pipeline_stage: int = 1,
                 micro_batch_num: int = 1, loss_bound: Optional[float] = None, rank: int = 0, world: int = 1,
                 optimizer_shard: bool = False):
        super().__init__(auto_prefix=False)
        self.pipeline = pipeline_stage > 1
        self.net = nn.PipelineCell(loss_net, micro_batch_num) if self.pipeline else loss_net
        self.core = core
        self.params = core.params
        self.num_groups = int(num_groups)
        self.hyper = Parameter(Tensor(np.zeros(3 + self.num_groups, np.float32)), name="step_hyper",
                               requires_grad=False)
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        if self.pipeline:
            self.pp_reducer = nn.PipelineGradReducer(self.params, opt_shard=optimizer_shard)
        self.bounded = loss_bound is not None
        self.limit = float(loss_bound) * (1.0 + 1e-4) + 1e-6 if self.bounded else 0.0
        self.in_last_pp_stage = (not self.pipeline) or rank // (world // pipeline_stage) == pipeline_stage - 1
        if self.bounded and self.pipeline:
            peers = pp_stage_peers(rank, world, pipeline_stage)
            group = "youzhi_stage_peers_" + "_".join(str(r) for r in peers)
            create_group(group, peers)
            self.verdict = ops.AllReduce(ops.ReduceOp.MIN, group)

    def set_hyper(self, scale: float, bc1: float, bc2: float, lrs: Sequence[float]) -> None:
        values = [scale, bc1, bc2] + [float(x) for x in lrs]
        if len(values) != 3 + self.num_groups:
            raise ValueError(f"expected {self.num_groups} learning rates, got {len(lrs)}")
        self.hyper.set_data(Tensor(np.asarray(values, np.float32)))

    def construct(self, input_ids, labels, loss_mask):
        scale, bc1, bc2 = self.hyper[0], self.hyper[1], self.hyper[2]
        lrs = self.hyper[3:]
        total = self.net(input_ids, labels, loss_mask)
        grads = self.grad(self.net, self.params)(input_ids, labels, loss_mask, ops.cast(scale, total.dtype))
        if self.pipeline:
            grads = self.pp_reducer(grads)
        loss = total * scale
        ok = ops.ones((), ms.bool_)
        if self.bounded:
            if self.in_last_pp_stage:
                good = ops.cast(loss <= self.limit, ms.float32)
            else:
                good = ops.ones((), ms.float32)
            if self.pipeline:
                good = self.verdict(good.reshape(1))[0]
            ok = good > 0.5
        norm = self.core.guarded_update(grads, lrs, bc1, bc2, ok)
        return ops.depend(loss, norm), norm, ok
