#!/usr/bin/env python
"""Does the fast FreqFold search choose what the exhaustive one chooses? Every (tiling, K/V balance) pair of sampled
layers of a real model is built and scored both ways (the full score and the fast search's first-round subsample),
then each search rule is replayed on that table: the exhaustive one (every tiling in full at balance 1, the best 3 at
every balance) and successive halving with given survivor counts. Prints, per rule, on how many layers it picks the
exhaustive rule's pair and how much worse (or better) its pair's error is where it does not; writes the table as JSON.

The layers before each sampled layer are converted with uniform F = 4 (as bench_freqfold_search.py does), so the
sampled layers see realistic converted inputs without the cost of searching every layer.

  python benchmarks/bench_search_agreement.py --hf-dir SMOLLM2_HF --kv-lora-rank 112 --layers 0,3,7,11,15,20,25,29 \\
      --out benchmarks/results/freqfold_search/agreement_r112.json
  python benchmarks/bench_search_agreement.py --replay benchmarks/results/freqfold_search/agreement_r112.json
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from youzhi_ms.checkpoint.hf import HFCheckpoint  # noqa: E402
from youzhi_ms.config import SourceConfig, rope_inv_freq, rope_tables  # noqa: E402
from youzhi_ms.convert import adaptive, calibrate, pipeline  # noqa: E402
from youzhi_ms.convert.attention_np import block_output, rms_norm  # noqa: E402
import numpy as np  # noqa: E402  (after youzhi_ms, which picks numpy's BLAS kernel before numpy loads)

RULES = [  # (survivors, finalists, balance pairs in full); None = the exhaustive rule
    None, (8, 3, 12), (4, 3, 3), (4, 3, 2), (3, 2, 2)]


def table(args):
    ck = HFCheckpoint(args.hf_dir)
    cfg = SourceConfig.from_hf(ck.config)
    opt = pipeline.ConvertOptions(kv_lora_rank=args.kv_lora_rank, qk_rope_dim=args.qk_rope_dim,
                                  calib_tokens=args.calib_tokens, progress=False)
    rope, c = pipeline._check_options(cfg, opt)
    ids = pipeline.calibration_windows(args.hf_dir, opt.calib_text, opt.calib_tokens, opt.calib_seq_len, opt.seed)
    S = ids.shape[1]
    D, d = cfg.hidden_size, cfg.head_dim
    inv, att = rope_inv_freq(d, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    cos, sin = rope_tables(inv, S, att)
    geo = calibrate.Geometry(n_heads=cfg.num_heads, n_kv=cfg.num_kv_heads, d=d, rope_dim=rope,
                             rank=args.kv_lora_rank, eps=cfg.rms_norm_eps, cos=cos, sin=sin)
    npx = opt.proxy_seqs
    emb = ck.take_rows("model.embed_tokens.weight", ids)
    h = {"conv": emb, "orig": emb[:npx]}
    layers = sorted(int(v) for v in args.layers.split(","))
    out = []
    for i in range(layers[-1] + 1):
        w = calibrate.layer_weights(ck, i, cfg)
        src = {k: w[k] for k in ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo") if k in w}
        x = {k: rms_norm(v, w["ln1"], cfg.rms_norm_eps) for k, v in h.items()}
        a_orig = geo.gqa(x["orig"], src)
        flat = x["conv"].reshape(-1, D)
        stats = calibrate.LayerStats(geo, src, flat, flat, opt.pca_metric)
        if i in layers:
            t0 = time.time()
            a_loc = geo.gqa(x["conv"][:npx], src)
            score = calibrate.ResidualScore(geo, w, h["conv"][:npx], h["orig"][:npx], a_orig[:npx], opt.score, a_loc,
                                            opt.score_stride)
            coarse = score.subsample(opt.search_subsample, opt.search_windows)
            variants = {f"{k}x{w}": score.subsample(k, w) for k, w in args.coarse_variants}
            cands = adaptive.layer_candidates("adaptive", d, c)
            full, first = {}, {}
            other = {v: {} for v in variants}
            for name, bands in cands.items():
                for beta in opt.betas:
                    m = stats.fast_build(bands, beta)[0]
                    full[f"{name}@{beta}"], first[f"{name}@{beta}"] = score(m), coarse(m)
                    for v, fn in variants.items():
                        other[v][f"{name}@{beta}"] = fn(m)
            out.append({"layer": i, "names": list(cands), "betas": list(opt.betas), "full": full, "coarse": first,
                        **{f"coarse {v}": t for v, t in other.items()}})
            print(f"layer {i}: {len(full)} pairs in {time.time() - t0:.0f} s", flush=True)
        m, _ = stats.build(adaptive.uniform_bands(d, 4), 1.0)
        h = {"conv": block_output(h["conv"], geo.mla(x["conv"], m), w, cfg.rms_norm_eps),
             "orig": block_output(h["orig"], a_orig, w, cfg.rms_norm_eps)}
    return {"hf_dir": args.hf_dir, "kv_lora_rank": args.kv_lora_rank, "calib_tokens": args.calib_tokens,
            "date": time.strftime("%Y-%m-%d"), "layers": out}


def replay(layer, rule):
    """The (name, beta) pair a search rule picks from a layer's table, by the same rounds adaptive.choose runs."""
    full, first, names, betas = layer["full"], layer["coarse"], layer["names"], layer["betas"]

    def F(n, b):
        return full[f"{n}@{b}"]

    def C(n, b):
        return first[f"{n}@{b}"]

    others = [b for b in betas if b != 1.0]
    if rule is None:
        top = sorted(names, key=lambda n: F(n, 1.0))[:3]
        pairs = [(n, b) for n in top for b in others]
    else:
        survivors, finalists, pairs_in_full = rule
        kept = sorted(names, key=lambda n: C(n, 1.0))[:survivors]
        top = sorted(kept, key=lambda n: F(n, 1.0))[:finalists]
        pairs = sorted([(n, b) for n in top for b in others], key=lambda nb: C(*nb))[:pairs_in_full]
    return min([(n, 1.0) for n in top] + pairs, key=lambda nb: F(*nb))


