#!/usr/bin/env python
"""Conversion quality on the real SmolLM2-135M-Instruct: perplexity of the converted model on held-out wiki text and on
text of another domain (news), for uniform FreqFold F and the adaptive modes, both latent-PCA metrics and both kinds of
statistics, at several KV-cache budgets. Prints a table and writes JSON; finished variants are kept in the JSON, so an
interrupted run resumes.

  python benchmarks/bench_conversion.py --out benchmarks/results/conversion_grid.json \\
      --ranks 160,112,96 --variants F=2,F=4,F=8,adaptive,adaptive-layer --pca-metrics attn,bkv \\
      --stats cascaded,standard --texts wiki-eval,news --eval-tokens 8192 --calib-tokens 8192

A variant is NAME[@export][:stage], e.g. F=4, adaptive@deepseek, F=8:partial (full-rank partial-RoPE stage with that
variant's bands). The reductions are computed against the best uniform F with the same PCA metric and statistics, and
against TransMLA's construction (uniform F = 4, balanced K/V PCA, cascaded statistics: the row that matches the real
TransMLA converter). Converted models are written under --work and deleted after evaluation (--keep-models keeps them).
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


def run_name(r, v, pca, stats):
    return f"r{r}/{v} [{pca}] [{stats}]"


def reductions(runs, source, texts):
    """Per adaptive run: degradation cut against the best uniform F (same rank, pca, stats, export, stage) and against
    the TransMLA construction at the same rank; per text, in percent."""
    out = {}
    for name, res in runs.items():
        if "/" not in name:  # the source row
            continue
        r, v = name.split("/")[0], name.split("/", 1)[1].split(" ")[0]
        mode, export, stage = parse_variant(v)
        if not mode.startswith("adaptive"):
            continue
        tail = name.split(" ", 1)[1]
        suffix = ("@" + export if export != "exact" else "") + (":" + stage if stage != "final" else "")
        uni = {n: x for n, x in runs.items() if n.startswith(r + "/F=") and n.endswith(tail)
               and n.split("/", 1)[1].split(" ")[0].lstrip("F=0123456789") == suffix}
        base = runs.get(f"{r}/F=4 [bkv] [cascaded]")
        red = {}
        for t in texts:
            deg = res[t] - source[t]
            if uni:
                best = min(uni, key=lambda n: uni[n][t])
                red[f"vs_best_uniform_{t}"] = {"uniform": best.split("/", 1)[1].split(" ")[0],
                                               "percent": 100 * (deg / (uni[best][t] - source[t]) - 1)}
            if base is not None and suffix == "":
                red[f"vs_transmla_{t}"] = 100 * (deg / (base[t] - source[t]) - 1)
        out[name] = red
    return out


def _int_option(text):
    """NAME=INT -> (name, int), for argparse (a bad value is its one-line error, not a traceback)."""
    name, sep, value = text.partition("=")
    if sep and name:
        try:
            return name, int(value)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"{text!r}: use NAME=INT, e.g. search_survivors=4")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/conversion_grid.json")
    ap.add_argument("--work", default="output/bench_conversion")
    ap.add_argument("--source", default=None, help="source HF dir (default: SmolLM2 materialized from the GGUF)")
    ap.add_argument("--ranks", default="112", help="comma-separated kv_lora_rank values")
    ap.add_argument("--qk-rope-dim", type=int, default=32)
    ap.add_argument("--variants", default="F=2,F=4,F=8,adaptive,adaptive-layer")
    ap.add_argument("--pca-metrics", default="attn", help="comma-separated: attn, bkv")
    ap.add_argument("--stats", default="cascaded", help="comma-separated: cascaded, standard")
    ap.add_argument("--texts", default="wiki-eval,news", help="held-out texts to evaluate on")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="tokens of each text (512-token windows)")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--keep-models", action="store_true")
    ap.add_argument("--option", action="append", default=[], metavar="NAME=INT", type=_int_option,
                    help="another integer ConvertOptions field for every conversion, e.g. search_survivors=64")
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
        from youzhi_ms.checkpoint.gguf import gguf_to_hf
        from youzhi_ms.data.text import cache_dir
        src = os.path.join(cache_dir(), "smollm2-135m-instruct-hf")
        if not os.path.isfile(os.path.join(src, "config.json")):
            gguf_to_hf("smollm2", src, dtype="fp32", progress=False)
    texts = args.texts.split(",")
    extra_options = dict(args.option)
    unknown = sorted(set(extra_options) - set(ConvertOptions.__dataclass_fields__))
    if unknown:
        ap.error(f"--option {', '.join(unknown)}: not a ConvertOptions field (youzhi_ms/convert/pipeline.py)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    results = json.load(open(args.out)) if os.path.isfile(args.out) else {"runs": {}}
    results["meta"] = {"options": extra_options, "source": src, "texts": texts, "eval_tokens": args.eval_tokens,
                       "seq_len": 512, "calib_text": "wiki-calib", "calib_tokens": args.calib_tokens, "qk_rope_dim": args.qk_rope_dim,
                       "machine": f"{os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    tok = Tokenizer.from_dir(src)
    streams = {t: token_stream(t, tok, args.eval_tokens) for t in texts}
    models = {}  # one compiled model per architecture shape, weights swapped in

    def ppl_of(d):
        cfg = load_any_config(HFCheckpoint(d).config)
        key = (model_kind(cfg), getattr(cfg, "kv_lora_rank", None), getattr(cfg, "kv_layernorm", None))
        if key not in models:
            models[key] = load_model(d, table_len=512)[0]
        else:
            load_weights(models[key], HFCheckpoint(d), model_kind(cfg))
        return {t: perplexity(models[key], s, 512, progress=False)["ppl"] for t, s in streams.items()}

    def save():
        results["reductions"] = reductions(results["runs"], results["runs"]["source"], texts)
        tmp = args.out + ".tmp"
        json.dump(results, open(tmp, "w"), indent=1)
        os.replace(tmp, args.out)

    if "source" not in results["runs"] or any(t not in results["runs"]["source"] for t in texts):
        results["runs"]["source"] = ppl_of(src)
        save()
    base = results["runs"]["source"]
    print("source " + " ".join(f"{t} {base[t]:.3f}" for t in texts), flush=True)
    full = None
    for r in [int(x) for x in args.ranks.split(",")]:
        for stats in args.stats.split(","):
            for pca in args.pca_metrics.split(","):
                for v in args.variants.split(","):
                    mode, export, stage = parse_variant(v)
                    name = run_name(r, v, pca, stats)
                    if name in results["runs"]:
                        print(f"{name}: (cached)", flush=True)
                        continue
                    out = os.path.join(args.work, "".join(ch if ch.isalnum() else "_" for ch in name))
                    shutil.rmtree(out, ignore_errors=True)
                    t0 = time.time()
                    opt = ConvertOptions(kv_lora_rank=r, qk_rope_dim=args.qk_rope_dim, freqfold=mode, export=export,
                                         calib_tokens=args.calib_tokens, progress=False, pca_metric=pca, stats=stats,
                                         **extra_options)
                    if stage == "partial":
                        if full is None:
                            sc = load_any_config(HFCheckpoint(src).config)
                            full = 2 * sc.num_kv_heads * sc.head_dim - args.qk_rope_dim
                        plan = results["runs"].get(run_name(r, v.split(":")[0], pca, stats), {}).get("plan")
                        opt.kv_lora_rank, opt.skip_pca, opt.plan = full, True, plan
                    rep = convert(src, out, opt)
                    conv_s = time.time() - t0
                    res = ppl_of(out)
                    res.update(convert_seconds=round(conv_s, 1), cache_ratio=rep["cache_ratio"],
                               plan=[L["bands"] for L in rep["layers"]], choices=[L["choice"] for L in rep["layers"]],
                               balances=[L["beta"] for L in rep["layers"]],
                               degradation={t: res[t] - base[t] for t in texts})
                    results["runs"][name] = res
                    save()
                    print(f"{name}: " + " ".join(f"{t} {res[t]:.3f} ({res[t] - base[t]:+.3f})" for t in texts)
                          + f" convert {conv_s:.0f}s", flush=True)
                    if not args.keep_models:
                        shutil.rmtree(out, ignore_errors=True)
    save()
    print("\n| run | " + " | ".join(f"{t} ppl | {t} degr." for t in texts) + " | convert s |")
    print("|---|" + "---|---|" * len(texts) + "---|")
    for name, res in results["runs"].items():
        print(f"| {name} | " + " | ".join(f"{res[t]:.3f} | {res[t] - base[t]:+.3f}" for t in texts)
              + f" | {res.get('convert_seconds', '')} |")
    print("\n| adaptive run | " + " | ".join(f"vs best uniform ({t}) | vs TransMLA ({t})" for t in texts) + " |")
    print("|---|" + "---|---|" * len(texts))
    for name, red in results["reductions"].items():
        cells = []
        for t in texts:
            u = red.get(f"vs_best_uniform_{t}")
            cells.append(f"{u['percent']:+.1f}% ({u['uniform']})" if u else "")
            tm = red.get(f"vs_transmla_{t}")
            cells.append(f"{tm:+.1f}%" if tm is not None else "")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
