"""Checkpoint I/O: sharded bf16 reading, HF <-> MindSpore round trip, MindSpore's own loader, and bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import mindspore as ms
from youzhi_ms.runtime import init_context

init_context("graph")

from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config  # noqa: E402

from youzhi_ms.checkpoint.hf import HFCheckpoint  # noqa: E402
from youzhi_ms.checkpoint.mindspore_ckpt import load_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_llama_cfg(**kw):
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture(scope="module")
def sharded_bf16(tmp_path_factory):
    """A bf16 checkpoint saved by transformers in several shards (the independent writer)."""
    d = tmp_path_factory.mktemp("bf16")
    torch.manual_seed(0)
    m = LlamaForCausalLM(tiny_llama_cfg()).to(torch.bfloat16)
    m.save_pretrained(d, max_shard_size="20KB", safe_serialization=True)
    return str(d), {k: v.float().numpy() for k, v in m.state_dict().items()}, m


def run_tool(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)


def test_sharded_bf16_reads_exactly(sharded_bf16):
    d, ref, _ = sharded_bf16
    assert os.path.isfile(os.path.join(d, "model.safetensors.index.json"))
    ck = HFCheckpoint(d)
    assert len({v for v in json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"].values()}) > 1
    for name, arr in ref.items():
        np.testing.assert_array_equal(ck.get(name), arr)
        assert ck.dtype(name) == "BF16"


def test_sharded_bf16_model_matches_transformers(sharded_bf16):
    d, _, m = sharded_bf16
    ids = np.random.default_rng(0).integers(0, 96, (1, 12))
    with torch.no_grad():
        ref = m.float()(torch.tensor(ids)).logits.numpy()
    model, _ = load_model(d)
    out = model(ms.Tensor(ids, ms.int32)).asnumpy()
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4


def test_round_trip_hf_ms_hf_bit_exact(sharded_bf16, tmp_path):
    d, _, _ = sharded_bf16
    ms_dir, back = tmp_path / "ms", tmp_path / "hf"
    r = run_tool("tools/convert_hf_weights.py", "--input-dir", d, "--output-dir", str(ms_dir))
    assert r.returncode == 0, r.stderr
    names = HFCheckpoint(str(ms_dir)).names()
    assert "decoder.layers.0.self_attention.linear_q.weight" in names
    assert "embedding.word_embeddings.weight" in names and "output_layer.weight" in names
    r = run_tool("tools/convert_hf_weights.py", "--input-dir", str(ms_dir), "--output-dir", str(back), "--reverse")
    assert r.returncode == 0, r.stderr
    a, b = HFCheckpoint(d), HFCheckpoint(str(back))
    assert sorted(a.names()) == sorted(b.names())
    for n in a.names():
        assert a.dtype(n) == b.dtype(n)
        assert a.raw(n).tobytes() == b.raw(n).tobytes(), n


def test_streaming_writer_shards_read_by_safetensors(sharded_bf16, tmp_path):
    """ShardedWriter streams tensors to disk (stored bytes copied in chunks, or re-encoded block by block); the
    shards it writes are read back by the `safetensors` library (the independent reader) bit for bit."""
    from safetensors.numpy import load_file
    from youzhi_ms.checkpoint.hf import ShardedWriter
    d, ref, _ = sharded_bf16
    ck = HFCheckpoint(d)
    for dtype in ("bf16", "fp32"):
        out = tmp_path / dtype
        out.mkdir()
        w = ShardedWriter(str(out), dtype=dtype, max_shard_bytes=6000)
        w.CHUNK = 100  # many chunks per tensor
        names = sorted(ck.names())
        for n in names:
            if dtype == "bf16":
                w.add_file_range(n, ck.dtype(n), ck.shape(n), *ck.file_range(n))
            else:
                w.add_blocks(n, ck.shape(n), ck.row_blocks(n, block_bytes=64))
        w.add("extra.weight", np.arange(6, dtype=np.float32).reshape(2, 3))
        w.close()
        index = json.load(open(out / "model.safetensors.index.json"))["weight_map"]
        header_dtypes = set()
        for f in set(index.values()):
            shard = HFCheckpoint.from_file(str(out / f))
            header_dtypes |= {shard.dtype(n) for n in shard.names() if n != "extra.weight"}
        assert header_dtypes == {"BF16" if dtype == "bf16" else "F32"}
        assert len(set(index.values())) > 2 and sorted(index) == sorted(names + ["extra.weight"])
        got = {}
        for f in set(index.values()):
            got.update(load_file(str(out / f)))
        assert not [p for p in os.listdir(out) if p.endswith((".part", ".body"))]
        for n in names:
            # the source values are bf16-exact, so both output dtypes must hold them exactly
            np.testing.assert_array_equal(np.asarray(got[n], np.float32), ref[n])
            assert got[n].shape == tuple(ck.shape(n))
        np.testing.assert_array_equal(got["extra.weight"].astype(np.float32), np.arange(6).reshape(2, 3))


def test_mindspore_loader_reads_our_ms_checkpoint(sharded_bf16, tmp_path):
    """The MindSpore-layout output is a checkpoint MindSpore itself loads into our model by parameter name."""
    d, _, _ = sharded_bf16
    ms_dir = tmp_path / "ms32"
    assert run_tool("tools/convert_hf_weights.py", "--input-dir", d, "--output-dir", str(ms_dir),
                    "--dtype", "fp32").returncode == 0
    model, _ = load_model(d)
    files = [f for f in os.listdir(ms_dir) if f.endswith(".safetensors")]
    loaded = {}
    for f in files:
        loaded.update(ms.load_checkpoint(str(ms_dir / f), format="safetensors"))
    params = {p.name: p for p in model.get_parameters()}
    assert set(params) == set(loaded)
    for n, p in params.items():
        np.testing.assert_array_equal(loaded[n].asnumpy(), p.asnumpy())
    # and our loader reads the MindSpore layout directly
    model2, _ = load_model(str(ms_dir))
    ids = ms.Tensor(np.arange(10).reshape(1, 10), ms.int32)
    np.testing.assert_array_equal(model2(ids).asnumpy(), model(ids).asnumpy())


def _one_error_line(r):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_missing_shard_is_refused_without_output(sharded_bf16, tmp_path):
    d, _, _ = sharded_bf16
    broken = tmp_path / "broken"
    os.makedirs(broken)
    shards = sorted(f for f in os.listdir(d) if "-of-" in f)
    for f in os.listdir(d):
        if f != shards[1]:  # drop the second shard
            os.link(os.path.join(d, f), broken / f)
    out = tmp_path / "out"
    msg = _one_error_line(run_tool("tools/convert_hf_weights.py", "--input-dir", str(broken), "--output-dir", str(out)))
    assert "missing" in msg and "shard" in msg
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def test_wrong_shape_is_refused(tmp_path, write_word_tokenizer):
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_cfg()).save_pretrained(tmp_path)
    write_word_tokenizer(str(tmp_path), 96)  # eval_ppl reads the text before the weights
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["intermediate_size"] = 64  # weights say 48
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    r = run_tool("tools/eval_ppl.py", "--model", str(tmp_path), "--text", os.path.join(ROOT, "setup.py"),
                 "--seq-len", "16")
    msg = _one_error_line(r)
    assert "shape" in msg and "gate_proj" in msg


def test_seq_len_beyond_the_models_context_is_refused(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_cfg()).save_pretrained(tmp_path)  # max_position_embeddings 64
    r = run_tool("tools/eval_ppl.py", "--model", str(tmp_path), "--text", os.path.join(ROOT, "setup.py"),
                 "--seq-len", "128")
    msg = _one_error_line(r)
    assert "--seq-len 128 exceeds the model's max_position_embeddings 64" in msg


@pytest.mark.parametrize("kind", ["qwen3", "moe", "gpt2"])
def test_unsupported_architecture_is_refused(kind, tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_cfg()).save_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    if kind == "qwen3":
        cfg.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
        expect = "q/k RMSNorm"
    elif kind == "moe":
        cfg.update(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=8)
        expect = "mixture-of-experts"
    else:
        cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
        expect = "unsupported model_type 'gpt2'"
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    out = tmp_path.parent / (tmp_path.name + "_out")
    msg = _one_error_line(run_tool("tools/convert_hf_weights.py", "--input-dir", str(tmp_path),
                                   "--output-dir", str(out)))
    assert expect in msg
    assert not out.exists()


def test_qwen2_config_flags():
    from youzhi_ms.config import SourceConfig
    c = SourceConfig.from_hf(Qwen2Config(num_hidden_layers=1).to_dict())
    assert c.qkv_bias and not c.o_bias and c.arch == "qwen2"
