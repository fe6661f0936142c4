"""The GQA -> MLA conversion, layer by layer: calibrate, then the five stages (numbered as in README "How the conversion
works"): 1 shared latent, 2 RoRoPE, 3 the FreqFold band choice, 4 latent PCA, 5 export.

This file keeps the I/O, the resume and the report; each decision lives in its stage's file (`adaptive.choose` for the
bands and the key/value balance, `latent_pca.build_layer` for the compression, `export` for the stock-export refit).
Only the current layer's weights (plus embeddings and the calibration hidden states, see `calibrate`) are in memory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional

import numpy as np

from youzhi_ms.checkpoint.hf import (HFCheckpoint, ShardedWriter, save_safetensors, write_json,
                                    write_model_files)
from youzhi_ms.config import SourceConfig, _rope_type, rope_inv_freq, rope_tables
from youzhi_ms.convert import adaptive, calibrate
from youzhi_ms.convert.attention_np import block_output, rms_norm
from youzhi_ms.convert.calibrate import SCORES, STATS, Geometry, LayerStats, ResidualScore
from youzhi_ms.contract import check_rank, check_rope_dim, deployment_warnings, max_rank, mla_config
from youzhi_ms.convert.export import attention_token_weights, refit_kv_b
from youzhi_ms.convert.latent_pca import BALANCES
from youzhi_ms.convert.rorope import describe_bands, uniform_bands, validate_bands
from youzhi_ms.convert.score_workers import default_workers
from youzhi_ms.errors import YouzhiError
from youzhi_ms.fsutil import atomic_output_dir, check_output_dir, output_lock
from youzhi_ms.progress import ProgressBar

log = logging.getLogger("youzhi_ms.convert")


@dataclass
class ConvertOptions:
    kv_lora_rank: int
    qk_rope_dim: Optional[int] = None
    freqfold: str = "adaptive"  # adaptive | adaptive-layer | auto | <int>
    calib_text: str = "wiki-calib"
    calib_tokens: int = 16384
    calib_seq_len: int = 256
    proxy_seqs: int = 8  # calibration windows the candidates are scored on
    export: str = "exact"  # exact | deepseek
    seed: int = 0
    damping: float = 0.01
    plan: Optional[List[List[List[int]]]] = None  # per-layer bands, overrides the search
    progress: bool = True
    out_dtype: str = "fp32"  # fp32 | bf16 | fp16 for the written checkpoint
    calib_ids: Optional[np.ndarray] = None  # [N, S] token windows given directly (library use, tests)
    skip_pca: bool = False  # partial-RoPE stage only: no PCA rotation of the latent (needs the maximal rank)
    pca_metric: str = "attn"  # attn (attention-aware, youzhi_ms) | bkv (TransMLA's balanced K/V PCA)
    rorope_metric: str = "k"  # k (TransMLA: key energy) | qk (query-key product energy) for the per-band PCA
    betas: tuple = BALANCES  # key/value balance multipliers tried per layer with pca_metric=attn
    stats: str = "cascaded"  # cascaded | standard: where RoRoPE's and the latent PCA's statistics come from
    max_candidates: int = 48  # above this, the band proxy shortlists the adaptive candidates
    finalists: int = 3  # candidates re-scored over the key/value balances
    score: str = "local-block"  # the error the FreqFold and balance decisions minimise (calibrate.SCORES)
    score_stride: int = 2  # the score reads every score_stride-th query position of the proxy windows
    freqfold_search: str = "fast"  # fast | exhaustive: how the adaptive candidates are scored (CHOICES)
    search_subsample: int = 4  # fast search: first round on every search_subsample-th scored query position ...
    search_windows: int = 2  # ... of the first search_windows scoring windows
    search_survivors: int = 4  # fast search: tilings of the first round scored in full
    search_balance_survivors: int = 3  # fast search: (finalist, balance) pairs of the coarse balance round in full
    search_workers: int = 0  # processes scoring the candidates (0: one per core, at most 8); results do not depend on it

    # every option with a fixed set of values: its choices, defined here once (the CLI reads them from here)
    CHOICES: ClassVar[Dict[str, tuple]] = {
        "freqfold_search": ("fast", "exhaustive"), "score": SCORES, "pca_metric": ("attn", "bkv"),
        "rorope_metric": ("k", "qk"), "stats": STATS, "export": ("exact", "deepseek"),
        "out_dtype": ("fp32", "bf16", "fp16")}

    FLAGS: ClassVar[Dict[str, str]] = {"score": "--freqfold-score", "rorope_metric": "rorope_metric (library only)"}

    def __post_init__(self):
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                flag = self.FLAGS.get(name, "--" + name.replace("_", "-"))
                raise YouzhiError(f"{flag} {getattr(self, name)!r}: use one of {', '.join(allowed)}")
        for name in ("search_subsample", "search_windows", "search_survivors", "search_balance_survivors",
                     "score_stride", "finalists", "max_candidates"):
            if int(getattr(self, name)) < 1:
                raise YouzhiError(f"{name} {getattr(self, name)}: must be at least 1")
        if int(self.search_workers) < 0:
            raise YouzhiError(f"--search-workers {self.search_workers}: use 0 (one per core) or a positive count")


@dataclass
class LayerRecord:
    layer: int
    bands: List[List[int]]
    choice: str
    beta: float = 1.0
    score: float = 0.0  # the FreqFold score of the built layer (what the search minimised; opt.score's kind)
    attn_rel_err: float = 0.0  # the built layer's attention error against the source attention on the same inputs
    scores: Dict[str, float] = field(default_factory=dict)  # candidates scored in full at balance 1
    refined: Dict[str, float] = field(default_factory=dict)  # finalists x balances
    coarse: Dict[str, float] = field(default_factory=dict)  # fast search: every candidate on the subsample
    coarse_balances: Dict[str, float] = field(default_factory=dict)  # fast search: finalist x balance on the subsample
    alpha: float = 0.0
    pca_energy_kept: float = 0.0
    refit: Optional[Dict[str, float]] = None


def calibration_windows(src_dir: str, text: str, tokens: int, seq_len: int, seed: int) -> np.ndarray:
    from youzhi_ms.data.text import load_token_stream
    from youzhi_ms.data.tokenizer import Tokenizer
    stream = load_token_stream(text, Tokenizer.from_dir(src_dir))
    n_avail = len(stream) // seq_len
    n = max(1, tokens // seq_len)
    if n > n_avail:
        raise YouzhiError(f"--calib-tokens {tokens} asks for {n} windows of {seq_len} but {text} has only "
                          f"{n_avail * seq_len} tokens; lower --calib-tokens or give a larger --calib-text")
    win = stream[: n_avail * seq_len].reshape(n_avail, seq_len)
    idx = np.sort(np.random.default_rng(seed).choice(n_avail, n, replace=False))
    return win[idx]


def _check_options(cfg: SourceConfig, opt: ConvertOptions):
    d = cfg.head_dim
    rope = check_rope_dim(d // 2 if opt.qk_rope_dim is None else opt.qk_rope_dim, d)
    c = d // rope
    if _rope_type(cfg.rope_scaling) == "yarn":
        raise YouzhiError("yarn rope_scaling is not supported by the converter (DeepSeek-V3's yarn differs from the "
                          "source's on the folded frequencies); convert the model without rope_scaling")
    if opt.freqfold not in adaptive.MODES + ("auto",):
        try:
            F = int(opt.freqfold)
        except ValueError:
            raise YouzhiError(f"--freqfold {opt.freqfold!r}: use adaptive, adaptive-layer, auto or an integer F")
        if F % c or F < c or F > d // 2 or F & (F - 1):
            raise YouzhiError(f"--freqfold {F} must be a power-of-two multiple of c = head_dim/qk_rope_dim = {c} and "
                              f"at most head_dim/2 = {d // 2} (valid: {adaptive.fold_sizes(d, c)})")
    check_rank(opt.kv_lora_rank, cfg.num_kv_heads, d, rope)
    return rope, c


def _decide(opt: ConvertOptions, i: int, stats: LayerStats, score: ResidualScore, geo: Geometry,
            band_proxy, progress=None) -> adaptive.Decision:
    """The layer's FreqFold bands and key/value balance: given (plan, uniform F) or searched (adaptive modes)."""
    d, c = geo.d, geo.c
    if opt.plan is not None:
        bands = [tuple(b) for b in opt.plan[i]]
        validate_bands(bands, d, c)
        cands = {"plan": bands}
    elif opt.freqfold in adaptive.MODES:
        cands = adaptive.layer_candidates(opt.freqfold, d, c)
        if len(cands) > opt.max_candidates:
            cands = adaptive.shortlist(cands, band_proxy(), opt.max_candidates)
    else:
        cands = {f"F={int(opt.freqfold)}": uniform_bands(d, int(opt.freqfold))}
    betas = opt.betas if opt.pca_metric == "attn" and not opt.skip_pca else (1.0,)
    R_id = np.eye(max_rank(geo.n_kv, d, geo.rope_dim)) if opt.skip_pca else None
    # fast: candidates built from per-layer products (LatentPCA, the same layers to float tolerance) and scored in two
    # rounds (all on a subsample of the query positions, the best few on all); exhaustive: every candidate built as
    # it is exported and scored on all positions. The exported layer is built by stats.build either way.
    fast = opt.freqfold_search == "fast"
    build = stats.fast_build if fast else stats.build
    workers = opt.search_workers or default_workers()
    if workers > 1:  # what every candidate reads, computed once here so the forked workers share it
        stats.prepare_search(cands.values(), fast)

    def score_of(bands, beta):
        return score(build(bands, beta, R_override=R_id)[0])

    coarse_of = None
    if fast:
        coarse = score.subsample(opt.search_subsample, opt.search_windows)

        def coarse_of(bands, beta):
            return coarse(build(bands, beta, R_override=R_id)[0])

    return adaptive.choose(cands, score_of, betas, opt.finalists, progress, coarse_of, opt.search_survivors, workers,
                           opt.search_balance_survivors)


