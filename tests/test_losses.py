"""Tests for youzhi_ms.train.losses against float64 numpy references written in probability space."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from youzhi_ms.errors import YouzhiError
from youzhi_ms.train.losses import (
    GKDLoss,
    SFTLoss,
    build_sft_labels,
    generalized_jsd,
    jsd_upper_bound,
    sft_cross_entropy,
)

ms.set_device("CPU")

B, T, V = 2, 5, 11
TAU = 0.7
# MindSpore's CPU exp kernel is accurate to ~5e-6 relative (not to the float32 ulp), so per-token log-probabilities
# carry ~5e-6 absolute error and a per-token KL of size ~2 can be off by ~5e-5. Reduced ("mean") values stay within
# ~3e-6 relative of the float64 reference (measured over 30 seeds); per-token values within ~2e-5.
RTOL, ATOL = 1e-5, 1e-6
TOK_RTOL = 5e-5
BETAS = [0.0, 0.3, 0.5, 1.0]


# ----------------------------------------------------------------------------------------------------------------------
# float64 references (probability space, independent of the implementation's log-space formulation)


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _kl(p, q):
    return np.sum(p * np.log(p / q), axis=-1)


def ref_per_token(student, teacher, beta, tau):
    ps = _softmax(student.astype(np.float64) / tau)
    pt = _softmax(teacher.astype(np.float64) / tau)
    if beta == 0.0:
        return _kl(pt, ps)
    if beta == 1.0:
        return _kl(ps, pt)
    m = beta * pt + (1.0 - beta) * ps
    return beta * _kl(pt, m) + (1.0 - beta) * _kl(ps, m)


def ref_mean(per_token, mask):
    return float(np.sum(per_token * mask) / np.sum(mask))


def ref_grad_student(student, teacher, mask, beta, tau):
    """Analytic d(mean loss)/d(student logits): dL/dp_S pushed through the softmax Jacobian, then 1/τ."""
    ps = _softmax(student.astype(np.float64) / tau)
    pt = _softmax(teacher.astype(np.float64) / tau)
    if beta == 0.0:
        g_logits = ps - pt
    else:
        if beta == 1.0:
            g_p = np.log(ps / pt)
        else:
            m = beta * pt + (1.0 - beta) * ps
            g_p = (1.0 - beta) * np.log(ps / m)
        g_logits = ps * (g_p - np.sum(ps * g_p, axis=-1, keepdims=True))
    weight = mask / mask.sum()
    return g_logits * weight[..., None] / tau


def _data(seed=0):
    rng = np.random.default_rng(seed)
    student = (2.0 * rng.standard_normal((B, T, V))).astype(np.float32)
    teacher = (2.0 * rng.standard_normal((B, T, V))).astype(np.float32)
    mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=np.float32)
    return student, teacher, mask


@pytest.fixture
def graph_mode():
    """Run the test with GRAPH_MODE set globally; the execution mode can be toggled within one process."""
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        yield
    finally:
        ms.set_context(mode=previous)


# ----------------------------------------------------------------------------------------------------------------------
# generalized JSD


@pytest.mark.parametrize("beta", BETAS)
def test_jsd_matches_reference(beta):
    s, t, mask = _data()
    ref_tok = ref_per_token(s, t, beta, TAU)
    got_none = generalized_jsd(Tensor(s), Tensor(t), Tensor(mask), jsd_beta=beta, temperature=TAU, reduction="none")
    assert got_none.shape == (B, T) and got_none.dtype == ms.float32
    np.testing.assert_allclose(got_none.asnumpy(), ref_tok * mask, rtol=TOK_RTOL, atol=ATOL)
    got_mean = generalized_jsd(Tensor(s), Tensor(t), Tensor(mask), jsd_beta=beta, temperature=TAU)
    assert got_mean.shape == ()
    np.testing.assert_allclose(float(got_mean.asnumpy()), ref_mean(ref_tok, mask), rtol=RTOL, atol=ATOL)
    got_sum = generalized_jsd(Tensor(s), Tensor(t), Tensor(mask), jsd_beta=beta, temperature=TAU, reduction="sum")
    np.testing.assert_allclose(float(got_sum.asnumpy()), np.sum(ref_tok * mask), rtol=RTOL, atol=ATOL)
    # No mask: every token scored.
    got_all = GKDLoss(beta, TAU)(Tensor(s), Tensor(t))
    np.testing.assert_allclose(float(got_all.asnumpy()), ref_tok.mean(), rtol=RTOL, atol=ATOL)


def test_endpoints_are_forward_and_reverse_kl():
    s, t, mask = _data(1)
    ps, pt = _softmax(s.astype(np.float64) / TAU), _softmax(t.astype(np.float64) / TAU)
    forward = np.sum(pt * (np.log(pt) - np.log(ps)), axis=-1)
    reverse = np.sum(ps * (np.log(ps) - np.log(pt)), axis=-1)
    got0 = generalized_jsd(Tensor(s), Tensor(t), jsd_beta=0.0, temperature=TAU, reduction="none").asnumpy()
    got1 = generalized_jsd(Tensor(s), Tensor(t), jsd_beta=1.0, temperature=TAU, reduction="none").asnumpy()
    np.testing.assert_allclose(got0, forward, rtol=TOK_RTOL, atol=ATOL)
    np.testing.assert_allclose(got1, reverse, rtol=TOK_RTOL, atol=ATOL)
    # The interior formula itself vanishes at the endpoints, which is why they are special-cased.
    for beta in (1e-12, 1.0 - 1e-12):
        m = beta * pt + (1 - beta) * ps
        assert np.all(beta * _kl(pt, m) + (1 - beta) * _kl(ps, m) < 1e-9)


@pytest.mark.parametrize("beta", BETAS)
def test_jsd_swap_symmetry_and_nonnegative(beta):
    s, t, _ = _data(2)
    # JSD_β(P_T‖P_S) = JSD_{1−β}(P_S‖P_T): swap the roles and mirror β (β=0 forward KL ↔ β=1 reverse KL).
    a = generalized_jsd(Tensor(s), Tensor(t), jsd_beta=beta, temperature=TAU, reduction="none").asnumpy()
    b = generalized_jsd(Tensor(t), Tensor(s), jsd_beta=1.0 - beta, temperature=TAU, reduction="none").asnumpy()
    np.testing.assert_allclose(a, b, rtol=TOK_RTOL, atol=ATOL)
    assert np.all(a >= -1e-7) and np.all(a > 0.0).any()
    # Zero when the distributions coincide (the shift logits + c is the same distribution).
    same = generalized_jsd(Tensor(s), Tensor(s + 3.0), jsd_beta=beta, temperature=TAU, reduction="none").asnumpy()
    np.testing.assert_allclose(same, 0.0, atol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_upper_bound_is_reached_by_disjoint_distributions_and_never_exceeded(beta):
    """The trainer flags token-mean losses above jsd_upper_bound(beta) as corrupted: the bound must be the supremum."""
    bound = jsd_upper_bound(beta)
    assert jsd_upper_bound(0.0) is None and jsd_upper_bound(1.0) is None
    assert abs(jsd_upper_bound(0.5) - np.log(2.0)) < 1e-12
    v = 64
    s = np.zeros((1, 4, v), np.float32)
    t = np.zeros((1, 4, v), np.float32)
    s[0, np.arange(4), np.arange(4)] = 60.0  # the student puts (almost) all mass where the teacher puts none
    t[0, np.arange(4), 32 + np.arange(4)] = 60.0
    top = float(generalized_jsd(Tensor(s), Tensor(t), jsd_beta=beta, temperature=1.0).asnumpy())
    assert abs(top - bound) < 1e-4 * bound
    rng = np.random.default_rng(5)
    for scale in (1.0, 10.0, 100.0):
        a = (rng.standard_normal((2, 8, v)) * scale).astype(np.float32)
        b = (rng.standard_normal((2, 8, v)) * scale).astype(np.float32)
        per = generalized_jsd(Tensor(a), Tensor(b), jsd_beta=beta, temperature=0.9, reduction="none").asnumpy()
        assert per.max() <= bound * (1 + 1e-4) + 1e-6


def test_mask_semantics():
    s, t, mask = _data(3)
    base = float(generalized_jsd(Tensor(s), Tensor(t), Tensor(mask), jsd_beta=0.5, temperature=TAU).asnumpy())
    s2, t2 = s.copy(), t.copy()
    s2[mask == 0] = 1e4 * np.sign(s2[mask == 0])  # garbage (even overflowing after exp) at ignored positions
    t2[mask == 0] = -50.0
    s2[0, 0, 0] = np.inf
    changed = float(generalized_jsd(Tensor(s2), Tensor(t2), Tensor(mask), jsd_beta=0.5, temperature=TAU).asnumpy())
    assert changed == pytest.approx(base, rel=1e-6)
    # Integer and bool masks behave like the float mask.
    for m in (mask.astype(np.int32), mask.astype(bool)):
        val = float(generalized_jsd(Tensor(s), Tensor(t), Tensor(m), jsd_beta=0.5, temperature=TAU).asnumpy())
        assert val == pytest.approx(base, rel=1e-6)
    # All tokens ignored: 0, not NaN.
    zero = generalized_jsd(Tensor(s), Tensor(t), Tensor(np.zeros_like(mask)), jsd_beta=0.5, temperature=TAU)
    assert float(zero.asnumpy()) == 0.0


@pytest.mark.parametrize("beta", BETAS)
def test_gradient_matches_analytic(beta):
    s, t, mask = _data(4)
    expected = ref_grad_student(s, t, mask, beta, TAU)

    # The analytic reference itself agrees with central finite differences of the float64 reference.
    def loss64(x):
        return ref_mean(ref_per_token(x, t, beta, TAU), mask)

    s64, eps = s.astype(np.float64), 1e-6
    for idx in [(0, 2, 0), (0, 4, 7), (1, 1, 3), (1, 2, 10), (0, 0, 5)]:
        plus, minus = s64.copy(), s64.copy()
        plus[idx] += eps
        minus[idx] -= eps
        fd = (loss64(plus) - loss64(minus)) / (2 * eps)
        assert fd == pytest.approx(expected[idx], rel=1e-5, abs=1e-9)

    def loss_fn(student, teacher):
        return generalized_jsd(student, teacher, Tensor(mask), jsd_beta=beta, temperature=TAU)

    value, (g_student, g_teacher) = ms.value_and_grad(loss_fn, grad_position=(0, 1))(Tensor(s), Tensor(t))
    np.testing.assert_allclose(float(value.asnumpy()), loss64(s64), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(g_student.asnumpy(), expected, rtol=1e-4, atol=1e-7)
    assert not np.any(g_teacher.asnumpy())  # the teacher is a constant


@pytest.mark.parametrize("beta", [0.3, 0.5])
def test_gradient_is_zero_at_the_optimum(beta):
    # Student == teacher: every log β + log p_T equals log(1−β) + log p_S up to the constant log-ratio, and at β = 0.5
    # the two logsumexp terms tie exactly; the gradient must still be the true (zero) gradient.
    s, _, mask = _data(5)
    teacher, m = Tensor(s), Tensor(mask)

    def loss_fn(student):
        return generalized_jsd(student, teacher, m, jsd_beta=beta, temperature=TAU)

    grad = ms.grad(loss_fn)(Tensor(s))
    np.testing.assert_allclose(grad.asnumpy(), 0.0, atol=1e-7)


def test_float16_logits_are_computed_in_float32():
    s, t, mask = _data(6)
    got = generalized_jsd(Tensor(s.astype(np.float16)), Tensor(t.astype(np.float16)), Tensor(mask), jsd_beta=0.5,
                          temperature=TAU)
    assert got.dtype == ms.float32
    ref = ref_mean(ref_per_token(s.astype(np.float16), t.astype(np.float16), 0.5, TAU), mask)
    assert float(got.asnumpy()) == pytest.approx(ref, rel=1e-5)


def test_argument_checks():
    s, t, _ = _data()
    with pytest.raises(YouzhiError):
        GKDLoss(jsd_beta=1.5)
    with pytest.raises(YouzhiError):
        GKDLoss(temperature=0.0)
    with pytest.raises(YouzhiError):
        GKDLoss(reduction="batchmean")
    with pytest.raises(YouzhiError):
        SFTLoss(reduction="avg")
    with pytest.raises(ValueError):
        generalized_jsd(Tensor(s), Tensor(t), jsd_beta=-0.1)
    with pytest.raises(ValueError):
        generalized_jsd(Tensor(s), Tensor(t[..., :-1]))


class _StudentWithGKD(nn.Cell):
    """A tiny student (one Dense head) scored by GKDLoss, the shape of a real GKD train step's forward."""

    def __init__(self, beta):
        super().__init__()
        self.head = nn.Dense(4, V, weight_init="normal", bias_init="zeros")
        self.loss = GKDLoss(jsd_beta=beta, temperature=TAU)

    def construct(self, hidden, teacher_logits, mask):
        return self.loss(self.head(hidden), teacher_logits, mask)


