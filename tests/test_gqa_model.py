"""The MindSpore source model against transformers (the independent reference), on tiny random checkpoints."""
import numpy as np
import pytest
import torch

import mindspore as ms
from youzhi_ms.runtime import init_context

init_context("graph")

from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from youzhi_ms.checkpoint.mindspore_ckpt import load_model  # noqa: E402
from youzhi_ms.config import rope_inv_freq  # noqa: E402
from youzhi_ms.models.base import DecodeCell, PrefillCell  # noqa: E402

from helpers import rel_err, save_random  # noqa: E402


def tiny_llama(rope_scaling=None, tie=True):
    return LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                       rope_theta=10000.0, rope_scaling=rope_scaling, tie_word_embeddings=tie, rms_norm_eps=1e-5)


def tiny_qwen2():
    return Qwen2Config(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       rope_theta=1e6, tie_word_embeddings=False, rms_norm_eps=1e-6)


CASES = {
    "llama-tied": (LlamaForCausalLM, lambda: tiny_llama()),
    "llama-linear": (LlamaForCausalLM, lambda: tiny_llama({"rope_type": "linear", "factor": 2.0}, tie=False)),
    "llama-llama3": (LlamaForCausalLM, lambda: tiny_llama({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                            "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 32})),
    "llama-yarn": (LlamaForCausalLM, lambda: tiny_llama({"rope_type": "yarn", "factor": 4.0,
                                                          "original_max_position_embeddings": 32})),
    "qwen2-bias-untied": (Qwen2ForCausalLM, tiny_qwen2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    cls, make = CASES[case]
    ref_model = save_random(cls, make(), tmp_path, norms_redrawn=True)
    ids = np.random.default_rng(1).integers(0, 160, (2, 40))
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()
    model, _ = load_model(str(tmp_path))
    out = model(ms.Tensor(ids, ms.int32)).asnumpy()
    assert rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("case", ["llama-linear", "llama-llama3", "llama-yarn"])
def test_rope_frequencies_match_transformers(case):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = CASES[case][1]()
    inv_ref, att_ref = ROPE_INIT_FUNCTIONS[cfg.rope_scaling["rope_type"]](cfg, "cpu")
    inv, att = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    np.testing.assert_allclose(inv, inv_ref.numpy(), rtol=1e-6)
    assert att == pytest.approx(att_ref, rel=1e-9)


def test_kv_cache_decode_reproduces_full_forward(tmp_path):
    ref_model = save_random(Qwen2ForCausalLM, tiny_qwen2(), tmp_path, norms_redrawn=True)
    ids = np.random.default_rng(2).integers(0, 160, (2, 20))
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()
    model, cfg = load_model(str(tmp_path))
    prompt = 6
    logits, k, v = PrefillCell(model)(ms.Tensor(ids[:, :prompt], ms.int32))
    assert rel_err(logits.asnumpy(), ref[:, :prompt]) <= 1e-4
    T = 32
    shape = (cfg.num_layers, 2, cfg.num_kv_heads, T, cfg.head_dim)
    assert k.shape == (cfg.num_layers, 2, cfg.num_kv_heads, prompt, cfg.head_dim)
    kc, vc = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    kc[:, :, :, :prompt], vc[:, :, :, :prompt] = k.asnumpy(), v.asnumpy()
    kc, vc = ms.Tensor(kc), ms.Tensor(vc)
    step = DecodeCell(model)
    for p in range(prompt, ids.shape[1]):
        out, kc, vc = step(ms.Tensor(ids[:, p:p + 1], ms.int32), ms.Tensor(np.full(2, p), ms.int32), kc, vc)
        assert rel_err(out.asnumpy()[:, 0], ref[:, p]) <= 1e-4, p
    # the full forward's own cache entries equal what decode wrote
    _, k_full, _ = PrefillCell(model)(ms.Tensor(ids, ms.int32))
    np.testing.assert_allclose(kc.asnumpy()[:, :, :, :ids.shape[1]], k_full.asnumpy(), rtol=1e-5, atol=1e-5)


def test_right_padded_batch_matches_unpadded(tmp_path):
    save_random(LlamaForCausalLM, tiny_llama(), tmp_path, norms_redrawn=True)
    model, _ = load_model(str(tmp_path))
    ids = np.random.default_rng(3).integers(0, 160, (2, 16))
    mask = np.ones((2, 16), np.int32)
    mask[1, 10:] = 0
    out = model(ms.Tensor(ids, ms.int32), ms.Tensor(mask)).asnumpy()
    alone = model(ms.Tensor(ids[1:, :10], ms.int32)).asnumpy()
    assert rel_err(out[1, :10], alone[0]) <= 1e-5


def test_fused_kernels_only_on_ascend():
    from youzhi_ms.models.layers import fused_kernels_available
    # On this CPU machine the fused RmsNorm/Swiglu kernels do not exist; the plain path must be chosen.
    assert ms.get_context("device_target") != "Ascend"
    assert not fused_kernels_available()
