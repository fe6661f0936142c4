#!/usr/bin/env python
"""Convert a Hugging Face GQA model (Llama / Qwen2 / Mistral / SmolLM2) into a DeepSeek-V3-style MLA model.

  python tools/convert_gqa_to_mla.py --hf-dir IN --output-dir OUT --kv-lora-rank 112 --qk-rope-dim 32 \
      [--freqfold adaptive|adaptive-layer|auto|N] [--calib-text wiki-calib|FILE] [--calib-tokens N] \
      [--export exact|deepseek] [--seed S]

The five stages, one module each in youzhi_ms/convert: 1 latent.py (GQA as a shared latent, exact) -> 2 rorope.py
(RoRoPE with FreqFold bands) -> 3 adaptive.py (the per-layer band choice) -> 4 latent_pca.py (joint K/V latent PCA to
the rank: attention-aware by default, TransMLA's balanced K/V PCA with --pca-metric bkv) -> 5 export.py (exact or stock
DeepSeek-V3); calibrate.py feeds them, pipeline.py runs them layer by layer. Deployment limits of the result are logged
as warnings. OUT gets config.json (with a `youzhi` block), model.safetensors, tokenizer files,
conversion_report.{json,md} and freqfold.png; it appears only when the conversion completes.
"""
import argparse
import logging

import _bootstrap  # noqa: F401

from youzhi_ms.cli import NONNEGATIVE, POSITIVE, ArgumentParser, int_at_least
from youzhi_ms.contract import read_config_json
from youzhi_ms.errors import YouzhiError, cli_main
from youzhi_ms.fsutil import OVERWRITE_HELP, check_output_dir


def read_plan(path: str) -> list:
    """Per-layer FreqFold bands [[start, F], ...] from an earlier conversion's config.json or conversion_report.json
    (each band is checked against the model when the conversion reaches its layer)."""
    src = read_config_json(path)
    try:
        plan = src["youzhi"]["freqfold"] if "youzhi" in src else [L["bands"] for L in src["layers"]]
        if not isinstance(plan, list) or not plan or not all(
                isinstance(layer, list) and layer and all(
                    isinstance(b, list) and len(b) == 2 and all(type(x) is int and x >= 0 for x in b)
                    for b in layer) for layer in plan):
            raise TypeError("not a list of per-layer [[start, F], ...] bands")
    except (KeyError, TypeError) as exc:
        raise YouzhiError(f"--freqfold-plan {path} holds no FreqFold plan ({exc}); pass the config.json or "
                          "conversion_report.json of an earlier conversion") from None
    return plan


class _WarningPrefix(logging.Formatter):
    """The converter logs its deployment warnings once; they read 'warning: ...' like every tool's warnings."""

    def format(self, record):
        text = super().format(record)
        return f"warning: {text}" if record.levelno >= logging.WARNING else text


