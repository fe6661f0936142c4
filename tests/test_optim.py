"""The trainer's graph-mode AdamW + global-norm clipping against torch.optim.AdamW + clip_grad_norm_ (the reference)."""
import numpy as np
import pytest
import torch

import mindspore as ms
from mindspore import Parameter, Tensor, nn

from youzhi_ms.runtime import init_context

init_context("graph")

from youzhi_ms.train.optim import UpdateCore  # noqa: E402


class _Apply(nn.Cell):
    def __init__(self, core):
        super().__init__(auto_prefix=False)
        self.core = core

    def construct(self, g0, g1, g2, lrs, bc1, bc2):
        return self.core.update((g0, g1, g2), lrs, bc1, bc2)


@pytest.mark.parametrize("max_norm", [1.0, 0.0])
def test_adamw_and_clipping_match_torch(max_norm):
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s).astype(np.float32) * 0.1 for s in ((6, 5), (5,), (4, 3))]
    groups, decays, lrs = (0, 0, 1), (0.01, 0.0, 0.01), (3e-4, 1e-3)
    betas, eps = (0.9, 0.95), 1e-8
    params = [Parameter(Tensor(a.copy()), name=f"p{i}") for i, a in enumerate(init)]
    step = _Apply(UpdateCore(params, groups, decays, betas, eps, max_norm))

    tp = [torch.nn.Parameter(torch.tensor(a.copy())) for a in init]
    topt = torch.optim.AdamW([{"params": [tp[0]], "lr": lrs[0], "weight_decay": decays[0]},
                              {"params": [tp[1]], "lr": lrs[0], "weight_decay": decays[1]},
                              {"params": [tp[2]], "lr": lrs[1], "weight_decay": decays[2]}], betas=betas, eps=eps)
    for t in range(1, 7):
        grads = [rng.standard_normal(a.shape).astype(np.float32) * (3.0 if t % 2 else 0.05) for a in init]
        norm = step(*[Tensor(g) for g in grads], Tensor(np.asarray(lrs, np.float32)),
                    Tensor(1 - betas[0] ** t, ms.float32), Tensor(1 - betas[1] ** t, ms.float32))
        for p, g in zip(tp, grads):
            p.grad = torch.tensor(g)
        if max_norm > 0:
            tnorm = torch.nn.utils.clip_grad_norm_(tp, max_norm)
        else:
            tnorm = torch.sqrt(sum((p.grad ** 2).sum() for p in tp))
        topt.step()
        assert abs(float(norm.asnumpy()) - float(tnorm)) <= 1e-5 * float(tnorm)
        for p, q in zip(params, tp):
            np.testing.assert_allclose(p.asnumpy(), q.detach().numpy(), rtol=1e-5, atol=1e-7)
    # the steps moved the weights (a no-op optimizer would also "match" an untouched reference otherwise)
    assert max(np.abs(p.asnumpy() - a).max() for p, a in zip(params, init)) > 1e-3
