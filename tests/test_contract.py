"""The config contract (youzhi_ms/contract.py): one reading of config.json for every tool, and one DeepSeek-V3 config
for a conversion, whether the converter writes it or the planner predicts it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import (DeepseekV3Config, DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from youzhi_ms import contract as C
from youzhi_ms.errors import YouzhiError
from youzhi_ms.infer import planner as P

from helpers import ROOT, calib

V = 96
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)


def _models():
    return {
        "llama": LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, head_dim=16, attention_bias=True, **SMALL)),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **SMALL)),
        "mistral": MistralForCausalLM(MistralConfig(num_key_value_heads=1, sliding_window=None, **SMALL)),
        "dsv3-qlora": DeepseekV3ForCausalLM(DeepseekV3Config(
            num_key_value_heads=4, kv_lora_rank=24, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
            v_head_dim=16, n_routed_experts=None, first_k_dense_replace=2, attention_bias=True, **SMALL)),
    }


def test_expected_tensors_are_what_transformers_builds_and_what_the_planner_counts():
    torch.manual_seed(0)
    for name, model in _models().items():
        cfg = json.loads(model.config.to_json_string())
        want = C.expected_tensors(C.parse_config(cfg, name))
        got = {n: tuple(p.shape) for n, p in model.state_dict().items() if not n.endswith("rotary_emb.inv_freq")}
        if cfg["tie_word_embeddings"]:
            got.pop("lm_head.weight")
        assert want == got, name
        assert sum(int(np.prod(s)) for s in want.values()) == P.shape_from_config(cfg).num_params(), name


@pytest.mark.parametrize("change, match", [
    (dict(num_attention_heads="4"), "num_attention_heads must be a positive integer, got '4'"),
    (dict(num_attention_heads=4.0), "num_attention_heads must be a positive integer, got 4.0"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer, got 0"),
    (dict(hidden_size=-64), "hidden_size must be a positive integer"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
    (dict(head_dim=15), "head_dim must be even"),
    (dict(head_dim=None, hidden_size=66), "not divisible by num_attention_heads"),
    (dict(vocab_size=None), "no 'vocab_size' key"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps must be a positive number"),
    (dict(rope_theta=True), "rope_theta must be a positive number"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings must be true or false"),
    (dict(eos_token_id="</s>"), "eos_token_id must be a token id"),
    (dict(rope_scaling=[1, 2]), "rope_scaling must be an object"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling type 'dynamic' is not supported"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling of type llama3 has no low_freq_factor"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 0}), "factor must be a positive number"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}), "high_freq_factor must exceed low_freq_factor"),
    (dict(model_type="bert"), "unsupported model_type 'bert'"),
    (dict(model_type=7), "model_type must be a string"),
    (dict(model_type="qwen3"), "q/k RMSNorm"),
    (dict(num_local_experts=8), "mixture-of-experts"),
])
def test_bad_config_values_are_one_clear_error(change, match):
    cfg = dict(model_type="llama", num_key_value_heads=2, head_dim=16, **SMALL)
    cfg.update(change)
    with pytest.raises(YouzhiError, match=match.replace("(", r"\(").replace("[", r"\[")):
        C.parse_config(cfg, "config.json")


def test_runnable_checks_only_where_the_models_need_them():
    cfg = dict(model_type="llama", num_key_value_heads=2, hidden_act="gelu", mlp_bias=True, **SMALL)
    f = C.parse_config(cfg)  # the planner reads it (it counts mlp biases)
    assert f["mlp_bias"] and P.shape_from_config(cfg).mlp_bias
    with pytest.raises(YouzhiError, match="hidden_act 'gelu'"):
        C.check_runnable(cfg, f)
    big = dict(cfg, hidden_act="silu", mlp_bias=False, max_position_embeddings=1 << 40)
    with pytest.raises(YouzhiError, match="beyond"):
        C.check_runnable(big, C.parse_config(big))


def test_read_config_json_hostile_files(tmp_path):
    cases = {"bad.json": b"{not json", "list.json": b"[1, 2]", "latin1.json": '{"a": "\xe9"}'.encode("latin-1"),
             "empty.json": b""}
    expect = {"bad.json": "not valid JSON", "list.json": "holds a JSON list", "latin1.json": "not UTF-8",
              "empty.json": "not valid JSON"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(YouzhiError, match=expect[name]):
            C.read_config_json(str(tmp_path / name))


def test_rank_and_rope_rules_are_the_same_for_converter_and_planner():
    f = C.parse_config(dict(model_type="qwen2", num_key_value_heads=4, hidden_size=3584, num_attention_heads=28,
                            num_hidden_layers=28, intermediate_size=18944, vocab_size=152064))
    assert C.max_rank(4, 128, 64) == 960 == 2 * 4 * 128 - 64
    assert C.conversion_dims(f, 960) == 64  # default rope = head_dim / 2
    for bad_rank in (0, 961, 320.0, True):
        with pytest.raises(YouzhiError, match="out of range"):
            C.conversion_dims(f, bad_rank)
    for bad_rope in (0, 6, 48, 130, -4):
        with pytest.raises(YouzhiError, match="must be even and divide head_dim 128"):
            C.conversion_dims(f, 320, bad_rope)
    shape = P.shape_from_config(dict(f))
    with pytest.raises(YouzhiError, match="must be even and divide head_dim 128"):
        P.mla_shape_from_source(shape, 320, 48)


def test_deployment_warnings_one_wording():
    assert C.deployment_warnings(128, 512, 64) == []
    w = C.deployment_warnings(9, 100, 32, attention_bias=True)
    assert len(w) == 5 and "{32, 64, 128}" in w[0] and "9 heads run as 16" in w[1] and "multiple of 16" in w[2]
    assert "= 132" in w[3] and "320 or 576 only" in w[3] and "llama.cpp" in w[4]
    assert all(("#" in x or "Dec 2026" in x or "llama.cpp" in x) for x in w)  # each names where it was read
    assert len(C.deployment_warnings(128, 256, 64)) == 1 and "FlashMLA" in C.deployment_warnings(128, 256, 64)[0]
    src = P.shape_from_config(dict(model_type="llama", num_key_value_heads=3, head_dim=16,
                                   **dict(SMALL, num_attention_heads=9)))
    mla = P.mla_shape_from_source(src, 40, 4)
    assert P.deployment_warnings(mla, P.PlanSettings(max_model_len=64)) == C.deployment_warnings(9, 40, 4)


@pytest.mark.parametrize("export", ["deepseek", "exact"])
def test_a_conversion_and_the_planner_write_the_same_config(tmp_path, export):
    """The converter (a real conversion of a tiny transformers Llama, bf16 output) and tools/plan_concurrency.py
    --write-mla-config (bf16) describe the converted model with the same config.json; the conversion adds only its
    youzhi provenance block (and, for --export exact, the extension flags in it)."""
    from youzhi_ms.convert.pipeline import ConvertOptions, convert
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, head_dim=16, **SMALL)).save_pretrained(tmp_path / "src")
    convert(str(tmp_path / "src"), str(tmp_path / "mla"), ConvertOptions(
        kv_lora_rank=24, qk_rope_dim=8, freqfold="2", export=export, out_dtype="bf16", progress=False,
        calib_ids=calib(0, 4, 32, V)))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plan_concurrency.py"), "--model",
                        str(tmp_path / "src"), "--kv-lora-rank", "24", "--qk-rope-dim", "8", "--max-model-len", "64",
                        "--write-mla-config", str(tmp_path / "planned")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    converted = json.loads((tmp_path / "mla" / "config.json").read_text())
    planned = json.loads((tmp_path / "planned" / "config.json").read_text())
    youzhi = converted.pop("youzhi")
    assert converted == planned
    assert youzhi["export"] == export and ("no_kv_layernorm" in youzhi) == (export == "exact")
    assert planned["torch_dtype"] == "bfloat16" and planned["n_routed_experts"] is None
    # and transformers builds the dense model it describes
    assert DeepseekV3Config(**planned).first_k_dense_replace == planned["num_hidden_layers"]


def test_shipped_mla_configs_are_regenerated_from_the_contract():
    base = os.path.join(ROOT, "yaml_configs", "model_configs")
    for src, dst, r in (("qwen2_5_7b", "qwen2_5_7b_mla_r320", 320), ("qwen2_5_14b", "qwen2_5_14b_mla_r736", 736)):
        with open(os.path.join(base, dst, "config.json")) as f:
            shipped = json.load(f)
        assert shipped == C.mla_config(C.read_config_json(os.path.join(base, src, "config.json")), r, 64)


def test_contract_and_planner_stay_pure_python():
    """The planner runs anywhere (a laptop before a conversion): neither it nor the contract imports numpy."""
    code = ("import sys; import youzhi_ms.infer.planner, youzhi_ms.contract; "
            "sys.exit(sorted({'numpy', 'mindspore', 'torch'} & set(sys.modules)) != [])")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_dense_mla_config_loads_in_transformers_without_guessing(tmp_path):
    """transformers reads the contract's config.json as the dense MLA model it describes: no expert, no routing
    group filled in from DeepSeek-V3's defaults, q_lora_rank None (a plain q_proj), every MLP dense, and a save /
    load round trip keeps the keys as written. (llama.cpp's loader: tests/test_export_gguf.py.)"""
    from transformers import AutoConfig, AutoModelForCausalLM
    src = dict(model_type="llama", num_key_value_heads=2, head_dim=16, **SMALL)
    cfg = C.mla_config(src, 24, 8, torch_dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    conf = AutoConfig.from_pretrained(tmp_path)
    assert (conf.n_group, conf.topk_group, conf.n_shared_experts, conf.n_routed_experts) == (None, None, 0, None)
    assert conf.q_lora_rank is None and conf.first_k_dense_replace == cfg["num_hidden_layers"]
    model = AutoModelForCausalLM.from_config(conf)
    assert all(type(layer.mlp).__name__ == "DeepseekV3MLP" for layer in model.model.layers)
    assert all(hasattr(layer.self_attn, "q_proj") and not hasattr(layer.self_attn, "q_a_proj")
               for layer in model.model.layers)
    conf.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert {k: again.get(k) for k in C.dense_moe_keys(2, 96)} == C.dense_moe_keys(2, 96)


def test_every_writer_states_the_dense_keys(tmp_path):
    """A DeepSeek-V3 config from before the contract fixed its MoE keys (n_shared_experts null, no n_group) gets them
    when any tool writes the directory again (checkpoint.hf.write_model_files: conversion, hf_model, merge_slices);
    a GQA config passes through unchanged and a mixture of experts is refused."""
    from youzhi_ms.checkpoint.hf import write_model_files
    src = dict(model_type="llama", num_key_value_heads=2, head_dim=16, **SMALL)
    old = C.mla_config(src, 24, 8)
    old["n_shared_experts"] = None
    del old["n_group"], old["topk_group"]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    (tmp_path / "out").mkdir()
    write_model_files(str(tmp_path / "out"), old, str(tmp_path / "src"))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written == C.mla_config(src, 24, 8) and (tmp_path / "out" / "tokenizer.json").exists()
    assert C.stock_mla_config(src) == src
    with pytest.raises(YouzhiError, match="mixture-of-experts"):
        C.stock_mla_config(dict(old, n_routed_experts=8, first_k_dense_replace=1))
