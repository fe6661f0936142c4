"""The sharded training graph (train/sharded_model.py, train/parallel_step.py) computes what the CPU reference computes.

On CPU MindSpore runs stand-alone and the operators' strategies are inert, so the sharded student / teacher / losses /
update can be run and compared with models/, losses.py and optim.py on the same weights: same parameter names and
shapes (also against train.parallel.param_shapes, which the dry run uses without MindSpore), same logits, same GKD and
SFT losses and gradients, and the same AdamW update; a step whose loss is above the bound changes nothing.
Tolerances: float32 with a different operation order (explicit log-softmax, tiled rope key): 2e-5 relative.
"""
import numpy as np
import pytest

from youzhi_ms.runtime import init_context

init_context("graph")

import mindspore as ms  # noqa: E402
from mindspore import ParameterTuple  # noqa: E402

from youzhi_ms.checkpoint.mindspore_ckpt import build_model  # noqa: E402
from youzhi_ms.config import load_any_config  # noqa: E402
from youzhi_ms.train.parallel import param_shapes  # noqa: E402
from youzhi_ms.train.sharded_model import build_sharded  # noqa: E402
from youzhi_ms.train.losses import GKDNet, SFTNet  # noqa: E402

V, S, B = 64, 12, 2
MLA = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=V, hidden_size=32,
           intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
           q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=64,
           rope_interleave=True, rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-6)
MLA_QLORA = dict(MLA, q_lora_rank=12, attention_bias=True, tie_word_embeddings=True,
                 youzhi={"no_kv_layernorm": True})
QWEN = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=V, hidden_size=32, intermediate_size=48,
            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-6)


def _pair(cfg, seed):
    """(reference model with random weights, the sharded model holding the same weights)."""
    ref = build_model(load_any_config(cfg))
    rng = np.random.default_rng(seed)
    for p in ref.get_parameters():
        scale = 0.3 if len(p.shape) == 1 else 0.2
        base = 1.0 if p.name.endswith("layernorm.weight") else 0.0
        p.set_data(ms.Tensor((base + scale * rng.standard_normal(p.shape)).astype(np.float32)))
    return ref


def _copy(ref, sharded, prefix=""):
    src = {prefix + p.name: p for p in ref.get_parameters()}
    dst = {p.name: p for p in sharded.get_parameters()}
    assert set(src) == set(dst)
    for name, p in dst.items():
        assert tuple(p.shape) == tuple(src[name].shape), name
        p.set_data(ms.Tensor(src[name].asnumpy()))


def _close(a, b, tol=2e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b))), np.max(np.abs(a - b))


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, S)).astype(np.int32)
    labels = rng.integers(0, V, (B, S)).astype(np.int32)
    mask = (rng.random((B, S)) < 0.7).astype(np.float32)
    return ms.Tensor(ids), ms.Tensor(labels), ms.Tensor(mask)


@pytest.mark.parametrize("student_cfg,betas", [(MLA, (0.5,)), (MLA_QLORA, (0.0, 1.0))],
                         ids=["mla-jsd", "mla-qlora-bias-tied-nonorm-kl"])
def test_sharded_models_and_gkd_loss_equal_the_reference(student_cfg, betas):
    s_ref, t_ref = _pair(student_cfg, 1), _pair(QWEN, 2)
    for p in t_ref.get_parameters():  # the trainer's naming: both models in one graph
        p.name = "teacher." + p.name
        p.requires_grad = False
    net, s_sh, t_sh = build_sharded(load_any_config(student_cfg), load_any_config(QWEN), S, dp=2, mp=2,
                                    jsd_beta=0.5, temperature=0.9)
    _copy(s_ref, s_sh)
    _copy(t_ref, t_sh)
    assert {p.name: tuple(p.shape) for p in s_sh.get_parameters()} == param_shapes(student_cfg)
    assert {p.name[len("teacher."):]: tuple(p.shape) for p in t_sh.get_parameters()} == param_shapes(QWEN)
    ids, labels, mask = _batch()
    _close(s_sh(ids).asnumpy(), s_ref(ids).asnumpy().reshape(B * S, V))
    _close(t_sh(ids).asnumpy(), t_ref(ids).asnumpy().reshape(B * S, V))

    for beta in betas:
        ref_net = GKDNet(s_ref, t_ref, beta, 0.9)
        sh_net, _, _ = build_sharded(load_any_config(student_cfg), load_any_config(QWEN), S, 2, 2, jsd_beta=beta,
                                     temperature=0.9)
        sh_net.student, sh_net.teacher = s_sh, t_sh
        ref_params = ParameterTuple(list(s_ref.get_parameters()))
        sh_params = ParameterTuple(list(s_sh.get_parameters()))
        one = ms.Tensor(1.0, ms.float32)
        l_ref, g_ref = ms.value_and_grad(ref_net, None, ref_params)(ids, labels, mask, one)
        l_sh, g_sh = ms.value_and_grad(sh_net, None, sh_params)(ids, labels, mask)
        _close(l_sh.asnumpy(), l_ref.asnumpy())
        for a, b in zip(g_sh, g_ref):
            _close(a.asnumpy(), b.asnumpy(), 1e-4)


