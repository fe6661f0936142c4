#!/usr/bin/env python
"""Source GQA vs converted MLA in a real inference engine, llama.cpp (CPU, through llama-cpp-python's C API), next to
the planner's arithmetic (youzhi_ms/infer/planner.py) for the same shapes.

  python benchmarks/bench_llamacpp.py --source DIR --mla DIR [--work DIR] [--json benchmarks/results/llamacpp.json]
      [--ppl-tokens 2048] [--contexts 512,2048,8192] [--parallel 1,4,16] [--decode-steps 8]
      [--budget-mib 256] [--seq-len 2048] [--plot docs/serving_llamacpp.png]

Both models are exported with tools/export_gguf.py's writer (f32 for the perplexity parity, f16 for serving). Measured:
1. KV bytes per token: what llama.cpp logs when it allocates its cache (f16 cells), over the allocated cells.
2. Perplexity of the first --ppl-tokens wiki-eval tokens, one window, through llama.cpp (f32 weights; f32 and the
   default f16 cache) and transformers (fp32) on the same token ids.
3. Decode throughput: P sequences (each holding a C-token context: one prefill, copied to the other sequences'
   streams with llama_memory_seq_cp) decode --decode-steps tokens each, one batch of P tokens per step; tokens/s.
4. Concurrency under a fixed KV budget: the engine gets n_ctx = the cells --budget-mib holds at its own bytes per
   token, split over N sequences (one stream each); the largest N whose sequences of --seq-len tokens all run
   (the next N fails: llama_decode reports a full cache).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MIB = 1 << 20


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def export(model_dir, out, outtype):
    from youzhi_ms.checkpoint.gguf_writer import export_gguf
    if not os.path.isfile(out):
        export_gguf(model_dir, out, outtype, progress=False)
    return out


def hf_nll(model_dir, tokens):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(os.cpu_count())
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double()
    lp = torch.log_softmax(logits[:-1], -1)
    return -lp.gather(1, torch.tensor(tokens[1:])[:, None])[:, 0].numpy()


def engine_kv(gguf, cells):
    from youzhi_ms.infer.llamacpp import Engine
    with Engine(gguf, n_ctx=cells, n_seq_max=1) as eng:
        kv = eng.kv
    return {"cells": kv.total_cells, "k_mib": kv.k_mib, "v_mib": kv.v_mib, "type_k": kv.type_k, "type_v": kv.type_v,
            "bytes_per_token": kv.bytes_per_token}


def throughput(gguf, ctx, parallel, steps, seed=0):
    """{P: tokens/s} decoding `steps` tokens in each of P sequences that hold `ctx` tokens of context."""
    from youzhi_ms.infer.llamacpp import Engine
    pmax = max(parallel)
    per_seq = int(math.ceil((ctx + steps + 1) / 256) * 256)
    rng = np.random.default_rng(seed)
    out = {}
    with Engine(gguf, n_ctx=per_seq * pmax, n_seq_max=pmax, n_batch=512) as eng:
        prompt = rng.integers(10, eng.n_vocab, ctx).tolist()
        t0 = time.time()
        for _ in eng.forward(prompt, seq=0, all_logits=False):
            pass
        prefill = time.time() - t0
        for s in range(1, pmax):
            eng.seq_cp(0, s)
        for p in parallel:
            toks = rng.integers(10, eng.n_vocab, p).tolist()
            rc = eng.decode([(toks[s], ctx, s, True) for s in range(p)])  # warm-up step (also applies the copies)
            assert rc == 0, rc
            t0 = time.time()
            for k in range(1, steps + 1):
                rc = eng.decode([(int(eng.logits(s).argmax()), ctx + k, s, True) for s in range(p)])
                assert rc == 0, rc
            out[p] = p * steps / (time.time() - t0)
            mem = eng._L.llama_get_memory(eng.ctx)
            for s in range(p):  # back to the shared C-token context for the next P
                eng._L.llama_memory_seq_rm(mem, s, ctx, -1)
    return out, prefill


def fits(gguf, bytes_per_token, budget, n_seqs, seq_len, seed=0):
    """Run n_seqs sequences of seq_len tokens in an engine whose KV cache is the budget split over n_seqs streams.
    Returns (all ran, allocated KV bytes, cells per sequence)."""
    from youzhi_ms.infer.llamacpp import Engine
    cells = int(budget // bytes_per_token)
    per_seq = (cells // n_seqs) // 256 * 256  # llama.cpp sizes streams in 256-cell steps; never above the budget
    if per_seq == 0:
        return False, 0, 0
    rng = np.random.default_rng(seed)
    with Engine(gguf, n_ctx=per_seq * n_seqs, n_seq_max=n_seqs, n_batch=512) as eng:
        alloc = eng.kv.bytes
        prompt = rng.integers(10, eng.n_vocab, seq_len - 1).tolist()
        try:
            for _ in eng.forward(prompt, seq=0, all_logits=False):
                pass
        except Exception:
            return False, alloc, per_seq
        for s in range(1, n_seqs):
            eng.seq_cp(0, s)
        # every sequence takes its last token in one batch: each needs its own cell
        tok = rng.integers(10, eng.n_vocab, n_seqs).tolist()
        rc = eng.decode([(tok[s], seq_len - 1, s, True) for s in range(n_seqs)])
        return rc == 0, alloc, per_seq


def max_concurrency(gguf, bytes_per_token, budget, seq_len):
    n = max(1, int(budget // bytes_per_token // seq_len))
    ok, alloc, per = fits(gguf, bytes_per_token, budget, n, seq_len)
    while not ok and n > 1:
        n -= 1
        ok, alloc, per = fits(gguf, bytes_per_token, budget, n, seq_len)
    nxt_ok, nxt_alloc, nxt_per = fits(gguf, bytes_per_token, budget, n + 1, seq_len)
    while nxt_ok:
        n, alloc, per = n + 1, nxt_alloc, nxt_per
        nxt_ok, nxt_alloc, nxt_per = fits(gguf, bytes_per_token, budget, n + 1, seq_len)
    return {"max_sequences": n if ok else 0, "allocated_bytes": alloc, "cells_per_sequence": per,
            "next_fails": True, "next_cells_per_sequence": nxt_per}


def planner_figures(model_dir, budget, seq_len):
    from youzhi_ms.infer import planner as P
    shape = P.load_model_shape(model_dir)
    bpt = P.kv_bytes_per_token(shape, "fp16")
    return {"kv_bytes_per_token": bpt, "max_sequences": budget // bpt // seq_len,
            "max_sequences_exact": budget / bpt / seq_len, "warnings": P.deployment_warnings(shape) if shape.is_mla
            else []}


def machine():
    out = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        import llama_cpp
        out["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    try:
        out["cpu"] = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return out


def load():
    return os.getloadavg()


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for name, style in (("source", "o-"), ("mla", "s--")):
        for ctx, d in sorted(res["models"][name]["throughput"].items(), key=lambda kv: int(kv[0])):
            ps = sorted(int(p) for p in d["tokens_per_s"])
            ax.plot(ps, [d["tokens_per_s"][str(p)] for p in ps], style, label=f"{name} ctx {ctx}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("parallel sequences")
    ax.set_ylabel("decode tokens/s (all sequences)")
    ax.set_title("llama.cpp CPU decode throughput")
    ax.legend(fontsize=7)
    ax = axes[1]
    names = ["source", "mla"]
    x = np.arange(2)
    eng = [res["models"][n]["concurrency"]["max_sequences"] for n in names]
    pl = [res["models"][n]["planner"]["max_sequences"] for n in names]
    ax.bar(x - 0.2, eng, 0.4, label="llama.cpp (measured)")
    ax.bar(x + 0.2, pl, 0.4, label="planner arithmetic")
    ax.set_xticks(x, [f"{n}\n{res['models'][n]['kv']['bytes_per_token']:.0f} B/token" for n in names])
    ax.set_ylabel(f"sequences of {res['settings']['seq_len']} tokens")
    ax.set_title(f"concurrency in a {res['settings']['budget_mib']} MiB KV budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="source GQA Hugging Face directory")
    ap.add_argument("--mla", required=True, help="the converted MLA directory (--export deepseek)")
    ap.add_argument("--work", default="work_dirs/bench_llamacpp", help="where the GGUF files go (reused)")
    ap.add_argument("--json", default="benchmarks/results/llamacpp.json")
    ap.add_argument("--plot", default="docs/serving_llamacpp.png")
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--contexts", default="512,2048,8192")
    ap.add_argument("--parallel", default="1,4,16")
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--budget-mib", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: ppl,throughput,concurrency")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    os.makedirs(args.work, exist_ok=True)
    budget = args.budget_mib * MIB
    contexts = [int(x) for x in args.contexts.split(",")]
    parallel = [int(x) for x in args.parallel.split(",")]
    res = {"command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "load_start": load(),
           "settings": {"budget_mib": args.budget_mib, "seq_len": args.seq_len, "ppl_tokens": args.ppl_tokens,
                        "contexts": contexts, "parallel": parallel, "decode_steps": args.decode_steps,
                        "cache_type": "f16", "serving_weights": "f16"},
           "models": {}}
    tokens = None
    if "ppl" not in skip:
        from youzhi_ms.data.tokenizer import Tokenizer
        from youzhi_ms.eval.ppl import token_stream
        tokens = token_stream("wiki-eval", Tokenizer.from_dir(args.source), args.ppl_tokens).tolist()
    for name, d in (("source", args.source), ("mla", args.mla)):
        m = res["models"].setdefault(name, {"dir": d})
        f32 = export(d, os.path.join(args.work, f"{name}_f32.gguf"), "f32")
        f16 = export(d, os.path.join(args.work, f"{name}_f16.gguf"), "f16")
        m["kv"] = engine_kv(f16, 8192)
        m["planner"] = planner_figures(d, budget, args.seq_len)
        log(f"{name}: KV {m['kv']['bytes_per_token']:.1f} B/token (planner {m['planner']['kv_bytes_per_token']}), "
            f"load {load()}")
        if tokens is not None:
            from youzhi_ms.infer.llamacpp import Engine
            ref = hf_nll(d, tokens)
            m["ppl"] = {"tokens": len(tokens), "transformers_fp32": float(np.exp(ref.mean()))}
            for kv_type in ("f32", "f16"):
                with Engine(f32, n_ctx=len(tokens) + 256, type_kv=kv_type) as eng:
                    nll = eng.nll(tokens)
                m["ppl"][f"llamacpp_f32_weights_{kv_type}_cache"] = float(np.exp(nll.mean()))
            with Engine(f16, n_ctx=len(tokens) + 256) as eng:
                m["ppl"]["llamacpp_f16_weights_f16_cache"] = float(np.exp(eng.nll(tokens).mean()))
            m["ppl"]["rel_diff_f32"] = m["ppl"]["llamacpp_f32_weights_f32_cache"] / m["ppl"]["transformers_fp32"] - 1
            log(f"{name}: ppl {m['ppl']}, load {load()}")
        if "throughput" not in skip:
            m["throughput"] = {}
            for ctx in contexts:
                tps, prefill = throughput(f16, ctx, parallel, args.decode_steps)
                m["throughput"][str(ctx)] = {"tokens_per_s": {str(p): v for p, v in tps.items()},
                                             "prefill_s": prefill, "load": load()}
                log(f"{name}: ctx {ctx}: {', '.join(f'P={p} {v:.1f} tok/s' for p, v in tps.items())} "
                    f"(prefill {prefill:.1f} s), load {load()}")
        if "concurrency" not in skip:
            m["concurrency"] = max_concurrency(f16, m["kv"]["bytes_per_token"], budget, args.seq_len)
            log(f"{name}: {m['concurrency']}, load {load()}")
    res["load_end"] = load()
    s, q = res["models"]["source"], res["models"]["mla"]
    res["ratios"] = {"kv_bytes_per_token": s["kv"]["bytes_per_token"] / q["kv"]["bytes_per_token"],
                     "planner_kv_bytes_per_token": s["planner"]["kv_bytes_per_token"] /
                     q["planner"]["kv_bytes_per_token"]}
    if "concurrency" not in skip:
        res["ratios"]["concurrency"] = q["concurrency"]["max_sequences"] / max(1, s["concurrency"]["max_sequences"])
        res["ratios"]["planner_concurrency"] = q["planner"]["max_sequences"] / max(1, s["planner"]["max_sequences"])
    if "throughput" not in skip:
        res["ratios"]["throughput"] = {c: {p: q["throughput"][c]["tokens_per_s"][p] / v
                                           for p, v in s["throughput"][c]["tokens_per_s"].items()}
                                       for c in s["throughput"]}
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    print(f"{'':28s}{'source GQA':>14s}{'MLA':>14s}{'ratio':>9s}")
    print(f"{'KV B/token (llama.cpp)':28s}{s['kv']['bytes_per_token']:14.1f}{q['kv']['bytes_per_token']:14.1f}"
          f"{res['ratios']['kv_bytes_per_token']:9.3f}")
    print(f"{'KV B/token (planner)':28s}{s['planner']['kv_bytes_per_token']:14d}{q['planner']['kv_bytes_per_token']:14d}"
          f"{res['ratios']['planner_kv_bytes_per_token']:9.3f}")
    if "ppl" in s:
        for key in ("transformers_fp32", "llamacpp_f32_weights_f32_cache", "llamacpp_f32_weights_f16_cache",
                    "llamacpp_f16_weights_f16_cache"):
            print(f"{'ppl ' + key:28.28s}{s['ppl'][key]:14.3f}{q['ppl'][key]:14.3f}")
    if "concurrency" in s:
        print(f"{'max seqs (llama.cpp)':28s}{s['concurrency']['max_sequences']:14d}"
              f"{q['concurrency']['max_sequences']:14d}{res['ratios']['concurrency']:9.3f}")
        print(f"{'max seqs (planner)':28s}{s['planner']['max_sequences']:14d}{q['planner']['max_sequences']:14d}"
              f"{res['ratios']['planner_concurrency']:9.3f}")
    if "throughput" in s:
        for c in s["throughput"]:
            for p, v in s["throughput"][c]["tokens_per_s"].items():
                w = q["throughput"][c]["tokens_per_s"][p]
                print(f"{f'decode tok/s ctx {c} P={p}':28s}{v:14.1f}{w:14.1f}{w / v:9.3f}")
        if args.plot and "concurrency" in s:
            plot(res, args.plot)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
