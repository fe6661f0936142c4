#!/usr/bin/env python
"""Conversion quality on the real SmolLM2-135M-Instruct: wiki-eval perplexity of the source, of the partial-RoPE stage
and of the final MLA (exact / stock DeepSeek export) for uniform FreqFold F and the adaptive modes, at several KV-cache
budgets. Prints a table and writes JSON; finished variants are kept in the JSON, so an interrupted run resumes.

  python benchmarks/bench_conversion.py --out benchmarks/results/conversion.json \
      --ranks 112 --variants F=2,F=4,F=8,adaptive-layer,adaptive --eval-tokens 32768

A variant is NAME[@export][:stage], e.g. F=4, adaptive@deepseek, F=8:partial (full-rank partial-RoPE stage with that
variant's bands). Converted models are kept under --work (default output/bench_conversion).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from youzhi_ms.runtime import init_context  # noqa: E402


def parse_variant(v):
    stage = "final"
    if ":" in v:
        v, stage = v.split(":")
    export = "exact"
    if "@" in v:
        v, export = v.split("@")
    mode = v[2:] if v.startswith("F=") else v
    return mode, export, stage


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/conversion.json")
    ap.add_argument("--work", default="output/bench_conversion")
    ap.add_argument("--source", default=None, help="source HF dir (default: SmolLM2 materialized from the GGUF)")
    ap.add_argument("--ranks", default="112", help="comma-separated kv_lora_rank values")
    ap.add_argument("--qk-rope-dim", type=int, default=32)
    ap.add_argument("--variants", default="F=2,F=4,F=8,adaptive-layer,adaptive")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--keep-models", action="store_true")
    ap.add_argument("--pca-metric", default="attn", choices=["attn", "bkv"])
    ap.add_argument("--rorope-metric", default="k", choices=["k", "qk"])
    args = ap.parse_args()
    init_context("graph")
    import shutil
    from youzhi_ms.checkpoint.hf import HFCheckpoint
    from youzhi_ms.checkpoint.mindspore_ckpt import load_model, load_weights, model_kind
    from youzhi_ms.config import load_any_config
    from youzhi_ms.convert.pipeline import ConvertOptions, convert
    from youzhi_ms.data.tokenizer import Tokenizer
    from youzhi_ms.eval.ppl import perplexity, token_stream
    src = args.source
    if src is None:
        src = os.path.join(args.work, "smollm2-hf")
        if not os.path.isdir(src):
            from youzhi_ms.checkpoint.gguf import gguf_to_hf, resolve_gguf
            gguf_to_hf(resolve_gguf("smollm2"), src)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    results = json.load(open(args.out)) if os.path.isfile(args.out) else {"runs": {}}
    results["meta"] = {"source": src, "eval": "wiki-eval", "eval_tokens": args.eval_tokens, "seq_len": 512,
                       "calib_tokens": args.calib_tokens, "qk_rope_dim": args.qk_rope_dim,
                       "machine": f"{os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    stream = token_stream("wiki-eval", Tokenizer.from_dir(src), args.eval_tokens)
    models = {}  # one compiled model per architecture shape, weights swapped in

    def ppl_of(d):
        cfg = load_any_config(HFCheckpoint(d).config)
        key = (model_kind(cfg), getattr(cfg, "kv_lora_rank", None), getattr(cfg, "kv_layernorm", None))
        if key not in models:
            models[key] = load_model(d, table_len=512)[0]
        else:
            load_weights(models[key], HFCheckpoint(d), model_kind(cfg))
        return perplexity(models[key], stream, 512, progress=False)

    def save():
        tmp = args.out + ".tmp"
        json.dump(results, open(tmp, "w"), indent=1)
        os.replace(tmp, args.out)

    if "source" not in results["runs"]:
        results["runs"]["source"] = ppl_of(src)
        save()
    base = results["runs"]["source"]["ppl"]
    print(f"source ppl {base:.3f}", flush=True)
    for r in [int(x) for x in args.ranks.split(",")]:
        for v in args.variants.split(","):
            mode, export, stage = parse_variant(v)
            name = f"r{r}/{v} [{args.pca_metric}]" + (" [qk-rorope]" if args.rorope_metric == "qk" else "")
            if name in results["runs"]:
                print(f"{name}: ppl {results['runs'][name]['ppl']:.3f} (cached)", flush=True)
                continue
            out = os.path.join(args.work, "".join(ch if ch.isalnum() else "_" for ch in name))
            t0 = time.time()
            full = 2 * 3 * 64 - args.qk_rope_dim
            if stage == "partial":
                plan_src = results["runs"].get(name.replace(v, v.split(":")[0]), {}).get("plan")
                opt = ConvertOptions(kv_lora_rank=full, qk_rope_dim=args.qk_rope_dim, freqfold=mode,
                                     calib_tokens=args.calib_tokens, skip_pca=True, plan=plan_src, progress=False,
                                     rorope_metric=args.rorope_metric)
            else:
                opt = ConvertOptions(kv_lora_rank=r, qk_rope_dim=args.qk_rope_dim, freqfold=mode, export=export,
                                     calib_tokens=args.calib_tokens, progress=False, pca_metric=args.pca_metric,
                                     rorope_metric=args.rorope_metric)
            rep = convert(src, out, opt)
            conv_s = time.time() - t0
            res = ppl_of(out)
            res.update(convert_seconds=round(conv_s, 1), cache_ratio=rep["cache_ratio"],
                       plan=[L["bands"] for L in rep["layers"]],
                       choices=[L["choice"] for L in rep["layers"]],
                       degradation=res["ppl"] - base)
            results["runs"][name] = res
            save()
            print(f"{name}: ppl {res['ppl']:.3f} (+{res['ppl'] - base:.3f}) convert {conv_s:.0f}s", flush=True)
            if not args.keep_models:
                shutil.rmtree(out, ignore_errors=True)
    print("\n| run | ppl | degradation | convert s |\n|---|---|---|---|")
    for name, res in results["runs"].items():
        print(f"| {name} | {res['ppl']:.3f} | {res['ppl'] - base:+.3f} | {res.get('convert_seconds', '')} |")


if __name__ == "__main__":
    main()