def _inputs(src_dir: str, opt: ConvertOptions) -> list:
    return [("--hf-dir", src_dir), ("--calib-text", opt.calib_text)]


def _work_dir(out_dir: str) -> str:
    out = os.path.abspath(os.path.expanduser(out_dir))  # '~/x' is the home folder's (as the output rule reads it)
    return os.path.join(os.path.dirname(out), "." + os.path.basename(out) + ".partial")


def convert(src_dir: str, out_dir: str, opt: ConvertOptions, overwrite: bool = False) -> dict:
    """Convert; returns the report dict. `out_dir` appears only when complete; `overwrite` lets it replace an earlier
    youzhi_ms output (see fsutil for the rule).

    The work directory (finished layers, for resuming) is kept after a failure only if it holds a finished layer, and
    the error says so; otherwise nothing is left behind."""
    check_output_dir(out_dir, overwrite, _inputs(src_dir, opt))
    work = _work_dir(out_dir)
    with output_lock(out_dir):  # one conversion per output at a time: the work directory is shared by name
        try:
            return _convert(src_dir, out_dir, opt, overwrite)
        except BaseException as exc:
            if isinstance(exc, OSError) and exc.filename is None:
                exc.filename = work  # a write through a file object names no file (the output's own are named inside)
            done = len(_read_records(work)[0]) if os.path.isfile(os.path.join(work, "meta.json")) else 0
            if done == 0:
                if os.path.isfile(os.path.join(work, "meta.json")):
                    shutil.rmtree(work, ignore_errors=True)
                raise
            note = (f"{done} converted layer(s) are kept in {work}: run the same command again to resume there, or "
                    "delete that directory")
            if isinstance(exc, YouzhiError):
                raise YouzhiError(f"{exc} ({note})") from None
            exc.add_note(note)  # shown in the error / interrupt line
            raise


