#!/usr/bin/env python
"""Where the adaptive FreqFold search of one layer spends its time: a per-phase profile, the exhaustive search against
the fast one on the same layer (same choice?), and the per-layer seconds a whole-model estimate multiplies.

Sets layer LAYER up exactly as the converter does (calibration windows from --calib-text, the converted and source
streams pushed through the layers before it with the chosen search), then runs the layer's decision with each search
in --searches and times its phases by wrapping the functions that make them:
  stats     LayerStats (input and query moments, pre-RoPE keys) and the search's per-layer precomputation
  proxy     the band proxy and the shortlist (d = 128 only)
  rotation  RoRoPE per band (PCA of each band's keys)
  latent    the latent PCA of a candidate (metric, square roots, the eigendecomposition, the layer's tensors)
  score     the layer's MLA attention + MLP on the scoring windows
One JSON line per search. Two cores shared with other jobs: compare searches in one run, and note `uptime`.

  python benchmarks/bench_freqfold_search.py --hf-dir SMOLLM2_HF --kv-lora-rank 112 --qk-rope-dim 32 --layer 1
  python benchmarks/bench_freqfold_search.py --hf-dir QWEN7B_SHAPE --kv-lora-rank 320 --qk-rope-dim 64 \\
      --calib-tokens 1024 --proxy-seqs 1 --layer 0
"""
import argparse
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from youzhi_ms.checkpoint.hf import HFCheckpoint  # noqa: E402
from youzhi_ms.config import SourceConfig, rope_inv_freq, rope_tables  # noqa: E402
from youzhi_ms.convert import adaptive, calibrate, latent_pca, pipeline  # noqa: E402
from youzhi_ms.convert.attention_np import block_output, gqa_qkv, rms_norm  # noqa: E402

T = defaultdict(float)  # wall seconds per phase
C = defaultdict(float)  # CPU seconds per phase (all threads): the work, less sensitive to a shared machine's load
N = defaultdict(int)


def timed(owner, name, phase):
    fn = getattr(owner, name)

    def wrap(*a, **k):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return fn(*a, **k)
        finally:
            T[phase] += time.perf_counter() - t0
            C[phase] += time.process_time() - c0
            N[phase] += 1

    setattr(owner, name, wrap)
    return fn


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--kv-lora-rank", type=int, required=True)
    ap.add_argument("--qk-rope-dim", type=int, required=True)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--proxy-seqs", type=int, default=8)
    ap.add_argument("--searches", default="exhaustive,fast")
    ap.add_argument("--max-candidates", type=int, default=48,
                    help="shortlist size at d = 128 (fewer: a shorter profile of the exhaustive search)")
    args = ap.parse_args()
    ck = HFCheckpoint(args.hf_dir)
    cfg = SourceConfig.from_hf(ck.config)
    base = pipeline.ConvertOptions(kv_lora_rank=args.kv_lora_rank, qk_rope_dim=args.qk_rope_dim,
                                   calib_tokens=args.calib_tokens, proxy_seqs=args.proxy_seqs, progress=False,
                                   max_candidates=args.max_candidates)
    rope, c = pipeline._check_options(cfg, base)
    ids = pipeline.calibration_windows(args.hf_dir, base.calib_text, base.calib_tokens, base.calib_seq_len, base.seed)
    Nw, S = ids.shape
    H, kv, d, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    inv, att = rope_inv_freq(d, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    cos, sin = rope_tables(inv, S, att)
    geo = calibrate.Geometry(n_heads=H, n_kv=kv, d=d, rope_dim=rope, rank=base.kv_lora_rank, eps=cfg.rms_norm_eps,
                             cos=cos, sin=sin)
    npx = min(base.proxy_seqs, Nw)
    t0 = time.perf_counter()
    emb = ck.take_rows("model.embed_tokens.weight", ids)
    h = {"conv": emb, "orig": emb[:npx]}
    for i in range(args.layer):  # layers before: uniform F = 4 keeps this set-up short and the same for every search
        w = calibrate.layer_weights(ck, i, cfg)
        src = {k: w[k] for k in ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo") if k in w}
        x = {k: rms_norm(v, w["ln1"], cfg.rms_norm_eps) for k, v in h.items()}
        st = calibrate.LayerStats(geo, src, x["conv"].reshape(-1, D), x["conv"].reshape(-1, D), "attn")
        m, _ = st.build(adaptive.uniform_bands(d, 4 if d // 2 >= 4 else c))
        h = {"conv": block_output(h["conv"], geo.mla(x["conv"], m), w, cfg.rms_norm_eps),
             "orig": block_output(h["orig"], geo.gqa(x["orig"], src), w, cfg.rms_norm_eps)}
    setup_s = time.perf_counter() - t0
    w = calibrate.layer_weights(ck, args.layer, cfg)
    src = {k: w[k] for k in ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo") if k in w}
    x = {k: rms_norm(v, w["ln1"], cfg.rms_norm_eps) for k, v in h.items()}
    a_orig = geo.gqa(x["orig"], src)
    a_loc, probs = geo.gqa(x["conv"][:npx], src, return_probs=True)

    timed(adaptive, "BandProxy", "proxy")
    timed(adaptive, "shortlist", "proxy")
    timed(calibrate.LayerStats, "rotation", "rotation")
    timed(calibrate, "build_layer", "latent")
    if hasattr(latent_pca, "LatentPCA"):
        timed(latent_pca.LatentPCA, "build", "latent")
    timed(calibrate.ResidualScore, "__call__", "score")
    results = []
    for search in args.searches.split(","):
        T.clear()
        C.clear()
        N.clear()
        opt = base if not hasattr(base, "freqfold_search") else dataclasses.replace(base, freqfold_search=search)
        t_all, c_all = time.perf_counter(), time.process_time()
        flat = x["conv"].reshape(-1, D)
        t1, c1 = time.perf_counter(), time.process_time()
        stats = calibrate.LayerStats(geo, src, keys_x=flat, pca_x=flat, pca_metric=opt.pca_metric,
                                     rorope_metric=opt.rorope_metric, damping=opt.damping)
        score = calibrate.ResidualScore(geo, w, h["conv"][:npx], h["orig"][:npx], a_orig[:npx], opt.score, a_loc,
                                        opt.score_stride)
        T["stats"] += time.perf_counter() - t1
        C["stats"] += time.process_time() - c1

        def band_proxy():
            q, k, _ = gqa_qkv(x["conv"][:npx], src, H, kv, d)
            return adaptive.BandProxy(q, k, probs, inv, kv, stats.moments, c, d ** -0.5).error

        dec = adaptive.decide(opt, args.layer, stats, score, geo, band_proxy)
        total, cpu = time.perf_counter() - t_all, time.process_time() - c_all
        res = {"search": search, "layer": args.layer, "choice": dec.name, "beta": dec.beta, "score": dec.score,
               "seconds": round(total, 2), "cpu_seconds": round(cpu, 2),
               "phases": {k: round(v, 2) for k, v in T.items()}, "cpu_phases": {k: round(v, 2) for k, v in C.items()},
               "calls": dict(N), "hf_dir": args.hf_dir, "rank": args.kv_lora_rank, "tokens": int(Nw * S),
               "proxy_windows": npx, "setup_seconds": round(setup_s, 1), "load": os.getloadavg()[0],
               "date": time.strftime("%Y-%m-%d %H:%M")}
        results.append(res)
        print(json.dumps(res), flush=True)
    if len(results) > 1:
        same = all((r["choice"], r["beta"]) == (results[0]["choice"], results[0]["beta"]) for r in results)
        print(f"same choice: {same}")


if __name__ == "__main__":
    main()
