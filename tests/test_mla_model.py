"""The MindSpore MLA model against transformers' DeepseekV3ForCausalLM, and absorbed decode against the naive path."""
import numpy as np
import pytest
import torch

import mindspore as ms
from youzhi_ms.runtime import init_context

init_context("graph")

from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from youzhi_ms.checkpoint.mindspore_ckpt import load_model  # noqa: E402
from youzhi_ms.models.base import DecodeCell, PrefillCell  # noqa: E402

from helpers import rel_err, save_random  # noqa: E402


def tiny_dsv3(**kw):
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, kv_lora_rank=24, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=16, n_routed_experts=None, first_k_dense_replace=2, max_position_embeddings=128,
                rope_theta=10000.0, tie_word_embeddings=False, rope_interleave=True, attention_bias=False)
    base.update(kw)
    return DeepseekV3Config(**base)


@pytest.mark.parametrize("variant", ["q-full", "q-lora-bias", "yarn"])
def test_naive_forward_matches_transformers(variant, tmp_path):
    kw = {"q-full": {}, "q-lora-bias": dict(q_lora_rank=20, attention_bias=True),
          "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                     "mscale": 1.0, "mscale_all_dim": 1.0})}[variant]
    ref_model = save_random(DeepseekV3ForCausalLM, tiny_dsv3(**kw), tmp_path)
    ids = np.random.default_rng(0).integers(0, 128, (2, 40))
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()
    model, _ = load_model(str(tmp_path))
    assert rel_err(model(ms.Tensor(ids, ms.int32)).asnumpy(), ref) <= 1e-4


@pytest.mark.parametrize("q_lora", [None, 20])
def test_absorbed_decode_equals_naive_forward(q_lora, tmp_path):
    ref_model = save_random(DeepseekV3ForCausalLM, tiny_dsv3(q_lora_rank=q_lora), tmp_path)
    ids = np.random.default_rng(1).integers(0, 128, (2, 18))
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()
    model, cfg = load_model(str(tmp_path))
    naive = model(ms.Tensor(ids, ms.int32)).asnumpy()
    prompt, T = 5, 24
    logits, c, pe = PrefillCell(model)(ms.Tensor(ids[:, :prompt], ms.int32))
    # the cache is exactly the latent and the shared rope key: layers x (r + rope) values per token
    assert c.shape == (cfg.num_layers, 2, prompt, cfg.kv_lora_rank)
    assert pe.shape == (cfg.num_layers, 2, prompt, cfg.qk_rope_head_dim)
    cc = np.zeros((cfg.num_layers, 2, T, cfg.kv_lora_rank), np.float32)
    pc = np.zeros((cfg.num_layers, 2, T, cfg.qk_rope_head_dim), np.float32)
    cc[:, :, :prompt], pc[:, :, :prompt] = c.asnumpy(), pe.asnumpy()
    cc, pc = ms.Tensor(cc), ms.Tensor(pc)
    step = DecodeCell(model)
    for p in range(prompt, ids.shape[1]):
        out, cc, pc = step(ms.Tensor(ids[:, p:p + 1], ms.int32), ms.Tensor(np.full(2, p), ms.int32), cc, pc)
        assert rel_err(out.asnumpy()[:, 0], naive[:, p]) <= 1e-5, p
        assert rel_err(out.asnumpy()[:, 0], ref[:, p]) <= 1e-4, p
    per_token = sum(int(np.prod(t.shape[3:])) for t in (cc, pc)) * cfg.num_layers
    assert per_token == cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
