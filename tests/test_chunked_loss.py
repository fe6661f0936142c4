"""The chunked GKD loss (hand-written backward) and the top-k (offline teacher) loss against float64 torch autograd of
the plain formulas; with k = V the top-k loss equals the live one."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import nn

from youzhi_ms.runtime import init_context

init_context("graph")

from youzhi_ms.train.chunked_loss import ChunkedGKDLoss, TopKGKDLoss  # noqa: E402
from youzhi_ms.train.losses import generalized_jsd  # noqa: E402

N, D, V, K = 10, 6, 13, 4
TAU = 0.8
BETAS = [0.0, 0.3, 0.5, 1.0]
BRANCHES = [0.0, 0.5, 1.0]  # the three code paths (forward KL, JSD, reverse KL)
MASK = np.array([1, 1, 0, 1, 1, 1, 0, 0, 1, 1], np.float32)
SCALE = 1.0 / MASK.sum()


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return [(s * rng.standard_normal(shape)).astype(np.float32)
            for s, shape in ((1.0, (N, D)), (0.8, (V, D)), (1.0, (N, D)), (0.8, (V, D)))]


def _jsd64(lp, lq, beta):
    """Per-row JSD_beta(Q || P) in probability space, float64 torch."""
    p, q = lp.exp(), lq.exp()

    def kl(a, la, lb):
        return torch.sum(torch.where(a > 0, a * (la - lb), torch.zeros_like(a)), -1)
    if beta == 0.0:
        return kl(q, lq, lp)
    if beta == 1.0:
        return kl(p, lp, lq)
    m = beta * q + (1 - beta) * p
    return beta * kl(q, lq, m.log()) + (1 - beta) * kl(p, lp, m.log())


def ref_live(h, w, th, tw, beta):
    """(loss, dL/dh, dL/dw) in float64."""
    h64, w64 = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (h, w))
    lp = torch.log_softmax(h64 @ w64.T / TAU, -1)
    lq = torch.log_softmax(torch.tensor(th, dtype=torch.float64) @ torch.tensor(tw, dtype=torch.float64).T / TAU, -1)
    loss = torch.sum(_jsd64(lp, lq, beta) * torch.tensor(MASK, dtype=torch.float64)) * SCALE
    loss.backward()
    return loss.item(), h64.grad.numpy(), w64.grad.numpy()


def teacher_topk(th, tw, k):
    """Top-k word ids of the teacher per row, their log-probabilities and the tail log-mass (float64 -> float32)."""
    lq = torch.log_softmax(torch.tensor(th, dtype=torch.float64) @ torch.tensor(tw, dtype=torch.float64).T / TAU, -1)
    top = torch.topk(lq, k, -1)
    rest = lq.clone()
    rest.scatter_(1, top.indices, float("-inf"))
    tail = torch.logsumexp(rest, -1)
    return top.indices.numpy().astype(np.int32), top.values.numpy().astype(np.float32), tail.numpy().astype(np.float32)


def ref_topk(h, w, ids, lq_top, lq_tail, beta):
    h64, w64 = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (h, w))
    lp = torch.log_softmax(h64 @ w64.T / TAU, -1)
    idx = torch.tensor(ids, dtype=torch.int64)
    lp_top = torch.gather(lp, 1, idx)
    rest = lp.scatter(1, idx, float("-inf"))
    lp_b = torch.cat([lp_top, torch.logsumexp(rest, -1, keepdim=True)], -1)
    lq_b = torch.cat([torch.tensor(lq_top, dtype=torch.float64), torch.tensor(lq_tail, dtype=torch.float64)[:, None]],
                     -1)
    loss = torch.sum(_jsd64(lp_b, lq_b, beta) * torch.tensor(MASK, dtype=torch.float64)) * SCALE
    loss.backward()
    return loss.item(), h64.grad.numpy(), w64.grad.numpy()


class Grad(nn.Cell):
    def __init__(self, loss):
        super().__init__()
        self.grad = ms.value_and_grad(loss, grad_position=(0, 1))

    def construct(self, *args):
        return self.grad(*args)


def _ms(*arrays):
    return [ms.Tensor(a) for a in arrays]


def _check(got, want, rtol=2e-5, grad_tol=5e-5):
    """Gradients to `grad_tol` of their largest entry: MindSpore's CPU exp is accurate to ~5e-6 relative, and with
    beta = 1 the gradient carries log-probability differences of size ~5 (test_losses.py has the same allowance)."""
    (loss, (dh, dw)), (rloss, rdh, rdw) = got, want
    np.testing.assert_allclose(float(loss.asnumpy()), rloss, rtol=rtol)
    for a, b in ((dh, rdh), (dw, rdw)):
        np.testing.assert_allclose(a.asnumpy(), b, rtol=0, atol=grad_tol * np.abs(b).max())


@pytest.mark.parametrize("beta", BETAS)
def test_chunked_loss_equals_the_plain_one_values_and_gradients(beta):
    h, w, th, tw = _data(1)
    rows = 3  # 10 tokens: chunks of 3, 3, 3, 1
    got = Grad(ChunkedGKDLoss(beta, TAU, rows, weight_grad=True))(*_ms(h, w, th, tw, MASK, np.float32(SCALE)))
    _check(got, ref_live(h, w, th, tw, beta))
    # the plain loss on full logits gives the same value
    plain = generalized_jsd(ms.Tensor(h @ w.T), ms.Tensor(th @ tw.T), ms.Tensor(MASK), beta, TAU, "sum") * SCALE
    np.testing.assert_allclose(float(got[0].asnumpy()), float(plain.asnumpy()), rtol=1e-5)


@pytest.mark.parametrize("beta", BRANCHES)
def test_topk_loss_equals_the_bucketed_reference(beta):
    h, w, th, tw = _data(2)
    ids, lq_top, lq_tail = teacher_topk(th, tw, K)
    got = Grad(TopKGKDLoss(beta, TAU, 4, weight_grad=True))(*_ms(h, w, ids, lq_top, lq_tail, MASK,
                                                                 np.float32(SCALE)))
    _check(got, ref_topk(h, w, ids, lq_top, lq_tail, beta))


@pytest.mark.parametrize("beta", BRANCHES)
def test_topk_loss_with_k_equal_vocab_is_the_live_loss(beta):
    h, w, th, tw = _data(3)
    ids, lq_top, lq_tail = teacher_topk(th, tw, V)
    assert np.all(np.isneginf(lq_tail))  # no tail: an empty bucket
    got = Grad(TopKGKDLoss(beta, TAU, 5, weight_grad=True))(*_ms(h, w, ids, lq_top, lq_tail, MASK,
                                                                 np.float32(SCALE)))
    live = Grad(ChunkedGKDLoss(beta, TAU, 5, weight_grad=True))(*_ms(h, w, th, tw, MASK, np.float32(SCALE)))
    np.testing.assert_allclose(float(got[0].asnumpy()), float(live[0].asnumpy()), rtol=1e-5)
    for a, b in zip(got[1], live[1]):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=0, atol=5e-5 * np.abs(b.asnumpy()).max())
    _check(got, ref_live(h, w, th, tw, beta))