def test_graph_mode_matches_pynative(graph_mode):
    # GRAPH_MODE is active (fixture); forward and weight gradients compile and equal the PyNative results.
    ms.set_seed(0)
    _, t, mask = _data(7)
    hidden = Tensor(np.random.default_rng(7).standard_normal((B, T, 4)).astype(np.float32))
    results = {}
    for mode in (ms.GRAPH_MODE, ms.PYNATIVE_MODE):
        ms.set_context(mode=mode)
        for beta in (0.0, 0.5):
            net = _StudentWithGKD(beta)
            net.head.weight.set_data(Tensor(np.linspace(-1, 1, V * 4, dtype=np.float32).reshape(V, 4)))
            grad_fn = ms.value_and_grad(net, None, net.trainable_params())
            loss, grads = grad_fn(hidden, Tensor(t), Tensor(mask))
            results[(mode, beta)] = (float(loss.asnumpy()), [g.asnumpy() for g in grads])
    for beta in (0.0, 0.5):
        g_loss, g_grads = results[(ms.GRAPH_MODE, beta)]
        p_loss, p_grads = results[(ms.PYNATIVE_MODE, beta)]
        assert g_loss == pytest.approx(p_loss, rel=1e-6)
        for a, b in zip(g_grads, p_grads):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_jit_function_matches_pynative():
    s, t, mask = _data(8)

    @ms.jit
    def jitted(student, teacher, m):
        return generalized_jsd(student, teacher, m, jsd_beta=0.3, temperature=TAU)

    got = float(jitted(Tensor(s), Tensor(t), Tensor(mask)).asnumpy())
    eager = float(generalized_jsd(Tensor(s), Tensor(t), Tensor(mask), jsd_beta=0.3, temperature=TAU).asnumpy())
    assert got == pytest.approx(eager, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# SFT cross entropy and labels


def ref_ce(logits, labels, mask):
    p = _softmax(logits.astype(np.float64))
    picked = np.take_along_axis(p, np.where(mask > 0, labels, 0)[..., None], axis=-1)[..., 0]
    nll = -np.log(picked)
    return float(np.sum(nll * mask) / np.sum(mask)), nll * mask


def test_sft_cross_entropy_matches_reference_and_ignores_masked():
    s, _, mask = _data(9)
    rng = np.random.default_rng(9)
    labels = rng.integers(0, V, size=(B, T)).astype(np.int32)
    labels[mask == 0] = -100  # out-of-range ids at ignored positions are fine
    ref, ref_tok = ref_ce(s, labels, mask)
    got = sft_cross_entropy(Tensor(s), Tensor(labels), Tensor(mask))
    assert got.shape == () and got.dtype == ms.float32
    np.testing.assert_allclose(float(got.asnumpy()), ref, rtol=RTOL)
    np.testing.assert_allclose(float(SFTLoss()(Tensor(s), Tensor(labels), Tensor(mask)).asnumpy()), ref, rtol=RTOL)
    got_tok = sft_cross_entropy(Tensor(s), Tensor(labels), Tensor(mask), reduction="none").asnumpy()
    np.testing.assert_allclose(got_tok, ref_tok, rtol=RTOL, atol=ATOL)
    # Changing logits at ignored positions changes nothing; their gradient is zero.
    s2 = s.copy()
    s2[mask == 0] = rng.standard_normal(s2[mask == 0].shape) * 100.0
    assert float(sft_cross_entropy(Tensor(s2), Tensor(labels), Tensor(mask)).asnumpy()) == pytest.approx(ref, rel=1e-6)
    labels_t, mask_t = Tensor(labels), Tensor(mask)

    def loss_fn(logits):
        return sft_cross_entropy(logits, labels_t, mask_t)

    grad = ms.grad(loss_fn)(Tensor(s)).asnumpy()
    assert not np.any(grad[mask == 0])
    # Analytic gradient at scored positions: (softmax − onehot) / n_scored.
    onehot = np.eye(V)[np.where(mask > 0, labels, 0)]
    expected = (_softmax(s.astype(np.float64)) - onehot) * (mask / mask.sum())[..., None]
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)