def report(data):
    print("| rule (survivors, finalists, balance pairs in full) | same pair as exhaustive | where not: error vs exhaustive |")
    print("|---|---|---|")
    for rule in RULES[1:]:
        same, diffs = 0, []
        for L in data["layers"]:
            ex, got = replay(L, None), replay(L, rule)
            if got == ex:
                same += 1
            else:
                err = L["full"][f"{got[0]}@{got[1]}"] / L["full"][f"{ex[0]}@{ex[1]}"] - 1
                diffs.append(f"layer {L['layer']}: {err:+.2%}")
        print(f"| {rule} | {same} / {len(data['layers'])} | {'; '.join(diffs) or '-'} |")
    # how well each recorded first round tracks the full score, against how close the pairs it must separate are
    print("\n| layer | first round | sd of first-round / full score (ratio to its median) | top five pairs in full: "
          "gaps to the best |")
    print("|---|---|---|---|")
    for L in data["layers"]:
        full = L["full"]
        best = sorted(full.values())[:5]
        gaps = ", ".join(f"{v / best[0] - 1:.2%}" for v in best[1:])
        for key in [k for k in L if k.startswith("coarse")]:
            ratio = np.array([L[key][p] / full[p] for p in full])
            sd = np.std(ratio / np.median(ratio))
            print(f"| {L['layer']} | {key[len('coarse '):] or 'default (4x2)'} | {sd:.1%} | {gaps} |")
    # exact pruning (stop scoring a candidate once its partial error passes the score it must beat), at its best:
    # candidates in the order of their full scores and every error accruing evenly over the windows, so a candidate
    # with full score s against threshold t costs min(1, t / s) of a full score. Not built: this bounds its gain.
    print("\n| layer | exact pruning at best: work / the full rounds' 36 + 12 scores |")
    print("|---|---|")
    fractions = []
    for L in data["layers"]:
        full, names = L["full"], L["names"]
        ranked = sorted(names, key=lambda n: full[f"{n}@1.0"])
        at1, top = [full[f"{n}@1.0"] for n in ranked], ranked[:3]
        pairs = [full[f"{n}@{b}"] for n in top for b in L["betas"] if b != 1.0]
        best = min(at1[0], *pairs)
        work = 3 + sum(min(1.0, at1[2] / v) for v in at1[3:]) + sum(min(1.0, best / v) for v in pairs)
        fractions.append(work / (len(names) + len(pairs)))
        print(f"| {L['layer']} | {fractions[-1]:.2f} |")
    print(f"| mean | {np.mean(fractions):.2f} |")


def _variants(text):
    """'16x8,8x8' -> [(16, 8), (8, 8)]: every K-th scored position of the first W windows, for argparse."""
    try:
        out = [tuple(int(n) for n in v.split("x")) for v in text.split(",") if v]
    except ValueError:
        out = []
    if not out or any(len(v) != 2 or min(v) < 1 for v in out):
        raise argparse.ArgumentTypeError(f"{text!r}: use K x W pairs of positive integers, e.g. 16x8,8x8")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir")
    ap.add_argument("--kv-lora-rank", type=int, default=112)
    ap.add_argument("--qk-rope-dim", type=int, default=32)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--layers", default="0,3,7,11,15,20,25,29")
    ap.add_argument("--out", default="benchmarks/results/freqfold_search/agreement.json")
    ap.add_argument("--coarse-variants", type=_variants, default=[],
                    metavar="KxW,...", help="also record first-round scores on every K-th position of W windows")
    ap.add_argument("--replay", metavar="JSON", help="replay the rules on a table written earlier")
    args = ap.parse_args()
    if args.replay:
        with open(args.replay) as f:
            data = json.load(f)
    else:
        if not args.hf_dir:
            ap.error("--hf-dir is required (or --replay JSON)")
        data = table(args)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(data, f)
    report(data)


if __name__ == "__main__":
    main()
