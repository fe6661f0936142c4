"""MindIR export: the exported prefill/decode graphs reproduce the eager model (logits, greedy generation), the decode
graph's state is exactly the KV cache (MLA: the latent c_kv and k_pe only), and the CLI round trip works."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from youzhi_ms.runtime import init_context

init_context("graph")

from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from youzhi_ms.checkpoint.mindspore_ckpt import load_model  # noqa: E402
from youzhi_ms.errors import YouzhiError  # noqa: E402
from youzhi_ms.infer.generate import EagerRunner, cache_shapes, decode_state, generate  # noqa: E402
from youzhi_ms.infer.mindir import MindIRRunner, export_mindir  # noqa: E402

from helpers import ROOT, calib, randomize, rel_err  # noqa: E402

V = 128
T = 48


def make_llama(path, write_word_tokenizer):
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True)
    randomize(LlamaForCausalLM(cfg), 0).save_pretrained(path)
    write_word_tokenizer(path, V)  # enough for tools/generate.py on a tiny random model


def make_dsv3(path):
    cfg = DeepseekV3Config(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=24, q_lora_rank=None,
                           qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=None,
                           first_k_dense_replace=2, max_position_embeddings=128, rope_interleave=True)
    randomize(DeepseekV3ForCausalLM(cfg), 1).save_pretrained(path)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, write_word_tokenizer):
    base = tmp_path_factory.mktemp("mindir_models")
    dirs = {"gqa": str(base / "llama"), "mla": str(base / "dsv3"), "mla-converted": str(base / "converted")}
    make_llama(dirs["gqa"], write_word_tokenizer)
    make_dsv3(dirs["mla"])
    from youzhi_ms.convert.pipeline import ConvertOptions, convert
    convert(dirs["gqa"], dirs["mla-converted"], ConvertOptions(kv_lora_rank=40, qk_rope_dim=8, freqfold="2",
                                                               calib_ids=calib(0, 8, 64, V), progress=False))
    return dirs


@pytest.mark.parametrize("variant,batch", [("gqa", 1), ("mla", 1), ("mla-converted", 2)])
def test_mindir_matches_eager(variant, batch, model_dirs, tmp_path):
    src = model_dirs[variant]
    out = str(tmp_path / "export")
    man = export_mindir(src, out, batch=batch, max_seq_len=T, log=lambda *_: None)
    model, cfg = load_model(src)
    if variant == "mla-converted":
        assert not cfg.kv_layernorm  # the exact export has no latent norm
    eager, runner = EagerRunner(model, cfg), MindIRRunner(out)
    assert runner.tokenizer_dir == os.path.abspath(out)

    # the decode graph's state tensors are exactly the cache shapes (MLA: latent c_kv and k_pe, nothing per head)
    dec = man["graphs"]["decode"]
    state = {io["name"]: io["shape"] for io in dec["inputs"][2:]}
    L = cfg.num_layers
    if variant == "gqa":
        want = {"k_cache": [L, batch, cfg.num_kv_heads, T, cfg.head_dim],
                "v_cache": [L, batch, cfg.num_kv_heads, T, cfg.head_dim]}
        per_tok = L * 2 * cfg.num_kv_heads * cfg.head_dim
    else:
        want = {"c_kv": [L, batch, T, cfg.kv_lora_rank], "k_pe": [L, batch, T, cfg.qk_rope_head_dim]}
        per_tok = L * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert state == want
    assert [io["shape"] for io in dec["outputs"][1:]] == list(want.values())
    assert man["cache_bytes_per_token"] == {"fp32": 4 * per_tok, "bf16": 2 * per_tok}

    # logits: prefill and several decode steps, MindIR vs eager
    ids = np.random.default_rng(3).integers(1, V, (batch, 12))
    P = 7
    lm, *prefilled = runner.prefill(ids[:, :P])
    le, *prefilled_eager = eager.prefill(ids[:, :P])
    assert lm.shape == (batch, P, V) and rel_err(lm, le) <= 1e-5
    shapes, axis = cache_shapes(cfg, batch, T)
    assert all(c.shape[axis] == P and tuple(c.shape[:axis]) == tuple(s[:axis]) for c, s in zip(prefilled, shapes))
    caches, caches_eager = decode_state(runner, prefilled, batch, T), decode_state(eager, prefilled_eager, batch, T)
    for p in range(P, ids.shape[1]):
        pos = np.full(batch, p)
        l1, *caches = runner.decode(ids[:, p:p + 1], pos, *caches)
        l2, *caches_eager = eager.decode(ids[:, p:p + 1], pos, *caches_eager)
        assert l1.shape == (batch, 1, V) and rel_err(l1, l2) <= 1e-5, p
        assert [list(c.shape) for c in caches] == list(want.values())

    # greedy generation is token-identical (runner batch padding and cache length adaptation included)
    prompt = [int(i) for i in ids[0, :5]]
    g_eager = generate(eager, prompt, max_new_tokens=20)
    g_mindir = generate(runner, prompt, max_new_tokens=20)
    assert g_mindir == g_eager and len(g_eager) == 20


def test_cli_export_and_generate(model_dirs, tmp_path):
    out = str(tmp_path / "export")
    env = dict(os.environ, GLOG_v="3")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export_mindir.py"), "--model", model_dirs["gqa"],
                        "--output-dir", out, "--max-seq-len", "64", "--verify"], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout[r.stdout.index("{\n"):])
    assert summary["decode_state"]["k_cache"] == [2, 1, 2, 64, 16]
    assert max(summary["verify"].values()) < 1e-5
    for f in ("prefill.mindir", "decode.mindir", "manifest.json", "config.json", "tokenizer.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    js = str(tmp_path / "gen.json")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"), "--mindir", out, "--prompt",
                        "w5 w17 w33 w2", "--max-new-tokens", "10", "--json", js], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(js) as f:
        res = json.load(f)
    assert res["prompt_ids"] == [5, 17, 33, 2]
    model, cfg = load_model(model_dirs["gqa"])
    assert res["output_ids"] == generate(EagerRunner(model, cfg), [5, 17, 33, 2], max_new_tokens=10,
                                         stop_ids=[0])


def test_bad_inputs(model_dirs, tmp_path):
    with pytest.raises(YouzhiError, match="manifest.json"):
        MindIRRunner(model_dirs["gqa"])
    with pytest.raises(YouzhiError, match="max_position_embeddings"):
        export_mindir(model_dirs["gqa"], str(tmp_path / "x"), max_seq_len=4096, log=lambda *_: None)
    assert not os.path.exists(tmp_path / "x")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"), "--mindir", str(tmp_path / "no"),
                        "--prompt", "w1"], capture_output=True, text=True, env=dict(os.environ, GLOG_v="3"))
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
