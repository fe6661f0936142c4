"""KV-cache concurrency planner: figures against hand arithmetic, deployment warnings, the CLI and its errors."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from youzhi_ms.contract import mla_config
from youzhi_ms.errors import YouzhiError
from youzhi_ms.infer import planner as P

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "yaml_configs", "model_configs")
TOOL = os.path.join(REPO, "tools", "plan_concurrency.py")
Q7, Q14 = os.path.join(CONFIGS, "qwen2_5_7b"), os.path.join(CONFIGS, "qwen2_5_14b")
Q7_MLA, Q14_MLA = os.path.join(CONFIGS, "qwen2_5_7b_mla_r320"), os.path.join(CONFIGS, "qwen2_5_14b_mla_r736")

# Defaults, written out: 64 GiB card x 0.9 (floored to whole bytes), bf16, block 128, 4096-token requests.
BUDGET = 61_847_529_062  # floor(64 * 2**30 * 0.9) = floor(61_847_529_062.4)
RUNTIME = 2 ** 30  # 1 GiB runtime allowance
LOGITS = 256 * 152_064 * 4 * 2  # 256 seqs x vocab x fp32 x (logits + probs) = 311_427_072


def _plan(path_or_shape, **kw):
    shape = P.load_model_shape(path_or_shape) if isinstance(path_or_shape, str) else path_or_shape
    return P.plan_concurrency(shape, P.PlanSettings(**kw))


def test_qwen2_5_7b_gqa_by_hand():
    p = _plan(Q7)
    # per layer: q 3584*3584 + 3584 bias; k, v 3584*512 + 512 bias each; o 3584*3584 (no bias)
    attn = 3584 * 3584 + 3584 + 2 * (3584 * 512 + 512) + 3584 * 3584
    assert attn == 29_364_736
    mlp = 3 * 3584 * 18944  # gate, up, down
    assert mlp == 203_685_888
    layer = attn + mlp + 2 * 3584  # + two RMSNorms
    params = 152_064 * 3584 * 2 + 28 * layer + 3584  # embed + untied lm_head + layers + final norm
    assert p.num_params == params == 7_615_616_512  # Qwen2.5-7B's published 7.61B
    assert p.weight_bytes == 2 * 7_615_616_512 == 15_231_233_024
    assert p.kv_bytes_per_token == 28 * 2 * 4 * 128 * 2 == 57_344
    # activation reserve: 8192 tokens x (4*3584 + 3*18944) x 2 B + logits + 1 GiB
    assert p.activation_reserve_bytes == 8192 * (4 * 3584 + 3 * 18944) * 2 + LOGITS + RUNTIME == 2_551_185_408
    assert p.budget_bytes == BUDGET
    assert p.kv_budget_bytes == BUDGET - 15_231_233_024 - 2_551_185_408 == 44_065_110_630
    assert p.block_bytes == 128 * 57_344 == 7_340_032
    assert p.num_blocks == 44_065_110_630 // 7_340_032 == 6003
    assert p.kv_cache_tokens == 6003 * 128
    assert p.max_concurrency == 6003 * 128 / 4096 == 187.59375
    assert p.warnings == []


def test_qwen2_5_7b_mla_r320_by_hand():
    p = _plan(Q7_MLA)
    # q_proj 3584 x 28*(128+64); kv_a 3584 x (320+64); kv_a_layernorm 320; kv_b 320 x 28*(128+128); o 3584 x 3584
    attn = 3584 * 28 * 192 + 3584 * 384 + 320 + 320 * 28 * 256 + 3584 * 3584
    assert attn == 35_782_976
    params = 152_064 * 3584 * 2 + 28 * (attn + 3 * 3584 * 18944 + 2 * 3584) + 3584
    assert p.num_params == params == 7_795_327_232
    assert p.kv_bytes_per_token == 28 * (320 + 64) * 2 == 21_504
    assert p.activation_reserve_bytes == 2_551_185_408  # MLP intermediates dominate, as for the GQA model
    assert p.kv_budget_bytes == BUDGET - 2 * 7_795_327_232 - 2_551_185_408 == 43_705_689_190
    assert p.num_blocks == 43_705_689_190 // (128 * 21_504) == 15_878
    assert p.max_concurrency == 15_878 * 128 / 4096 == 496.1875
    assert p.max_concurrency / _plan(Q7).max_concurrency == pytest.approx(496.1875 / 187.59375)
    assert round(496.1875 / 187.59375, 3) == 2.645


def test_qwen2_5_14b_gqa_and_mla_by_hand():
    g, m = _plan(Q14), _plan(Q14_MLA)
    attn_g = 5120 * 5120 + 5120 + 2 * (5120 * 1024 + 1024) + 5120 * 5120
    mlp = 3 * 5120 * 13824
    assert g.num_params == 152_064 * 5120 * 2 + 48 * (attn_g + mlp + 2 * 5120) + 5120 == 14_770_033_664
    assert g.kv_bytes_per_token == 48 * 2 * 8 * 128 * 2 == 196_608
    reserve = 8192 * (4 * 5120 + 3 * 13824) * 2 + LOGITS + RUNTIME
    assert g.activation_reserve_bytes == reserve == 2_400_190_464
    assert g.kv_budget_bytes == BUDGET - 2 * 14_770_033_664 - reserve == 29_907_271_270
    assert g.num_blocks == 29_907_271_270 // (128 * 196_608) == 1188
    assert g.max_concurrency == 1188 * 128 / 4096 == 37.125

    attn_m = 5120 * 40 * 192 + 5120 * 800 + 736 + 736 * 40 * 256 + 5120 * 5120
    assert m.num_params == 152_064 * 5120 * 2 + 48 * (attn_m + mlp + 2 * 5120) + 5120 == 15_453_920_768
    assert m.kv_bytes_per_token == 48 * (736 + 64) * 2 == 76_800
    assert m.kv_budget_bytes == BUDGET - 2 * 15_453_920_768 - reserve == 28_539_497_062
    assert m.num_blocks == 28_539_497_062 // (128 * 76_800) == 2903
    assert m.max_concurrency == 2903 * 128 / 4096 == 90.71875
    assert round(90.71875 / 37.125, 3) == 2.444


def test_shipped_mla_configs_are_the_contracts_conversions():
    for src, dst, r in ((Q7, Q7_MLA, 320), (Q14, Q14_MLA, 736)):
        with open(os.path.join(dst, "config.json")) as f:
            shipped = json.load(f)
        assert shipped == mla_config(P.read_config_file(src), r, 64)  # the contract's stock export, bf16
        assert shipped["model_type"] == "deepseek_v3" and shipped["architectures"] == ["DeepseekV3ForCausalLM"]
        assert shipped["num_key_value_heads"] == shipped["num_attention_heads"]
        assert shipped["first_k_dense_replace"] == shipped["num_hidden_layers"] and shipped["n_routed_experts"] is None
        assert (shipped["qk_nope_head_dim"], shipped["v_head_dim"], shipped["qk_rope_head_dim"]) == (128, 128, 64)
        assert shipped["q_lora_rank"] is None and shipped["rope_interleave"] is True
        planned = P.mla_shape_from_source(P.load_model_shape(src), r, 64)
        loaded = P.load_model_shape(dst)
        assert dataclasses.replace(planned, name="") == dataclasses.replace(loaded, name="")


def test_rank_search_reproduces_the_shipped_ranks():
    c7 = P.rank_for_ratio(P.load_model_shape(Q7), 2.69)
    assert (c7.kv_lora_rank, round(c7.ratio, 3)) == (320, 2.645)
    assert [n["kv_lora_rank"] for n in c7.neighbours(1)] == [304, 320, 336]
    assert c7.neighbours(1)[0]["ratio"] > 2.69 > c7.ratio  # 2.69 lies between r=304 and r=320
    c14 = P.rank_for_ratio(P.load_model_shape(Q14), 2.43)
    assert (c14.kv_lora_rank, round(c14.ratio, 3)) == (736, 2.444)
    # "reach": the largest rank whose gain is still >= the target
    assert P.rank_for_ratio(P.load_model_shape(Q7), 2.69, mode="reach").kv_lora_rank == 304
    assert P.rank_for_ratio(P.load_model_shape(Q14), 2.43, mode="reach").kv_lora_rank == 736
    assert P.rank_for_ratio(P.load_model_shape(Q7), 2.69, multiple=2).kv_lora_rank == 314


def test_mla_shape_from_source_defaults_and_limits():
    src = P.load_model_shape(Q7)
    m = P.mla_shape_from_source(src, 512)
    assert (m.qk_rope_head_dim, m.qk_nope_head_dim, m.v_head_dim, m.num_key_value_heads) == (64, 128, 128, 28)
    assert P.kv_bytes_per_token(m) == 28 * (512 + 64) * 2 == 32_256
    with pytest.raises(YouzhiError, match="960"):
        P.mla_shape_from_source(src, 961)  # joint K/V latent of 7B is 2*4*128 - 64 = 960 wide
    with pytest.raises(YouzhiError, match="already MLA"):
        P.mla_shape_from_source(m, 256)


def _llama(heads=32, kv=8, layers=32, hidden=4096, **kw):
    cfg = dict(model_type="llama", num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
               num_key_value_heads=kv, intermediate_size=14336, vocab_size=128256)
    cfg.update(kw)
    return P.shape_from_config(cfg, "llama")


def test_deployment_warnings():
    st = P.PlanSettings()
    ok = P.mla_shape_from_source(_llama(), 512, 64)  # 32 heads, 512 + 64: every kernel is happy
    assert P.deployment_warnings(ok, st) == []
    odd = P.mla_shape_from_source(_llama(), 500, 64)
    w = P.deployment_warnings(odd, st)
    assert any("multiple of 16" in x for x in w) and any("576" in x for x in w) and len(w) == 2
    w7 = _plan(Q7_MLA).warnings
    assert len(w7) == 3 and any("{32, 64, 128}" in x and "28" in x for x in w7) and any("= 384" in x for x in w7)
    assert any("28 heads run as 32" in x for x in w7)
    assert not any("multiple of 16" in x for x in w7)
    biased = dataclasses.replace(ok, qkv_bias=True)
    assert any("attention_bias" in x for x in P.deployment_warnings(biased, st))
    # GQA models get no MLA warnings; fit warnings apply to every model
    assert _plan(Q14).warnings == []
    small = _plan(Q14, device_memory_gib=16)
    assert small.num_blocks == 0 and small.max_concurrency == 0
    assert any(x.startswith("does not fit:") for x in small.warnings)
    long = _plan(Q14, max_model_len=200_000)
    assert any("does not fit one 200000-token request" in x for x in long.warnings)
    assert any("max_position_embeddings" in x for x in long.warnings)


def test_config_parsing_variants(tmp_path):
    # head_dim defaults to hidden / heads; Mistral has no bias; Llama's attention_bias covers o_proj too
    m = P.shape_from_config(dict(model_type="mistral", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128, vocab_size=100, head_dim=None))
    assert m.head_dim == 16 and not m.qkv_bias and not m.o_bias
    lb = _llama(heads=4, kv=2, layers=1, hidden=64, attention_bias=True, tie_word_embeddings=True)
    lnb = _llama(heads=4, kv=2, layers=1, hidden=64, tie_word_embeddings=True)
    assert lb.num_params() - lnb.num_params() == 64 + 2 * 32 + 64  # q, k, v, o biases
    assert lnb.num_params() == 128256 * 64 + (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 14336 + 2 * 64) + 64
    # yaml: MindFormers-style model.model_config with legacy key names
    y = tmp_path / "run.yaml"
    y.write_text("model:\n  model_config:\n    type: LlamaConfig\n    num_layers: 2\n    hidden_size: 64\n"
                 "    num_heads: 4\n    n_kv_heads: 2\n    intermediate_size: 128\n    vocab_size: 100\n")
    s = P.load_model_shape(str(y))
    assert (s.model_type, s.num_hidden_layers, s.num_key_value_heads, s.name) == ("llama", 2, 2, "run")
    # a config.json path works like its directory
    assert P.load_model_shape(os.path.join(Q7, "config.json")) == P.load_model_shape(Q7)


@pytest.mark.parametrize("cfg, match", [
    (dict(model_type="mixtral", num_local_experts=8), "mixture-of-experts"),
    (dict(model_type="deepseek_v3", n_routed_experts=256, first_k_dense_replace=3, num_hidden_layers=61,
          hidden_size=7168, num_attention_heads=128, intermediate_size=18432, vocab_size=129280,
          kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128), "mixture-of-experts"),
    (dict(model_type="gpt2"), "unsupported model_type 'gpt2'"),
    (dict(model_type="qwen2", hidden_size=64), "no 'num_hidden_layers'"),
])
def test_bad_configs_raise(cfg, match):
    with pytest.raises(YouzhiError, match=match):
        P.shape_from_config(cfg)


def _run(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def test_cli_json_and_table(tmp_path):
    out = tmp_path / "sub" / "plan.json"
    r = _run("--model", Q7, "--compare", Q7_MLA, "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "max concurrency @4096" in r.stdout and "2.645x" in r.stdout and "warning [qwen2_5_7b_mla_r320]" in r.stdout
    data = json.loads(out.read_text())
    assert set(data) >= {"settings", "models", "ratio"}
    for m in data["models"]:
        assert {"name", "kv_bytes_per_token", "max_concurrency", "num_blocks", "weight_bytes", "kv_budget_bytes",
                "activation_reserve_bytes", "ratio", "warnings"} <= set(m)
    assert [m["kv_bytes_per_token"] for m in data["models"]] == [57_344, 21_504]
    assert [m["max_concurrency"] for m in data["models"]] == [187.59375, 496.1875]
    assert data["ratio"] == pytest.approx(496.1875 / 187.59375)


def test_cli_target_ratio_and_hypothetical(tmp_path):
    out = tmp_path / "plan.json"
    r = _run("--model", Q14, "--target-ratio", "2.43", "--json", str(out),
             "--write-mla-config", str(tmp_path / "mla"))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["rank_search"]["kv_lora_rank"] == 736 and data["models"][1]["name"] == "qwen2_5_14b_mla_r736"
    with open(os.path.join(Q14_MLA, "config.json")) as f:
        assert json.loads((tmp_path / "mla" / "config.json").read_text()) == json.load(f)
    r = _run("--model", Q7, "--kv-lora-rank", "512", "--qk-rope-dim", "64")
    assert r.returncode == 0, r.stderr
    assert "32,256" in r.stdout and "qwen2_5_7b_mla_r512" in r.stdout
    assert _run("--help").returncode == 0


def test_cli_no_mla_warnings_keeps_the_fit_warnings(tmp_path):
    """--no-mla-warnings (the quickstart: its conversion printed them) drops exactly the MLA deployment limits; the
    warnings about fitting the card still print, and --json keeps everything."""
    out = tmp_path / "plan.json"
    args = ["--model", Q7, "--kv-lora-rank", "500", "--qk-rope-dim", "64", "--max-model-len", "200000"]
    full, quiet = _run(*args), _run(*args, "--no-mla-warnings", "--json", str(out))
    assert full.returncode == quiet.returncode == 0, full.stderr + quiet.stderr
    full_w = [ln for ln in full.stdout.splitlines() if ln.startswith("warning [")]
    quiet_w = [ln for ln in quiet.stdout.splitlines() if ln.startswith("warning [")]
    mla = [w for w in full_w if "vLLM" in w]  # 28 heads (graph mode; padded to 32), 500 % 16, 500 + 64 not 320 / 576
    assert len(mla) == 4 and quiet_w == [w for w in full_w if w not in mla]
    assert any("max_model_len 200000 exceeds" in w for w in quiet_w)
    assert len(json.loads(out.read_text())["models"][1]["warnings"]) == len(
        [w for w in full_w if w.startswith("warning [qwen2_5_7b_mla_r500]")])


@pytest.mark.parametrize("kind", ["moe", "missing", "unknown", "badrank", "yaml_bomb"])
def test_cli_bad_input_one_error_line(tmp_path, kind):
    d = tmp_path / "m"
    d.mkdir()
    if kind == "moe":
        (d / "config.json").write_text(json.dumps({"model_type": "qwen2_moe", "num_experts": 60}))
        args = ["--model", str(d)]
    elif kind == "missing":
        args = ["--model", str(tmp_path / "nope")]
    elif kind == "unknown":
        (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
        args = ["--model", str(d)]
    elif kind == "yaml_bomb":  # nested aliases: each level repeats the one before 9 times (a "billion laughs")
        levels = ['l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
        levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 13)]
        (tmp_path / "bomb.yaml").write_text("\n".join(levels) + "\n")
        args = ["--model", str(tmp_path / "bomb.yaml")]
    else:
        args = ["--model", Q7, "--kv-lora-rank", "4096"]
    r = _run(*args)
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    if kind == "yaml_bomb":
        assert "alias references" in lines[0] and len(lines[0]) < 400, lines[0]


def test_param_counts_match_transformers():
    import torch
    import transformers
    for path in (Q7, Q7_MLA, Q14, Q14_MLA):
        cfg = P.read_config_file(path)
        conf = transformers.AutoConfig.for_model(cfg["model_type"],
                                                 **{k: v for k, v in cfg.items() if k != "model_type"})
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(conf)
        assert sum(t.numel() for t in model.parameters()) == P.load_model_shape(path).num_params()
