#!/usr/bin/env python
"""Streaming conversion of a Qwen2.5-7B-shaped checkpoint on a CPU box: peak memory and time.

Writes a random bf16 checkpoint with Qwen2.5-7B's shapes (28 layers, hidden 3584, 28 q / 4 kv heads, head 128,
q/k/v bias, SwiGLU 18944, vocab 152064, untied) as ~2 GB shards plus a byte-level tokenizer, then runs
tools/convert_gqa_to_mla.py on it in a child process with a short calibration and reports the child's wall time and
peak RSS. The conversion keeps one layer's weights in memory at a time and writes the output one tensor at a time.

Peak RSS is the conversion process's own: the random source is written by a separate child, and the conversion's
getrusage comes from wait4 on its pid (Linux carries the forking parent's high-water mark into a vfork+exec child's
ru_maxrss, so a parent that had just generated 15 GB of weights would inflate it). VmHWM polled from /proc is recorded
as a cross-check.

  python benchmarks/bench_stream_7b.py --work /path/with/60GB --freqfold 4 --out benchmarks/results/stream_7b.json

--shape 14b writes Qwen2.5-14B's shapes instead (48 layers, hidden 5120, 40 q / 8 kv heads, head 128, SwiGLU 13824),
for a per-layer time estimate from a few layers (--layers).
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
SHAPES = {"7b": dict(CFG), "14b": dict(CFG, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                                       num_attention_heads=40, num_key_value_heads=8)}


def write_random_checkpoint(path, layers=28, seed=0, shape="7b"):
    cfg = dict(SHAPES[shape], num_hidden_layers=layers)
    rng = np.random.default_rng(seed)
    D, I, H, kv = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"))
    d, V = 128, cfg["vocab_size"]

    def rnd(*shape, std=0.02):
        # random signs and log-uniform magnitudes in [2^-15, 4*std], drawn directly as bf16 bit patterns: a 7B
        # checkpoint in minutes instead of a quarter of an hour through float32 normals
        hi = int(f32_to_bf16(np.array([4 * std], np.float32))[0])
        lo = 0x3800  # 2^-15
        x = rng.integers(0, 2 * (hi - lo), size=shape, dtype=np.uint16)
        sign = (x >= hi - lo).astype(np.uint16) << 15
        x %= hi - lo
        x += lo
        return x | sign

    os.makedirs(path, exist_ok=True)
    w = ShardedWriter(path, dtype="bf16", max_shard_bytes=2 << 30)
    w.add("model.embed_tokens.weight", rnd(V, D), raw_dtype="BF16")
    for i in range(layers):
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
    write_json(os.path.join(path, "config.json"), cfg)
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


def tree_pss_kb(pid):
    """Proportional set size of a process and its children (the FreqFold search's forked workers share the parent's
    pages copy-on-write: Pss counts a shared page once in all, where summed RSS would count it per process)."""
    total = 0
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        kids = []
    for p in [pid] + kids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for ln in f:
                    if ln.startswith("Pss:"):
                        total += int(ln.split()[1])
        except OSError:
            pass
    return total


def run_measured(cmd):
    """(returncode, stderr, wall seconds, peak RSS GB from wait4, peak VmHWM GB polled from /proc, CPU seconds, peak
    Pss GB of the process with its workers, polled) of a child."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    hwm, pss, polls, err = 0, 0, 0, []
    import threading
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()))
    reader.start()
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for ln in f:
                    if ln.startswith("VmHWM:"):
                        hwm = max(hwm, int(ln.split()[1]))
        except OSError:
            pass
        if polls % 5 == 0:  # once a second: reading smaps walks the page tables
            pss = max(pss, tree_pss_kb(proc.pid))
        polls += 1
        time.sleep(0.2)
    reader.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return (proc.returncode, "".join(err), time.time() - t0, ru.ru_maxrss / 1024 ** 2, hwm / 1024 ** 2,
            ru.ru_utime + ru.ru_stime, pss / 1024 ** 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="output/bench_stream_7b")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--freqfold-search", choices=["fast", "exhaustive"], default="fast")
    ap.add_argument("--freqfold", default="4")
    ap.add_argument("--kv-lora-rank", type=int, default=320)
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--proxy-seqs", type=int, default=1, help="windows the FreqFold candidates are scored on")
    ap.add_argument("--layers", type=int, default=28,
                    help="decoder layers of the 7B shape (fewer: the same per-layer peak in less time; the adaptive "
                         "search builds every candidate of every layer, ~48 per layer at head_dim 128)")
    ap.add_argument("--out", default="benchmarks/results/stream_7b.json")
    ap.add_argument("--keep", action="store_true", help="keep the random source and the converted output")
    ap.add_argument("--write-source-only", metavar="DIR", help=argparse.SUPPRESS)  # the source-writing child
    args = ap.parse_args()
    if args.write_source_only:
        write_random_checkpoint(args.write_source_only, args.layers, shape=args.shape)
        return
    full = SHAPES[args.shape]["num_hidden_layers"]
    tag = ("" if args.layers == full else f"_{args.layers}l") + ("" if args.shape == "7b" else "_" + args.shape)
    src, dst = os.path.join(args.work, f"qwen2_5_7b{tag}_random"), os.path.join(args.work, f"qwen2_5_7b{tag}_mla")
    t0 = time.time()
    if not os.path.isfile(os.path.join(src, "config.json")):
        subprocess.run([sys.executable, os.path.abspath(__file__), "--write-source-only", src,
                        "--layers", str(args.layers), "--shape", args.shape], check=True)
    t_write = time.time() - t0
    cmd = [sys.executable, os.path.join(ROOT, "tools/convert_gqa_to_mla.py"), "--hf-dir", src, "--output-dir", dst,
           "--kv-lora-rank", str(args.kv_lora_rank), "--qk-rope-dim", "64", "--freqfold", args.freqfold,
           "--calib-text", "wiki-calib", "--calib-tokens", str(args.calib_tokens), "--proxy-seqs", str(args.proxy_seqs),
           "--out-dtype", "bf16", "--freqfold-search", args.freqfold_search, "--quiet"]
    load0 = os.getloadavg()[0]
    rc, stderr, wall, peak_gb, hwm_gb, cpu, pss_gb = run_measured(cmd)
    if rc != 0:
        print(stderr[-3000:])
        sys.exit(1)
    rep = json.load(open(os.path.join(dst, "conversion_report.json")))
    res = {"shape": f"Qwen2.5-{args.shape.upper()} (random bf16, {args.layers} layers)", "layers": args.layers, "kv_lora_rank": args.kv_lora_rank, "qk_rope_dim": 64,
           "freqfold": args.freqfold, "calib_tokens": args.calib_tokens, "write_source_seconds": round(t_write, 1),
           "convert_wall_seconds": round(wall, 1), "convert_cpu_seconds": round(cpu, 1),
           "load_before": load0, "load_after": os.getloadavg()[0], "peak_rss_gb": round(peak_gb, 2),
           "peak_vmhwm_polled_gb": round(hwm_gb, 2), "peak_pss_with_workers_gb": round(pss_gb, 2),
           "parent_rss_gb": round(
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 3),
           "cache_ratio": rep["cache_ratio"], "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores",
           "command": " ".join(cmd[1:])}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    json.dump(res, open(args.out, "w"), indent=1)
    print("| shape | rank | freqfold | calib tokens | convert wall s | CPU s | peak RSS GB | peak Pss with workers GB |\n"
          "|---|---|---|---|---|---|---|---|")
    print(f"| {res['shape']} | {args.kv_lora_rank}+64 | {args.freqfold} | {args.calib_tokens} | {res['convert_wall_seconds']}"
          f" | {res['convert_cpu_seconds']} | {res['peak_rss_gb']} | {res['peak_pss_with_workers_gb']} |")
    if not args.keep:
        import shutil
        shutil.rmtree(dst, ignore_errors=True)


if __name__ == "__main__":
    main()
