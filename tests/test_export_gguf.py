"""tools/export_gguf.py: the GGUF our writer produces runs in stock llama.cpp (llama-cpp-python's build) as the
Hugging Face model runs in transformers: greedy tokens identical and logits to float tolerance (f32 weights, f32 KV
cache), for a tiny DeepSeek-V3 (MLA, deepseek2 with its latent cache), a tiny conversion by the project's converter
(--export deepseek), a tiny Qwen2 with q/k/v biases and a tiny Llama; tokenization identical to the tokenizers library;
what GGUF cannot hold is refused with one error line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from youzhi_ms import contract as C
from youzhi_ms.checkpoint.gguf_writer import export_gguf, tokenizer_pre
from youzhi_ms.errors import YouzhiError
from youzhi_ms.infer import llamacpp  # our own module: an import error is a failure, never a skip

from helpers import ROOT, one_error_line, randomize

try:
    llamacpp.lib()
except YouzhiError as exc:  # the engine is part of the test extra: its absence is a failure, not a skip
    pytest.fail(str(exc), pytrace=False)

TOOL = os.path.join(ROOT, "tools", "export_gguf.py")
V = 384
TEXT = ("The cache of 2048 tokens holds 12 layers. Attention reads keys and values; the latent is shared by 9 heads. "
        "Numbers 31415 and 2.718 split into digits. ") * 4
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, rms_norm_eps=1e-6)
PROMPT = [5, 77, 301, 12, 250, 9, 140, 33]
N_NEW = 12


def write_bpe_tokenizer(path: str) -> None:
    """A byte-level BPE trained on TEXT (SmolLM2's pre-tokenizer: digits one by one, then byte-level), V tokens with
    <|endoftext|> as 0, and a tokenizer_config.json with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT] * 8, trainers.BpeTrainer(
        vocab_size=V - 40, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "add_bos_token": False,
                   "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}, f)


def save(model, path) -> str:
    model.save_pretrained(path)
    write_bpe_tokenizer(str(path))
    return str(path)


def hf_greedy(model, prompt, n_new):
    """transformers' greedy continuation and the logits of every position (float64)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new,
                             pad_token_id=0, eos_token_id=None)
        seq = out[0].tolist()
        logits = model(out[:, :-1]).logits[0].double().numpy()
    return seq[len(prompt):], logits


def run_llamacpp(gguf_path, prompt, n_new, type_kv="f32"):
    with llamacpp.Engine(gguf_path, n_ctx=256, type_kv=type_kv, flash_attn=False) as eng:
        toks, logits = eng.greedy(prompt, n_new)
        return toks, logits.astype(np.float64), eng.kv


def assert_same(hf_model, gguf_path, tol=1e-4, prompt=PROMPT):
    want, ref = hf_greedy(hf_model, prompt, N_NEW)
    got, logits, kv = run_llamacpp(gguf_path, prompt, N_NEW)
    assert got == want
    err = np.abs(logits - ref).max() / np.abs(ref).max()
    assert err < tol, err
    return kv


def tiny_deepseek(tmp_path):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    src = dict(model_type="llama", num_key_value_heads=2, head_dim=16, **SMALL)
    cfg = C.mla_config(src, kv_lora_rank=24, qk_rope_head_dim=8, torch_dtype="float32")
    model = randomize(DeepseekV3ForCausalLM(DeepseekV3Config(**cfg)), seed=1)
    return model, save(model, tmp_path / "dsv3")


def test_tiny_deepseek_v3_runs_in_llamacpp_with_the_latent_cache(tmp_path):
    model, d = tiny_deepseek(tmp_path)
    assert all(type(layer.mlp).__name__ == "DeepseekV3MLP" for layer in model.model.layers)  # dense, as configured
    out = str(tmp_path / "dsv3.gguf")
    s = export_gguf(d, out, "f32", progress=False)
    assert s["arch"] == "deepseek2" and s["pre_tokenizer"] == "smollm"
    kv = assert_same(model, out)
    # the engine's own allocation: one (r + rope) = 32-wide K row per layer and token, no V (MLA latent cache)
    assert (kv.type_k, kv.layers, kv.v_mib) == ("f32", 2, 0.0)
    assert kv.k_mib == pytest.approx(kv.total_cells * 2 * (24 + 8) * 4 / 2 ** 20, abs=0.005)  # the log's 0.01 MiB


def test_tiny_conversion_export_deepseek_runs_in_llamacpp(tmp_path):
    """The converter's stock export of a tiny Llama: transformers and llama.cpp agree on the converted model."""
    from transformers import DeepseekV3ForCausalLM
    from youzhi_ms.convert.pipeline import ConvertOptions, convert
    from helpers import calib, make_source
    make_source("llama", tmp_path / "src", seed=3)
    convert(str(tmp_path / "src"), str(tmp_path / "mla"), ConvertOptions(
        kv_lora_rank=24, qk_rope_dim=8, freqfold="2", export="deepseek", out_dtype="fp32", progress=False,
        calib_ids=calib(0, 4, 32, 128)))
    d = str(tmp_path / "mla")
    write_bpe_tokenizer_for_vocab(d, 128)
    out = str(tmp_path / "mla.gguf")
    export_gguf(d, out, "f32", progress=False)
    model = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert_same(model, out, prompt=[t % 128 for t in PROMPT])


def write_bpe_tokenizer_for_vocab(path: str, vocab_size: int) -> None:
    """A byte-level BPE with exactly `vocab_size` ids for models smaller than the BPE alphabet (one merge: '!!')."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {chr(i + 33): i for i in range(vocab_size - 2)} | {"!!": vocab_size - 2, "<|endoftext|>": vocab_size - 1}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("!", "!")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(path, "tokenizer.json"))


def test_tiny_qwen2_with_biases_runs_in_llamacpp(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    model = randomize(Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=False,
                                                   **SMALL)), seed=2)
    assert model.model.layers[0].self_attn.k_proj.bias is not None
    d = save(model, tmp_path / "qwen2")
    out = str(tmp_path / "qwen2.gguf")
    assert export_gguf(d, out, "f32", progress=False)["arch"] == "qwen2"
    kv = assert_same(model, out)
    # GQA: K and V, 2 heads x 16 each per layer and token (the engine logs 0.01 MiB)
    assert kv.k_mib == kv.v_mib == pytest.approx(kv.total_cells * 2 * 2 * 16 * 4 / 2 ** 20, abs=0.005)


def test_tiny_llama_runs_in_llamacpp_and_tokenizes_alike(tmp_path):
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM
    model = randomize(LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                                                   **SMALL)), seed=4)
    d = save(model, tmp_path / "llama")
    out = str(tmp_path / "llama.gguf")
    assert export_gguf(d, out, "f32", progress=False)["arch"] == "llama"
    assert_same(model, out)
    want = Tokenizer.from_file(os.path.join(d, "tokenizer.json")).encode(TEXT).ids
    with llamacpp.Engine(out, n_ctx=64) as eng:
        assert eng.tokenize(TEXT) == want
    # f16 / q8_0 weights load and stay close (quantisation error only)
    for outtype, tol in (("f16", 2e-3), ("q8_0", 3e-2)):
        q = str(tmp_path / f"llama_{outtype}.gguf")
        export_gguf(d, q, outtype, progress=False)
        _, ref, _ = run_llamacpp(out, PROMPT, 1)
        _, got, _ = run_llamacpp(q, PROMPT, 1)
        assert np.abs(got - ref).max() / np.abs(ref).max() < tol, outtype


def test_what_gguf_cannot_hold_is_refused(tmp_path):
    from youzhi_ms.convert.pipeline import ConvertOptions, convert
    from helpers import calib, make_source
    make_source("qwen2", tmp_path / "src", seed=0)
    convert(str(tmp_path / "src"), str(tmp_path / "exact"), ConvertOptions(
        kv_lora_rank=24, qk_rope_dim=8, freqfold="2", export="exact", out_dtype="fp32", progress=False,
        calib_ids=calib(0, 4, 32, 128)))
    write_bpe_tokenizer_for_vocab(str(tmp_path / "exact"), 128)
    r = subprocess.run([sys.executable, TOOL, "--model", str(tmp_path / "exact"), "--outfile",
                        str(tmp_path / "x.gguf")], capture_output=True, text=True, cwd=ROOT)
    one_error_line(r.returncode, r.stderr, "exact-export MLA model", "--export deepseek")
    assert not os.path.exists(tmp_path / "x.gguf")
    # an existing output is not replaced without --overwrite; a model dir is never an output
    (tmp_path / "taken.gguf").write_bytes(b"mine")
    for args, expect in ((["--outfile", str(tmp_path / "taken.gguf")], "already exists"),
                         (["--outfile", str(tmp_path / "exact" / "m.gguf")], "inside the input")):
        r = subprocess.run([sys.executable, TOOL, "--model", str(tmp_path / "exact"), *args], capture_output=True,
                           text=True, cwd=ROOT)
        one_error_line(r.returncode, r.stderr, expect)
    assert (tmp_path / "taken.gguf").read_bytes() == b"mine"
    with pytest.raises(YouzhiError, match="pre-tokenizer"):
        tokenizer_pre({"type": "Whitespace"})
    assert tokenizer_pre({"type": "ByteLevel", "use_regex": True}) == "gpt-2"


def test_real_smollm2_exports_and_generates_like_transformers(smollm2_hf_dir, tmp_path):
    """The real SmolLM2-135M-Instruct: our llama GGUF (f32) continues a prompt as transformers does, and llama.cpp
    splits text into the same tokens as the tokenizers library."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    out = str(tmp_path / "smollm2.gguf")
    export_gguf(smollm2_hf_dir, out, "f32", progress=False)
    tok = Tokenizer.from_file(os.path.join(smollm2_hf_dir, "tokenizer.json"))
    text = "The capital of France is Paris. In 1889, the Eiffel Tower"
    prompt = tok.encode(text).ids
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    want, ref = hf_greedy(model, prompt, 8)
    got, logits, kv = run_llamacpp(out, prompt, 8)
    assert got == want
    assert np.abs(logits - ref).max() / np.abs(ref).max() < 1e-4
    with llamacpp.Engine(out, n_ctx=64) as eng:
        assert eng.tokenize(text + " 3.14159\n\n  x") == tok.encode(text + " 3.14159\n\n  x").ids


def test_an_environment_without_the_gguf_package_gets_one_error_line(tmp_path):
    """The fresh-clone pipeline once ended its GGUF stage in a ModuleNotFoundError traceback: gguf was only in the test
    extra. It is a runtime dependency now; without it (a --no-deps install) the export names the package and the fix."""
    blocker = tmp_path / "no_gguf"
    blocker.mkdir()
    (blocker / "gguf.py").write_text("raise ImportError('gguf is not installed here')\n")
    env = dict(os.environ, PYTHONPATH=str(blocker))  # found before site-packages: `import gguf` fails
    r = subprocess.run([sys.executable, TOOL, "--model", str(tmp_path), "--outfile", str(tmp_path / "x.gguf")],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    one_error_line(r.returncode, r.stderr, "`gguf` package", "pip install gguf==0.19.0")
    assert not os.path.exists(tmp_path / "x.gguf")
    setup_py = open(os.path.join(ROOT, "setup.py")).read()
    runtime = setup_py[setup_py.index("install_requires"):setup_py.index("extras_require")]
    assert '"gguf==0.19.0"' in runtime
