"""The GQA -> MLA conversion, layer by layer: calibrate, then the five stages (numbered as in README "How the conversion
works"): 1 shared latent, 2 RoRoPE, 3 the FreqFold band choice, 4 latent PCA, 5 export.

This file keeps the I/O, the resume and the report; each decision lives in its stage's file (`adaptive.choose` for the
bands and the key/value balance, `latent_pca.build_layer` for the compression, `export` for the stock-export refit).
Only the current layer's weights (plus embeddings and the calibration hidden states, see `calibrate`) are in memory.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional

import numpy as np

from youzhi_ms.checkpoint.hf import (HFCheckpoint, ShardedWriter, save_safetensors, write_json,
                                    write_model_files)
from youzhi_ms.config import SourceConfig, _rope_type, rope_inv_freq, rope_tables
from youzhi_ms.convert import adaptive, calibrate, journal
from youzhi_ms.convert.attention_np import block_output, gqa_qkv, rms_norm
from youzhi_ms.convert.calibrate import SCORES, STATS, Geometry, LayerStats, ResidualScore
from youzhi_ms.contract import check_rank, check_rope_dim, deployment_warnings, max_rank, mla_config
from youzhi_ms.convert.export import attention_token_weights, refit_kv_b
from youzhi_ms.convert.journal import LayerRecord
from youzhi_ms.convert.latent_pca import BALANCES
from youzhi_ms.convert.report import write_markdown, write_plot
from youzhi_ms.convert.rorope import describe_bands
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
    search_subsample: int = 4  # halving: subsample rounds on every search_subsample-th scored query position ...
    search_windows: int = 2  # ... of the first search_windows scoring windows
    search_survivors: int = 0  # fast search, > 0: halving, the subsample round's best tilings in full (0: all in full)
    search_balance_survivors: int = 0  # > 0: halving, the best (finalist, balance) pairs in full (0: all in full)
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
        for name in ("search_subsample", "search_windows", "score_stride", "finalists", "max_candidates"):
            if int(getattr(self, name)) < 1:
                raise YouzhiError(f"{name} {getattr(self, name)}: must be at least 1")
        for name in ("search_survivors", "search_balance_survivors"):
            if int(getattr(self, name)) < 0:
                raise YouzhiError(f"--{name.replace('_', '-')} {getattr(self, name)}: use 0 (every candidate in "
                                  "full) or a positive count")
        if int(self.search_workers) < 0:
            raise YouzhiError(f"--search-workers {self.search_workers}: use 0 (one per core) or a positive count")


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


def _inputs(src_dir: str, opt: ConvertOptions) -> list:
    return [("--hf-dir", src_dir), ("--calib-text", opt.calib_text)]


def convert(src_dir: str, out_dir: str, opt: ConvertOptions, overwrite: bool = False) -> dict:
    """Convert; returns the report dict. `out_dir` appears only when complete; `overwrite` lets it replace an earlier
    youzhi_ms output (see fsutil for the rule).

    The work directory (finished layers, for resuming) is kept after a failure only if it holds a finished layer, and
    the error says so; otherwise nothing is left behind."""
    check_output_dir(out_dir, overwrite, _inputs(src_dir, opt))
    work = journal.work_dir(out_dir)
    with output_lock(out_dir):  # one conversion per output at a time: the work directory is shared by name
        try:
            return _convert(src_dir, out_dir, opt, overwrite)
        except BaseException as exc:
            if isinstance(exc, OSError) and exc.filename is None:
                exc.filename = work  # a write through a file object names no file (the output's own are named inside)
            done = len(journal.read_records(work)[0]) if os.path.isfile(os.path.join(work, "meta.json")) else 0
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


@dataclass
class _Run:
    """What every layer of one conversion reads: the source, its geometry and the calibration windows."""
    ck: HFCheckpoint
    cfg: SourceConfig
    geo: Geometry
    ids: np.ndarray  # [N, S] calibration token windows
    inv_freq: np.ndarray
    full_rank: int
    proxy_windows: int
    standard: bool  # statistics 'standard' (TransMLA's) rather than 'cascaded'
    has_q_bias: bool
    has_kv_bias: bool
    R_id: Optional[np.ndarray]  # skip_pca: the identity latent rotation


def _setup(src_dir: str, opt: ConvertOptions) -> _Run:
    """Read the source and the calibration windows and check the options against them: every refusal before work."""
    ck = HFCheckpoint(src_dir)
    cfg = SourceConfig.from_hf(ck.config)
    rope, _ = _check_options(cfg, opt)
    if opt.freqfold == "auto":  # judged by running the converted MindSpore model, so it is not this package's
        raise YouzhiError("freqfold='auto' (TransMLA's perplexity search) runs through "
                          "youzhi_ms.eval.auto_freqfold.convert_auto, as tools/convert_gqa_to_mla.py does; call that")
    n_kv, head_dim, rank = cfg.num_kv_heads, cfg.head_dim, opt.kv_lora_rank
    if opt.calib_ids is not None:
        ids = np.asarray(opt.calib_ids)
    else:
        ids = calibration_windows(src_dir, opt.calib_text, opt.calib_tokens, opt.calib_seq_len, opt.seed)
    n_windows, seq_len = ids.shape
    full = max_rank(n_kv, head_dim, rope)
    if opt.skip_pca and rank != full:
        raise YouzhiError(f"skip_pca needs the maximal rank {full}")
    check_rank(rank, n_kv, head_dim, rope, tokens=n_windows * seq_len)
    if opt.plan is not None and len(opt.plan) != cfg.num_layers:
        raise YouzhiError(f"the FreqFold plan has {len(opt.plan)} layers, the model {cfg.num_layers}")
    inv, att = rope_inv_freq(head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    cos, sin = rope_tables(inv, seq_len, att)
    geo = Geometry(n_heads=cfg.num_heads, n_kv=n_kv, d=head_dim, rope_dim=rope, rank=rank, eps=cfg.rms_norm_eps,
                   cos=cos, sin=sin)
    return _Run(ck=ck, cfg=cfg, geo=geo, ids=ids, inv_freq=inv, full_rank=full,
                proxy_windows=min(opt.proxy_seqs, n_windows), standard=opt.stats == "standard",
                has_q_bias=any(n.endswith("self_attn.q_proj.bias") for n in ck.names()),
                has_kv_bias=any(n.endswith(("self_attn.k_proj.bias", "self_attn.v_proj.bias")) for n in ck.names()),
                R_id=np.eye(full) if opt.skip_pca else None)


def _first_streams(run: _Run) -> Dict[str, np.ndarray]:
    """The calibration hidden states before layer 0: conv, the converted model; orig, the source (all windows only
    when it feeds statistics); partial_rope, the partial-RoPE model, stage 2's output at full rank ('standard')."""
    cfg, D = run.cfg, run.cfg.hidden_size
    if run.ck.shape("model.embed_tokens.weight") != (cfg.vocab_size, D):
        run.ck.get("model.embed_tokens.weight", (cfg.vocab_size, D))  # raises the shape error
    emb = run.ck.take_rows("model.embed_tokens.weight", run.ids)  # [N,S,D]
    h = {"conv": emb, "orig": emb if run.standard else emb[:run.proxy_windows]}
    if run.standard:
        h["partial_rope"] = emb
    return h