def test_sharded_sft_loss_and_parallel_step_update_equal_the_reference():
    from youzhi_ms.train.optim import FusedStep, UpdateCore
    from youzhi_ms.train.parallel_step import ShardedStep, ShardedUpdateCore
    s_ref = _pair(MLA, 3)
    net, s_sh, _ = build_sharded(load_any_config(MLA), None, S, dp=2, mp=2)
    _copy(s_ref, s_sh)

    ids, labels, mask = _batch(1)
    params_ref = list(s_ref.get_parameters())
    params_sh = list(s_sh.get_parameters())
    groups = [1 if ".kv_layernorm." in p.name else 0 for p in params_ref]
    decays = [0.01 if len(p.shape) >= 2 else 0.0 for p in params_ref]
    start = [p.asnumpy().copy() for p in params_ref]
    ref_step = FusedStep(SFTNet(s_ref), UpdateCore(params_ref, groups, decays, (0.9, 0.95), 1e-8, 0.5, 1))
    sh_step = ShardedStep(net, ShardedUpdateCore(params_sh, groups, decays, (0.9, 0.95), 1e-8, 0.5), num_groups=2)
    scale, lrs, bc1, bc2 = 1.0 / float(mask.asnumpy().sum()), [1e-2, 5e-2], 0.1, 0.05
    l_ref, n_ref = ref_step(ms.Tensor(np.asarray(lrs, np.float32)), ms.Tensor(bc1, ms.float32),
                            ms.Tensor(bc2, ms.float32), ms.mutable((ids, labels, mask, ms.Tensor(scale, ms.float32))))
    sh_step.set_hyper(scale, bc1, bc2, lrs)
    l_sh, n_sh, ok = sh_step(ids, labels, mask)
    assert bool(ok.asnumpy())
    _close(l_sh.asnumpy(), l_ref.asnumpy())
    _close(n_sh.asnumpy(), n_ref.asnumpy(), 1e-4)
    # AdamW normalises each gradient entry, so float32 noise in tiny entries moves their update: compare the updates
    # with a tolerance relative to the largest one (the learning rate)
    d_sh = [a.asnumpy() - s0 for a, s0 in zip(params_sh, start)]
    d_ref = [b.asnumpy() - s0 for b, s0 in zip(params_ref, start)]
    top = max(float(np.max(np.abs(d))) for d in d_ref)
    assert top > 0
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(d_sh, d_ref)) <= 2e-3 * top


def test_parallel_step_guard_applies_nothing_above_the_bound():
    from youzhi_ms.train.parallel_step import ShardedStep, ShardedUpdateCore
    t_ref = _pair(QWEN, 5)
    net, s_sh, t_sh = build_sharded(load_any_config(MLA), load_any_config(QWEN), S, dp=1, mp=1)
    _copy(_pair(MLA, 4), s_sh)
    _copy(t_ref, t_sh, prefix="teacher.")
    params = list(s_sh.get_parameters())
    core = ShardedUpdateCore(params, [0] * len(params), [0.0] * len(params))
    before = [p.asnumpy().copy() for p in params] + [m.asnumpy().copy() for m in core.m]
    step = ShardedStep(net, core, loss_bound=1e-9)  # every real loss is above it
    step.set_hyper(0.1, 0.1, 0.05, [1e-2])
    ids, labels, mask = _batch(2)
    loss, _, ok = step(ids, labels, mask)
    assert not bool(ok.asnumpy()) and float(loss.asnumpy()) > 1e-9
    after = [p.asnumpy() for p in params] + [m.asnumpy() for m in core.m]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