def _convert(src_dir: str, out_dir: str, opt: ConvertOptions, overwrite: bool) -> dict:
    t0 = time.time()
    ck = HFCheckpoint(src_dir)
    cfg = SourceConfig.from_hf(ck.config)
    rope, c = _check_options(cfg, opt)
    if opt.freqfold == "auto":  # judged by running the converted MindSpore model, so it is not this package's
        raise YouzhiError("freqfold='auto' (TransMLA's perplexity search) runs through "
                          "youzhi_ms.eval.auto_freqfold.convert_auto, as tools/convert_gqa_to_mla.py does; call that")
    H, kv, d, D, r = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, opt.kv_lora_rank
    if opt.calib_ids is not None:
        ids = np.asarray(opt.calib_ids)
    else:
        ids = calibration_windows(src_dir, opt.calib_text, opt.calib_tokens, opt.calib_seq_len, opt.seed)
    N, S = ids.shape
    full = max_rank(kv, d, rope)
    if opt.skip_pca and r != full:
        raise YouzhiError(f"skip_pca needs the maximal rank {full}")
    R_id = np.eye(full) if opt.skip_pca else None
    check_rank(r, kv, d, rope, tokens=N * S)
    if opt.plan is not None and len(opt.plan) != cfg.num_layers:
        raise YouzhiError(f"the FreqFold plan has {len(opt.plan)} layers, the model {cfg.num_layers}")

    inv, att = rope_inv_freq(d, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    cos, sin = rope_tables(inv, S, att)
    geo = Geometry(n_heads=H, n_kv=kv, d=d, rope_dim=rope, rank=r, eps=cfg.rms_norm_eps, cos=cos, sin=sin)
    has_q_bias = any(n.endswith("self_attn.q_proj.bias") for n in ck.names())
    has_kv_bias = any(n.endswith(("self_attn.k_proj.bias", "self_attn.v_proj.bias")) for n in ck.names())
    npx = min(opt.proxy_seqs, N)
    standard = opt.stats == "standard"

    # Per-layer results go to a work directory next to the output, so an interrupted conversion resumes at the first
    # unfinished layer (same options and source); the output directory itself appears only when complete.
    work = _work_dir(out_dir)
    fingerprint = {"source": os.path.abspath(src_dir), "options": {k: v for k, v in opt.__dict__.items()
                                                                   if k not in ("progress", "calib_ids",
                                                                                "search_workers")},
                   "calib_sha": hashlib.sha256(np.ascontiguousarray(ids, np.int64).tobytes()).hexdigest()}
    records, h = _resume(work, fingerprint, {"conv", "orig"} | ({"partial_rope"} if standard else set()))
    if h is None:
        if ck.shape("model.embed_tokens.weight") != (cfg.vocab_size, D):
            ck.get("model.embed_tokens.weight", (cfg.vocab_size, D))  # raises the shape error
        emb = ck.take_rows("model.embed_tokens.weight", ids)  # [N,S,D]
        # conv: the converted model; orig: the source (all windows only when it feeds statistics); partial_rope:
        # the partial-RoPE model, stage 2's output at full rank (statistics 'standard')
        h = {"conv": emb, "orig": emb if standard else emb[:npx]}
        if standard:
            h["partial_rope"] = emb
    elif records:
        log.info("resuming the conversion at layer %d (%s)", len(records), work)
    bar = ProgressBar(range(len(records), cfg.num_layers), desc=f"convert r={r}", unit="layer",
                      disable=not opt.progress, initial=len(records), total=cfg.num_layers)
    for i in bar:
        w = calibrate.layer_weights(ck, i, cfg)
        src = {k: w[k] for k in ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo") if k in w}
        x = {k: rms_norm(v, w["ln1"], cfg.rms_norm_eps) for k, v in h.items()}
        a_orig = geo.gqa(x["orig"], src)
        flat = {k: v.reshape(-1, D) for k, v in x.items()}
        stats = LayerStats(geo, src, keys_x=flat["orig" if standard else "conv"],
                           pca_x=flat["partial_rope" if standard else "conv"], pca_metric=opt.pca_metric,
                           rorope_metric=opt.rorope_metric, damping=opt.damping)
        a_loc, probs = geo.gqa(x["conv"][:npx], src, return_probs=True)
        score = ResidualScore(geo, w, h["conv"][:npx], h["orig"][:npx], a_orig[:npx], opt.score, a_loc,
                              opt.score_stride)

        def band_proxy():
            from youzhi_ms.convert.attention_np import gqa_qkv
            q, k, _ = gqa_qkv(x["conv"][:npx], src, H, kv, d)
            return adaptive.BandProxy(q, k, probs, inv, kv, stats.moments, c, d ** -0.5).error

        dec = _decide(opt, i, stats, score, geo, band_proxy,
                      lambda k, n: bar.set_postfix_str(f"layer {i}: scored {k}/{n} (band tiling, K/V balance) pairs",
                                                       refresh=True))
        m, info = stats.build(dec.bands, dec.beta, R_override=R_id)
        a_conv = geo.mla(x["conv"], m)
        rec = LayerRecord(layer=i, bands=[list(b) for b in dec.bands], choice=dec.name, beta=dec.beta,
                          score=dec.score, scores=dec.scores, refined=dec.refined, coarse=dec.coarse,
                          coarse_balances=dec.coarse_balances,
                          alpha=info["alpha"],
                          pca_energy_kept=info.get("pca_energy_kept", 1.0),
                          attn_rel_err=float(((a_conv[:npx] - a_loc).astype(np.float64) ** 2).sum()
                                             / (a_loc.astype(np.float64) ** 2).sum()))
        if opt.export == "deepseek":
            lat = flat["conv"] @ m["kv_a_proj_with_mqa.weight"][:r].T
            wts = attention_token_weights(probs, N)
            norm_w, kvb, e0, e1 = refit_kv_b(lat, m["kv_b_proj.weight"], wts, cfg.rms_norm_eps)
            m["kv_b_proj.weight"] = kvb
            m["kv_a_layernorm.weight"] = norm_w
            for b in ("q_proj.bias", "kv_a_proj_with_mqa.bias", "o_proj.bias"):
                m.pop(b, None)
            rec.refit = {"rel_err_norm_only": e0, "rel_err_refit": e1}
        elif has_kv_bias and "o_proj.bias" not in m:
            m["o_proj.bias"] = np.zeros(D, np.float32)  # attention_bias=true gives o_proj a bias in DeepSeek-V3
        pre = f"model.layers.{i}.self_attn."
        save_safetensors(os.path.join(work, f"layer_{i:05d}.safetensors"), [(pre + k_, v_) for k_, v_ in m.items()])
        # propagate every stream through its own version of the layer
        nxt = {"conv": block_output(h["conv"], a_conv, w, cfg.rms_norm_eps),
               "orig": block_output(h["orig"], a_orig, w, cfg.rms_norm_eps)}
        if standard:
            m1, _ = stats.build(dec.bands, 1.0, rank=full, R_override=np.eye(full))
            nxt["partial_rope"] = block_output(h["partial_rope"], geo.mla(x["partial_rope"], m1, rank=full), w,
                                               cfg.rms_norm_eps)
        h = nxt
        records.append(rec)
        _commit_layer(work, i, h, rec)
        bar.set_postfix(choice=rec.choice, err=f"{rec.score:.3g}")
        line = _layer_line(rec, describe_bands(dec.bands))
        if opt.progress:
            bar.write(line, file=sys.stderr)  # through the bar, so the line is not glued onto it
        else:
            log.info(line)
        del w, x, flat, stats
    L = kv * d
    mode = "plan" if opt.plan is not None else opt.freqfold
    report = {
        "source": os.path.abspath(src_dir), "source_model_type": cfg.arch, "export": opt.export,
        "kv_lora_rank": r, "qk_rope_head_dim": rope, "collapse_c": c, "freqfold_mode": mode,
        "pca_metric": opt.pca_metric, "stats": opt.stats, "freqfold_search": opt.freqfold_search,
        "calibration": {"text": opt.calib_text, "tokens": int(N * S), "seq_len": S, "seed": opt.seed,
                        "proxy_tokens": int(npx * S), "score_stride": opt.score_stride},
        "cache_values_per_token_per_layer": {"gqa": 2 * L, "mla": r + rope},
        "cache_ratio": 2 * L / (r + rope),
        "layers": [rec.__dict__ for rec in records],
        "seconds": round(time.time() - t0, 1),
    }
    youzhi = {"freqfold_mode": mode, "freqfold": [rec.bands for rec in records],
              "freqfold_summary": [describe_bands([tuple(b) for b in rec.bands]) for rec in records],
              "kv_lora_rank": r, "qk_rope_head_dim": rope, "source_model": os.path.abspath(src_dir),
              "source_architecture": ck.config.get("architectures", ["?"])[0],
              "calibration": report["calibration"], "stats": opt.stats, "pca_metric": opt.pca_metric}
    config = mla_config(ck.config, r, rope, opt.export, torch_dtype=opt.out_dtype, q_bias=has_q_bias,
                        kv_bias=has_kv_bias, youzhi=youzhi)
    report["warnings"] = deployment_warnings(H, r, rope, attention_bias=config["attention_bias"])
    for wmsg in report["warnings"]:
        log.warning(wmsg)
    with atomic_output_dir(out_dir, overwrite, _inputs(src_dir, opt)) as tmp:
        writer = ShardedWriter(tmp, dtype=opt.out_dtype, max_shard_bytes=1 << 30)
        _write_tensors(writer, ck, cfg, work, opt.progress)
        writer.close()
        write_model_files(tmp, config, src_dir)
        write_json(os.path.join(tmp, "conversion_report.json"), report)
        from youzhi_ms.convert.report import write_markdown, write_plot
        write_markdown(report, os.path.join(tmp, "conversion_report.md"))
        write_plot(report, os.path.join(tmp, "freqfold.png"))
    shutil.rmtree(work, ignore_errors=True)
    return report


def _layer_line(rec: LayerRecord, bands: str) -> str:
    beta = f", K/V balance {rec.beta:g}" if rec.refined else ""
    others = sorted(rec.scores.values())
    first = f", {len(rec.coarse)} tried on a subsample" if rec.coarse else ""
    runner = (f" (next best {others[1]:.4f} of {len(others)} band tilings scored in full{first})"
              if len(others) > 1 else "")
    return (f"layer {rec.layer:3d}: {rec.choice:<14s} bands {bands:<18s} residual error {rec.score:.4f}{runner}"
            f"{beta}, attention error {rec.attn_rel_err:.4f}")


def _read_records(work: str):
    """(records, lines): the longest prefix of records.jsonl that parses. A process killed while appending leaves a
    torn last line; like a database log tail it is dropped, and that layer is converted again."""
    path = os.path.join(work, "records.jsonl")
    recs, lines = [], []
    if not os.path.isfile(path):
        return recs, lines
    with open(path, "rb") as f:
        for raw in f:
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError("torn line")
                rec = LayerRecord(**json.loads(raw.decode("utf-8")))
                if rec.layer != len(recs):
                    raise ValueError("out of order")
            except (ValueError, TypeError):
                break
            recs.append(rec)
            lines.append(raw)
    return recs, lines


def _resume(work: str, fingerprint: dict, streams: set):
    """(records, hidden-state streams) of a matching unfinished conversion, else a fresh work dir and ([], None). A
    work dir whose saved streams are not `streams` (e.g. left by a build that named them otherwise) is not resumed."""
    meta = os.path.join(work, "meta.json")
    if os.path.isfile(meta):
        try:
            with open(meta, encoding="utf-8") as f:
                same = json.load(f) == json.loads(json.dumps(fingerprint))
        except (OSError, ValueError):
            same = False
        if same:
            recs, lines = _read_records(work)
            hid = os.path.join(work, f"hidden_{len(recs):05d}.npz")
            if recs and os.path.isfile(hid):
                try:
                    with np.load(hid, allow_pickle=False) as z:
                        h = {k: z[k] for k in z.files}
                except (OSError, ValueError):
                    h = None
                if h is not None and set(h) == streams:
                    _rewrite_records(work, lines)
                    return recs, h
        log.info("discarding an unfinished conversion with other options in %s", work)
    elif os.path.isdir(work) and os.listdir(work):
        raise YouzhiError(f"{work} exists but is not a youzhi_ms conversion work directory (no meta.json); the "
                          "conversion keeps its resumable state there: move that directory away")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    write_json(meta, fingerprint)
    return [], None


def _rewrite_records(work: str, lines: list) -> None:
    """records.jsonl cut back to its valid prefix (through a temp file), so later appends follow a whole line."""
    path = os.path.join(work, "records.jsonl")
    with open(path + ".tmp", "wb") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def _commit_layer(work: str, i: int, h: Dict[str, np.ndarray], rec: "LayerRecord") -> None:
    """Hidden states after layer i, then the record line (the commit point), then drop the previous states."""
    tmp = os.path.join(work, "hidden.tmp.npz")
    np.savez(tmp, **h)
    os.replace(tmp, os.path.join(work, f"hidden_{i + 1:05d}.npz"))
    with open(os.path.join(work, "records.jsonl"), "a") as f:
        f.write(json.dumps(rec.__dict__) + "\n")
    prev = os.path.join(work, f"hidden_{i:05d}.npz")
    if os.path.exists(prev):
        os.remove(prev)


def _write_tensors(writer, ck: HFCheckpoint, cfg: SourceConfig, work: str, progress: bool) -> None:
    """Converted attention from the work dir, everything else straight from the source, one tensor at a time."""
    names = ["model.embed_tokens.weight"]
    for i in ProgressBar(range(cfg.num_layers), desc="write", unit="layer", disable=not progress):
        layer = HFCheckpoint.from_file(os.path.join(work, f"layer_{i:05d}.safetensors"))
        for n in sorted(layer.names()):
            writer.add(n, layer.get(n))
        p = f"model.layers.{i}."
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                  "mlp.up_proj.weight", "mlp.down_proj.weight"):
            _copy(writer, ck, p + n)
    names.append("model.norm.weight")
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    for n in names:
        _copy(writer, ck, n)


def _copy(writer, ck: HFCheckpoint, name: str) -> None:
    """An unchanged tensor: its stored bits when the dtype already matches, else re-encoded; in chunks either way, so
    a 1 GB embedding never sits in memory whole."""
    if ck.dtype(name) == writer.st_dtype:
        writer.add_file_range(name, ck.dtype(name), ck.shape(name), *ck.file_range(name))
    else:
        writer.add_blocks(name, ck.shape(name), ck.row_blocks(name))