@cli_main
def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="source Hugging Face GQA model directory")
    ap.add_argument("--output-dir", required=True, help="destination (Hugging Face DeepSeek-V3 directory)")
    ap.add_argument("--kv-lora-rank", type=POSITIVE, required=True,
                    help="latent rank r; cache = r + qk_rope_dim per layer")
    ap.add_argument("--qk-rope-dim", type=int_at_least(2), default=None,
                    help="decoupled rope head dim (default head_dim/2)")
    ap.add_argument("--freqfold", default="adaptive",
                    help="adaptive (per layer and per band), adaptive-layer (one F per layer), auto (TransMLA's "
                         "uniform doubling search), or an integer F for every layer (default adaptive)")
    ap.add_argument("--freqfold-plan", default=None,
                    help="reuse the per-layer bands of an earlier conversion (its config.json or report)")
    ap.add_argument("--calib-text", default="wiki-calib", help="wiki-calib or a .txt / .jsonl file")
    ap.add_argument("--calib-tokens", type=POSITIVE, default=16384)
    ap.add_argument("--calib-seq-len", type=int_at_least(2), default=256)
    ap.add_argument("--proxy-seqs", type=POSITIVE, default=8,
                    help="calibration windows the FreqFold candidates are scored on (default 8)")
    from youzhi_ms.convert.pipeline import ConvertOptions, convert
    choices, defaults = ConvertOptions.CHOICES, ConvertOptions.__dataclass_fields__
    ap.add_argument("--freqfold-search", choices=choices["freqfold_search"],
                    default=defaults["freqfold_search"].default,
                    help="how the adaptive modes build the band tilings they score: fast = from per-layer products, "
                         "in worker processes (default); exhaustive = each exactly as it would be exported (for "
                         "checking; several times slower). Both score every tiling on all positions and choose the "
                         "same (to float tolerance)")
    ap.add_argument("--search-survivors", type=NONNEGATIVE, default=defaults["search_survivors"].default,
                    help="fast search, successive halving: score every band tiling on a subsample first and only this "
                         "many on all positions (default 0: every tiling on all positions, the exhaustive search's "
                         "choice; e.g. 4 is quicker on large models but may drop a near-tie)")
    ap.add_argument("--search-balance-survivors", type=NONNEGATIVE,
                    default=defaults["search_balance_survivors"].default,
                    help="the same for the finalists' key/value balances (default 0: all on all positions)")
    ap.add_argument("--search-workers", type=NONNEGATIVE, default=defaults["search_workers"].default,
                    help="processes that score the FreqFold candidates (default 0: one per core, at most 8); the "
                         "choice does not depend on it")
    ap.add_argument("--freqfold-score", choices=choices["score"], default=defaults["score"].default,
                    help="what each FreqFold candidate is scored by against the source model: local-block = the "
                         "layer's output after its MLP on the same inputs (default); local = after attention only; "
                         "residual / normed = the residual stream with the converted prefix's drift (the issue's "
                         "recipe; measured worse on held-out text, docs/benchmarks.md section 2)")
    ap.add_argument("--export", choices=choices["export"], default=defaults["export"].default)
    ap.add_argument("--out-dtype", choices=choices["out_dtype"], default=defaults["out_dtype"].default,
                    help="dtype of the written checkpoint (the math runs in fp32/fp64 either way)")
    ap.add_argument("--pca-metric", choices=choices["pca_metric"], default=defaults["pca_metric"].default,
                    help="latent PCA: attn = attention-aware (queries and o_proj weight the error; default), "
                         "bkv = TransMLA's balanced K/V activation PCA")
    ap.add_argument("--stats", choices=choices["stats"], default=defaults["stats"].default,
                    help="where the RoRoPE and latent-PCA statistics come from: cascaded = each layer's inputs in the "
                         "converted model (default); standard = TransMLA's (source-model keys for RoRoPE, the "
                         "partial-RoPE model's inputs for the latent PCA)")
    ap.add_argument("--seed", type=NONNEGATIVE, default=0)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = ap.parse_args(argv)
    check_output_dir(args.output_dir, args.overwrite, [("--hf-dir", args.hf_dir), ("--calib-text", args.calib_text),
                                                       ("--freqfold-plan", args.freqfold_plan)])
    handler = logging.StreamHandler()
    handler.setFormatter(_WarningPrefix("%(message)s"))
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, handlers=[handler])
    plan = read_plan(args.freqfold_plan) if args.freqfold_plan else None
    opt = ConvertOptions(kv_lora_rank=args.kv_lora_rank, qk_rope_dim=args.qk_rope_dim, freqfold=args.freqfold,
                         calib_text=args.calib_text, calib_tokens=args.calib_tokens, calib_seq_len=args.calib_seq_len,
                         proxy_seqs=args.proxy_seqs, export=args.export, seed=args.seed, plan=plan,
                         out_dtype=args.out_dtype, pca_metric=args.pca_metric, stats=args.stats,
                         score=args.freqfold_score, freqfold_search=args.freqfold_search,
                         search_workers=args.search_workers, search_survivors=args.search_survivors,
                         search_balance_survivors=args.search_balance_survivors,
                         progress=not args.quiet)
    if opt.freqfold == "auto":  # judged by the converted MindSpore model: MindSpore is imported only for this mode
        from youzhi_ms.eval.auto_freqfold import convert_auto as convert
    rep = convert(args.hf_dir, args.output_dir, opt, overwrite=args.overwrite)
    print(f"converted to MLA r={rep['kv_lora_rank']}+{rep['qk_rope_head_dim']} ({rep['cache_ratio']:.2f}x smaller KV "
          f"cache), export={rep['export']}, freqfold={rep['freqfold_mode']}, {rep['seconds']} s -> {args.output_dir}")


if __name__ == "__main__":
    main()