def test_sft_in_graph_mode(graph_mode):
    s, _, mask = _data(10)
    labels = np.random.default_rng(10).integers(0, V, size=(B, T)).astype(np.int32)
    got = float(SFTLoss()(Tensor(s), Tensor(labels), Tensor(mask)).asnumpy())
    assert got == pytest.approx(ref_ce(s, labels, mask)[0], rel=RTOL)


def test_build_sft_labels_worked_example():
    input_ids, labels, loss_mask = build_sft_labels([5, 6, 7], [8, 9], max_len=6, pad_id=0)
    assert input_ids.tolist() == [5, 6, 7, 8, 0, 0]
    assert labels.tolist() == [6, 7, 8, 9, 0, 0]
    assert loss_mask.tolist() == [0, 0, 1, 1, 0, 0]
    assert input_ids.dtype == np.int32 and labels.dtype == np.int32 and loss_mask.dtype == np.float32
    # Right truncation keeps the prompt and as much response as fits.
    input_ids, labels, loss_mask = build_sft_labels([5, 6, 7], [8, 9, 10, 11], max_len=4, pad_id=0)
    assert input_ids.tolist() == [5, 6, 7, 8]
    assert labels.tolist() == [6, 7, 8, 9]
    assert loss_mask.tolist() == [0, 0, 1, 1]
    # Prompt fills the window: nothing scored.
    _, _, loss_mask = build_sft_labels([1, 2, 3, 4], [5], max_len=3, pad_id=0)
    assert loss_mask.tolist() == [0, 0, 0]
    # Empty prompt: every response token after the first is scored.
    input_ids, labels, loss_mask = build_sft_labels([], [4, 5, 6], max_len=4, pad_id=-1)
    assert input_ids.tolist() == [4, 5, -1, -1] and labels.tolist() == [5, 6, -1, -1]
    assert loss_mask.tolist() == [1, 1, 0, 0]
    with pytest.raises(YouzhiError):
        build_sft_labels([1, 2], [], max_len=4, pad_id=0)


def test_build_sft_labels_feeds_sft_loss():
    # A model that puts logit 5 on the right token (0 elsewhere) scores log(1 + (V−1)e^−5) on every scored token.
    rows = [build_sft_labels([1, 2, 3], [4, 5], 6, 0), build_sft_labels([7], [8, 9, 10], 6, 0)]
    input_ids, labels, mask = (np.stack(x) for x in zip(*rows))
    logits = np.zeros((2, 6, V), dtype=np.float32)
    np.put_along_axis(logits, labels[..., None].astype(np.int64), 5.0, axis=-1)
    perfect = float(sft_cross_entropy(Tensor(logits), Tensor(labels), Tensor(mask)).asnumpy())
    # Absolute tolerance: the value is a small difference of two O(5) log-sum-exps (see the note on exp at the top).
    assert perfect == pytest.approx(np.log1p((V - 1) * np.exp(-5.0)), abs=1e-5)
    # Prompt positions are wrong on purpose and do not matter.
    logits[0, 0] = 0.0
    logits[0, 0, 3] = 50.0
    assert float(sft_cross_entropy(Tensor(logits), Tensor(labels), Tensor(mask)).asnumpy()) == pytest.approx(perfect)
    assert mask.sum() == 2 + 3