def _convert_layer(run: _Run, opt: ConvertOptions, i: int, h: Dict[str, np.ndarray], progress):
    """Layer i: its decision, its MLA tensors, its record, and every stream pushed through its own version of it."""
    cfg, geo, npx, D = run.cfg, run.geo, run.proxy_windows, run.cfg.hidden_size
    w = calibrate.layer_weights(run.ck, i, cfg)
    src = {k: w[k] for k in ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo") if k in w}
    x = {k: rms_norm(v, w["ln1"], cfg.rms_norm_eps) for k, v in h.items()}
    a_orig = geo.gqa(x["orig"], src)
    flat = {k: v.reshape(-1, D) for k, v in x.items()}
    layer_stats = LayerStats(geo, src, keys_x=flat["orig" if run.standard else "conv"],
                       pca_x=flat["partial_rope" if run.standard else "conv"], pca_metric=opt.pca_metric,
                       rorope_metric=opt.rorope_metric, damping=opt.damping)
    a_loc, probs = geo.gqa(x["conv"][:npx], src, return_probs=True)
    objective = ResidualScore(geo, w, h["conv"][:npx], h["orig"][:npx], a_orig[:npx], opt.score, a_loc,
                              opt.score_stride)

    def band_proxy():
        q, k, _ = gqa_qkv(x["conv"][:npx], src, geo.n_heads, geo.n_kv, geo.d)
        return adaptive.BandProxy(q, k, probs, run.inv_freq, geo.n_kv, layer_stats.moments, geo.c, geo.d ** -0.5).error

    dec = adaptive.decide(opt, i, layer_stats, objective, geo, band_proxy, progress)
    m, info = layer_stats.build(dec.bands, dec.beta, R_override=run.R_id)
    a_conv = geo.mla(x["conv"], m)
    rec = LayerRecord(layer=i, bands=[list(b) for b in dec.bands], choice=dec.name, beta=dec.beta,
                      score=dec.score, scores=dec.scores, refined=dec.refined, coarse=dec.coarse,
                      coarse_balances=dec.coarse_balances, alpha=info["alpha"],
                      pca_energy_kept=info.get("pca_energy_kept", 1.0),
                      attn_rel_err=float(((a_conv[:npx] - a_loc).astype(np.float64) ** 2).sum()
                                         / (a_loc.astype(np.float64) ** 2).sum()))
    if opt.export == "deepseek":
        rec.refit = _stock_export_layer(m, flat["conv"], probs, len(run.ids), geo.rank, cfg.rms_norm_eps)
    elif run.has_kv_bias and "o_proj.bias" not in m:
        m["o_proj.bias"] = np.zeros(D, np.float32)  # attention_bias=true gives o_proj a bias in DeepSeek-V3
    nxt = {"conv": block_output(h["conv"], a_conv, w, cfg.rms_norm_eps),
           "orig": block_output(h["orig"], a_orig, w, cfg.rms_norm_eps)}
    if run.standard:
        m1, _ = layer_stats.build(dec.bands, 1.0, rank=run.full_rank, R_override=np.eye(run.full_rank))
        nxt["partial_rope"] = block_output(h["partial_rope"], geo.mla(x["partial_rope"], m1, rank=run.full_rank), w,
                                           cfg.rms_norm_eps)
    return m, rec, nxt


def _stock_export_layer(m: Dict[str, np.ndarray], conv_inputs: np.ndarray, probs: np.ndarray, n_windows: int,
                        rank: int, eps: float) -> Dict[str, float]:
    """The stock DeepSeek-V3 layer (`--export deepseek`): the latent RMSNorm folded in by refitting kv_b_proj, and no
    biases (the stock model has none). Changes m in place; returns the refit's errors."""
    latent = conv_inputs @ m["kv_a_proj_with_mqa.weight"][:rank].T
    norm_w, kv_b, err_norm_only, err_refit = refit_kv_b(latent, m["kv_b_proj.weight"],
                                                        attention_token_weights(probs, n_windows), eps)
    m["kv_b_proj.weight"] = kv_b
    m["kv_a_layernorm.weight"] = norm_w
    for b in ("q_proj.bias", "kv_a_proj_with_mqa.bias", "o_proj.bias"):
        m.pop(b, None)
    return {"rel_err_norm_only": err_norm_only, "rel_err_refit": err_refit}


def _convert(src_dir: str, out_dir: str, opt: ConvertOptions, overwrite: bool) -> dict:
    t0 = time.time()
    run = _setup(src_dir, opt)
    # Per-layer results go to a work directory next to the output, so an interrupted conversion resumes at the first
    # unfinished layer (same options and source); the output directory itself appears only when complete.
    work = journal.work_dir(out_dir)
    fingerprint = {"source": os.path.abspath(src_dir), "options": {k: v for k, v in opt.__dict__.items()
                                                                   if k not in ("progress", "calib_ids",
                                                                                "search_workers")},
                   "calib_sha": hashlib.sha256(np.ascontiguousarray(run.ids, np.int64).tobytes()).hexdigest()}
    records, h = journal.resume(work, fingerprint, {"conv", "orig"} | ({"partial_rope"} if run.standard else set()))
    if h is None:
        h = _first_streams(run)
    elif records:
        log.info("resuming the conversion at layer %d (%s)", len(records), work)
    n_layers = run.cfg.num_layers
    bar = ProgressBar(range(len(records), n_layers), desc=f"convert r={opt.kv_lora_rank}", unit="layer",
                      disable=not opt.progress, initial=len(records), total=n_layers)
    for i in bar:
        def progress(k, n, i=i):
            bar.set_postfix_str(f"layer {i}: scored {k}/{n} (band tiling, K/V balance) pairs", refresh=True)

        m, rec, h = _convert_layer(run, opt, i, h, progress)
        pre = f"model.layers.{i}.self_attn."
        save_safetensors(os.path.join(work, f"layer_{i:05d}.safetensors"), [(pre + k_, v_) for k_, v_ in m.items()])
        records.append(rec)
        journal.commit_layer(work, i, h, rec)
        bar.set_postfix(choice=rec.choice, err=f"{rec.score:.3g}")
        line = _layer_line(rec, describe_bands([tuple(b) for b in rec.bands]))
        if opt.progress:
            bar.write(line, file=sys.stderr)  # through the bar, so the line is not glued onto it
        else:
            log.info(line)
    report, config = _report_and_config(run, opt, src_dir, records, t0)
    with atomic_output_dir(out_dir, overwrite, _inputs(src_dir, opt)) as tmp:
        writer = ShardedWriter(tmp, dtype=opt.out_dtype, max_shard_bytes=1 << 30)
        _write_tensors(writer, run.ck, run.cfg, work, opt.progress)
        writer.close()
        write_model_files(tmp, config, src_dir)
        write_json(os.path.join(tmp, "conversion_report.json"), report)
        write_markdown(report, os.path.join(tmp, "conversion_report.md"))
        write_plot(report, os.path.join(tmp, "freqfold.png"))
    shutil.rmtree(work, ignore_errors=True)
    return report


def _report_and_config(run: _Run, opt: ConvertOptions, src_dir: str, records: List[LayerRecord], t0: float):
    """The conversion report (every layer's decision) and the DeepSeek-V3 config.json; logs the deployment warnings."""
    cfg, geo, (n_windows, seq_len) = run.cfg, run.geo, run.ids.shape
    rank, rope, latent_width = opt.kv_lora_rank, geo.rope_dim, geo.n_kv * geo.d
    mode = "plan" if opt.plan is not None else opt.freqfold
    report = {
        "source": os.path.abspath(src_dir), "source_model_type": cfg.arch, "export": opt.export,
        "kv_lora_rank": rank, "qk_rope_head_dim": rope, "collapse_c": geo.c, "freqfold_mode": mode,
        "pca_metric": opt.pca_metric, "stats": opt.stats, "freqfold_search": opt.freqfold_search,
        "calibration": {"text": opt.calib_text, "tokens": int(n_windows * seq_len), "seq_len": seq_len,
                        "seed": opt.seed, "proxy_tokens": int(run.proxy_windows * seq_len),
                        "score_stride": opt.score_stride},
        "cache_values_per_token_per_layer": {"gqa": 2 * latent_width, "mla": rank + rope},
        "cache_ratio": 2 * latent_width / (rank + rope),
        "layers": [rec.__dict__ for rec in records],
        "seconds": round(time.time() - t0, 1),
    }
    youzhi = {"freqfold_mode": mode, "freqfold": [rec.bands for rec in records],
              "freqfold_summary": [describe_bands([tuple(b) for b in rec.bands]) for rec in records],
              "kv_lora_rank": rank, "qk_rope_head_dim": rope, "source_model": os.path.abspath(src_dir),
              "source_architecture": run.ck.config.get("architectures", ["?"])[0],
              "calibration": report["calibration"], "stats": opt.stats, "pca_metric": opt.pca_metric}
    config = mla_config(run.ck.config, rank, rope, opt.export, torch_dtype=opt.out_dtype, q_bias=run.has_q_bias,
                        kv_bias=run.has_kv_bias, youzhi=youzhi)
    report["warnings"] = deployment_warnings(geo.n_heads, rank, rope, attention_bias=config["attention_bias"])
    for wmsg in report["warnings"]:
        log.warning(wmsg)
    return report, config


def _layer_line(rec: LayerRecord, bands: str) -> str:
    beta = f", K/V balance {rec.beta:g}" if rec.refined else ""
    others = sorted(rec.scores.values())
    first = f", {len(rec.coarse)} tried on a subsample" if rec.coarse else ""
    runner = (f" (next best {others[1]:.4f} of {len(others)} band tilings scored in full{first})"
              if len(others) > 1 else "")
    return (f"layer {rec.layer:3d}: {rec.choice:<14s} bands {bands:<18s} residual error {rec.score:.4f}{runner}"
            f"{beta}, attention error {rec.attn_rel_err:.4f}")


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
