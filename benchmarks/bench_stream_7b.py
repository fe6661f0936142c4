#!/usr/bin/env python
"""Streaming conversion of a Qwen2.5-7B-shaped checkpoint on a CPU box: peak memory and time.

Writes a random bf16 checkpoint with Qwen2.5-7B's shapes (28 layers, hidden 3584, 28 q / 4 kv heads, head 128,
q/k/v bias, SwiGLU 18944, vocab 152064, untied) as ~2 GB shards plus a byte-level tokenizer, then runs
tools/convert_gqa_to_mla.py on it in a child process with a short calibration and reports the child's wall time and
peak RSS (getrusage of the child). The conversion keeps one layer's weights in memory at a time.

  python benchmarks/bench_stream_7b.py --work /path/with/60GB --freqfold 4 --out benchmarks/results/stream_7b.json
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from youzhi_ms.checkpoint.hf import ShardedWriter, f32_to_bf16, write_json  # noqa: E402

CFG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
       "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
       "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
       "hidden_act": "silu", "torch_dtype": "bfloat16", "use_sliding_window": False, "eos_token_id": 256,
       "bos_token_id": 256}


def write_random_checkpoint(path, seed=0):
    rng = np.random.default_rng(seed)
    D, I, H, kv, d, V = 3584, 18944, 28, 4, 128, 152064

    def rnd(*shape, std=0.02):
        return f32_to_bf16(rng.standard_normal(shape, dtype=np.float32) * std)

    os.makedirs(path, exist_ok=True)
    w = ShardedWriter(path, dtype="bf16", max_shard_bytes=2 << 30)
    w.add("model.embed_tokens.weight", rnd(V, D), raw_dtype="BF16")
    for i in range(CFG["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for n, shape in (("self_attn.q_proj.weight", (H * d, D)), ("self_attn.k_proj.weight", (kv * d, D)),
                         ("self_attn.v_proj.weight", (kv * d, D)), ("self_attn.o_proj.weight", (D, H * d)),
                         ("mlp.gate_proj.weight", (I, D)), ("mlp.up_proj.weight", (I, D)),
                         ("mlp.down_proj.weight", (D, I))):
            w.add(p + n, rnd(*shape), raw_dtype="BF16")
        for n, size in (("self_attn.q_proj.bias", H * d), ("self_attn.k_proj.bias", kv * d),
                        ("self_attn.v_proj.bias", kv * d)):
            w.add(p + n, rnd(size, std=0.1), raw_dtype="BF16")
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            w.add(p + n, f32_to_bf16(np.ones(D, np.float32)), raw_dtype="BF16")
    w.add("model.norm.weight", f32_to_bf16(np.ones(D, np.float32)), raw_dtype="BF16")
    w.add("lm_head.weight", rnd(V, D), raw_dtype="BF16")
    w.close()
    write_json(os.path.join(path, "config.json"), CFG)
    # a byte-level tokenizer so the CLI's text calibration path is exercised (ids < 257 exist in the vocabulary)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    vocab = {c: i for i, c in enumerate(ByteLevel.alphabet())}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(os.path.join(path, "tokenizer.json"))
    write_json(os.path.join(path, "tokenizer_config.json"), {"eos_token": "<|endoftext|>"})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="output/bench_stream_7b")
    ap.add_argument("--freqfold", default="4")
    ap.add_argument("--kv-lora-rank", type=int, default=320)
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--out", default="benchmarks/results/stream_7b.json")
    ap.add_argument("--keep", action="store_true", help="keep the random source and the converted output")
    args = ap.parse_args()
    src, dst = os.path.join(args.work, "qwen2_5_7b_random"), os.path.join(args.work, "qwen2_5_7b_mla")
    t0 = time.time()
    if not os.path.isfile(os.path.join(src, "config.json")):
        write_random_checkpoint(src)
    t_write = time.time() - t0
    cmd = [sys.executable, os.path.join(ROOT, "tools/convert_gqa_to_mla.py"), "--hf-dir", src, "--output-dir", dst,
           "--kv-lora-rank", str(args.kv_lora_rank), "--qk-rope-dim", "64", "--freqfold", args.freqfold,
           "--calib-text", "wiki-calib", "--calib-tokens", str(args.calib_tokens), "--proxy-seqs", "1",
           "--out-dtype", "bf16", "--quiet"]
    t1 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t1
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2
    if r.returncode != 0:
        print(r.stderr[-3000:])
        sys.exit(1)
    rep = json.load(open(os.path.join(dst, "conversion_report.json")))
    res = {"shape": "Qwen2.5-7B (random bf16)", "kv_lora_rank": args.kv_lora_rank, "qk_rope_dim": 64,
           "freqfold": args.freqfold, "calib_tokens": args.calib_tokens, "write_source_seconds": round(t_write, 1),
           "convert_wall_seconds": round(wall, 1), "peak_rss_gb": round(peak_gb, 2),
           "cache_ratio": rep["cache_ratio"], "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores",
           "command": " ".join(cmd[1:])}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    json.dump(res, open(args.out, "w"), indent=1)
    print("| shape | rank | freqfold | calib tokens | convert wall s | peak RSS GB |\n|---|---|---|---|---|---|")
    print(f"| {res['shape']} | {args.kv_lora_rank}+64 | {args.freqfold} | {args.calib_tokens} | {res['convert_wall_seconds']}"
          f" | {res['peak_rss_gb']} |")
    if not args.keep:
        import shutil
        shutil.rmtree(dst, ignore_errors=True)


if __name__ == "__main__":
    main()
