#!/usr/bin/env python
"""wiki-eval perplexity of the full 30-layer SmolLM2-135M-Instruct from the MindSpore model and from transformers
(torch, CPU, fp32) on exactly the same token windows (the protocol of youzhi_ms/eval/ppl.py). Prints a table and
writes JSON.

  python benchmarks/bench_ppl_parity.py [--model DIR] [--max-tokens N] [--out benchmarks/results/ppl_parity.json]
"""
import argparse
import json
import math
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF dir (default: SmolLM2 materialized from the shipped GGUF)")
    ap.add_argument("--text", default="wiki-eval")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/ppl_parity.json")
    args = ap.parse_args()
    from youzhi_ms.runtime import init_context
    init_context("graph")
    from youzhi_ms.data.text import cache_dir
    from youzhi_ms.data.tokenizer import Tokenizer
    from youzhi_ms.eval.ppl import evaluate_dir, token_stream, windows
    model_dir = args.model or os.path.join(cache_dir(), "smollm2-135m-instruct-hf")
    if not os.path.isdir(model_dir):
        from youzhi_ms.checkpoint.gguf import gguf_to_hf, resolve_gguf
        gguf_to_hf(resolve_gguf("smollm2"), model_dir)
    ours = evaluate_dir(model_dir, args.text, args.seq_len, args.max_tokens)
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(os.cpu_count())
    win = windows(token_stream(args.text, Tokenizer.from_dir(model_dir), args.max_tokens), args.seq_len)
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    t0, total, count = time.time(), 0.0, 0
    with torch.no_grad():
        for i in range(0, len(win), 4):
            ids = torch.tensor(win[i:i + 4], dtype=torch.long)
            logp = torch.log_softmax(ref_model(ids).logits[:, :-1].float(), -1)
            nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1).double()
            total += float(nll.sum())
            count += nll.numel()
    ref = {"ppl": math.exp(total / count), "tokens": count, "seconds": round(time.time() - t0, 1)}
    rel = abs(ours["ppl"] - ref["ppl"]) / ref["ppl"]
    res = {"model": model_dir, "text": args.text, "seq_len": args.seq_len, "max_tokens": args.max_tokens,
           "mindspore": ours, "transformers": ref, "relative_difference": rel, "date": time.strftime("%Y-%m-%d"),
           "machine": f"{os.cpu_count()} cores"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    json.dump(res, open(args.out, "w"), indent=1)
    print("| implementation | ppl | scored tokens | seconds |\n|---|---|---|---|")
    print(f"| MindSpore (youzhi_ms) | {ours['ppl']:.4f} | {ours['tokens']} | {ours['seconds']} |")
    print(f"| transformers (torch fp32) | {ref['ppl']:.4f} | {ref['tokens']} | {ref['seconds']} |")
    print(f"relative difference {rel:.2e}")


if __name__ == "__main__":
    main()
