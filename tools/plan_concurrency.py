#!/usr/bin/env python
"""Plan the KV cache of a model on one accelerator card and compare max concurrency (vLLM-style arithmetic).

Examples (from the repo root):
  python tools/plan_concurrency.py --model yaml_configs/model_configs/qwen2_5_7b \\
      --compare yaml_configs/model_configs/qwen2_5_7b_mla_r320
  python tools/plan_concurrency.py --model yaml_configs/model_configs/qwen2_5_7b --kv-lora-rank 512 --qk-rope-dim 64
  python tools/plan_concurrency.py --model yaml_configs/model_configs/qwen2_5_7b --target-ratio 2.69 --json plan.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import _bootstrap  # noqa: F401  (this checkout's youzhi_ms, even when another copy is installed)

from youzhi_ms.cli import POSITIVE, ArgumentParser, int_at_least, number  # noqa: E402
from youzhi_ms.contract import mla_config  # noqa: E402
from youzhi_ms.errors import YouzhiError, cli_main  # noqa: E402
from youzhi_ms.fsutil import (OVERWRITE_HELP, atomic_output_dir, check_output_dir, check_output_file,  # noqa: E402
                              write_json_output)
from youzhi_ms.infer import planner as P  # noqa: E402


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends '(default: X)' only where there is a default and the help does not already name it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        description="KV-cache concurrency planner: weights, KV bytes/token, paged blocks and vLLM's "
                    "'maximum concurrency' for one card, side by side for two models.",
        formatter_class=_DefaultsFormatter)
    ap.add_argument("--model", required=True, help="model directory, config.json or yaml config (the base model)")
    ap.add_argument("--compare", help="a second model (directory or config) to compare against --model")
    ap.add_argument("--kv-lora-rank", type=POSITIVE,
                    help="plan a hypothetical GQA->MLA conversion of --model with this kv_lora_rank")
    ap.add_argument("--qk-rope-dim", type=int_at_least(2), help="qk_rope_head_dim of the hypothetical conversion "
                    "(default: head_dim / 2)")
    ap.add_argument("--target-ratio", type=number(0, lo_open=True),
                    help="search the kv_lora_rank whose max-concurrency gain over --model is closest to this")
    ap.add_argument("--rank-multiple", type=POSITIVE, default=16,
                    help="ranks tried by --target-ratio are multiples of this")
    ap.add_argument("--rank-mode", choices=("closest", "reach"), default="closest",
                    help="closest: ratio nearest the target; reach: largest rank whose ratio is still >= target")
    ap.add_argument("--device-memory-gib", type=number(0, lo_open=True), default=64.0,
                    help="memory of one card (Ascend 910B: 64)")
    ap.add_argument("--memory-utilization", type=number(0, 1, lo_open=True), default=0.9,
                    help="vLLM --gpu-memory-utilization")
    ap.add_argument("--max-model-len", type=POSITIVE, default=4096, help="tokens per request")
    ap.add_argument("--block-size", type=POSITIVE, default=128, help="tokens per KV block (vLLM-Ascend: 128)")
    ap.add_argument("--dtype", default="bf16", help="weight and activation dtype: bf16, fp16, fp32")
    ap.add_argument("--kv-cache-dtype", help="KV-cache dtype (default: --dtype; also int8/fp8)")
    ap.add_argument("--max-num-batched-tokens", type=POSITIVE, default=8192,
                    help="tokens in vLLM's profile forward (activation reserve estimate)")
    ap.add_argument("--max-num-seqs", type=POSITIVE, default=256,
                    help="sequences in vLLM's sampler profile run (fp32 logits in the activation reserve)")
    ap.add_argument("--runtime-overhead-gib", type=number(0), default=1.0,
                    help="fixed allowance for runtime workspaces and communication buffers")
    ap.add_argument("--activation-reserve-gib", type=number(0),
                    help="use this activation reserve instead of the estimate (e.g. from a vLLM start-up log)")
    ap.add_argument("--write-mla-config", metavar="DIR",
                    help="with --kv-lora-rank/--target-ratio: write the converted model's DeepSeek-V3 config.json here")
    ap.add_argument("--json", metavar="OUT", help="also write all figures, warnings and the ratio to this JSON file")
    ap.add_argument("--no-mla-warnings", action="store_true",
                    help="do not print the MLA deployment limits (heads, rank, cache width, biases; --json still has "
                    "them) when the conversion printed them already, as in run_scripts/quickstart.sh; warnings "
                    "about fitting the card are still printed")
    ap.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return ap


def _table(plans, settings: P.PlanSettings) -> str:
    base = plans[0]
    rows = [
        ("attention", lambda p: f"{p.attention} ({p.model_type})"),
        ("parameters", lambda p: f"{p.num_params:,}"),
        (f"weights {settings.dtype} (GiB)", lambda p: P.fmt_gib(p.weight_bytes)),
        ("activation reserve (GiB)", lambda p: P.fmt_gib(p.activation_reserve_bytes)),
        ("KV budget (GiB)", lambda p: P.fmt_gib(p.kv_budget_bytes)),
        (f"KV bytes/token ({settings.kv_dtype})", lambda p: f"{p.kv_bytes_per_token:,}"),
        (f"KV blocks ({settings.block_size} tokens)", lambda p: f"{p.num_blocks:,}"),
        ("KV cache tokens", lambda p: f"{p.kv_cache_tokens:,}"),
        (f"max concurrency @{settings.max_model_len}", lambda p: f"{p.max_concurrency:.2f}"),
        (f"ratio vs {base.name}",
         lambda p: f"{p.max_concurrency / base.max_concurrency:.3f}x" if base.max_concurrency > 0 else "n/a"),
    ]
    header = [""] + [p.name for p in plans]
    body = [[label] + [fn(p) for p in plans] for label, fn in rows]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines = []
    for n, row in enumerate([header] + body):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _settings_line(s: P.PlanSettings) -> str:
    if s.activation_reserve_gib is not None:
        reserve = f"activation reserve fixed at {s.activation_reserve_gib:g} GiB"
    else:
        reserve = (f"activation reserve = profile estimate ({s.max_num_batched_tokens} batched tokens, "
                   f"{s.max_num_seqs} seqs of fp32 logits, {s.runtime_overhead_gib:g} GiB runtime)")
    return (f"device {s.device_memory_gib:g} GiB x {s.memory_utilization:g} utilization, {s.dtype} weights, "
            f"{s.kv_dtype} KV cache, block {s.block_size}, max-model-len {s.max_model_len}\n{reserve}")


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    hypothetical = args.kv_lora_rank is not None or args.target_ratio is not None
    if args.compare and hypothetical:
        raise YouzhiError("pass either --compare or --kv-lora-rank/--target-ratio, not both")
    if args.kv_lora_rank is not None and args.target_ratio is not None:
        raise YouzhiError("pass either --kv-lora-rank (plan one rank) or --target-ratio (search the rank), not both")
    if args.qk_rope_dim is not None and not hypothetical:
        raise YouzhiError("--qk-rope-dim only applies with --kv-lora-rank or --target-ratio")
    if args.write_mla_config and not hypothetical:
        raise YouzhiError("--write-mla-config needs --kv-lora-rank or --target-ratio (the conversion to describe)")
    inputs = [("--model", args.model), ("--compare", args.compare)]
    if args.write_mla_config:
        check_output_dir(args.write_mla_config, args.overwrite, inputs, "--write-mla-config")
    if args.json:
        check_output_file(args.json, args.overwrite, inputs)
    settings = P.PlanSettings(
        device_memory_gib=args.device_memory_gib, memory_utilization=args.memory_utilization,
        max_model_len=args.max_model_len, block_size=args.block_size, dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype, max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs, runtime_overhead_gib=args.runtime_overhead_gib,
        activation_reserve_gib=args.activation_reserve_gib).validate()

    shapes = [P.load_model_shape(args.model)]
    sources = [os.path.abspath(args.model)]
    search = None
    if args.compare:
        shapes.append(P.load_model_shape(args.compare))
        sources.append(os.path.abspath(args.compare))
        if shapes[1].name == shapes[0].name:
            shapes[1] = dataclasses.replace(shapes[1], name=shapes[1].name + " (compare)")
    elif args.target_ratio is not None:
        search = P.rank_for_ratio(shapes[0], args.target_ratio, settings, qk_rope_head_dim=args.qk_rope_dim,
                                  multiple=args.rank_multiple, mode=args.rank_mode)
        shapes.append(P.mla_shape_from_source(shapes[0], search.kv_lora_rank, search.qk_rope_head_dim))
        sources.append(f"hypothetical conversion of {sources[0]}")
    elif args.kv_lora_rank is not None:
        shapes.append(P.mla_shape_from_source(shapes[0], args.kv_lora_rank, args.qk_rope_dim))
        sources.append(f"hypothetical conversion of {sources[0]}")

    plans = [P.plan_concurrency(s, settings) for s in shapes]
    print(_settings_line(settings))
    print()
    print(_table(plans, settings))
    if search is not None:
        print()
        print(f"kv_lora_rank search (multiples of {args.rank_multiple}, mode {search.mode}, rope "
              f"{search.qk_rope_head_dim}, target {search.target_ratio:g}x): chosen r={search.kv_lora_rank} "
              f"-> {search.ratio:.3f}x")
        print("  neighbours: " + ", ".join(f"r={c['kv_lora_rank']}: {c['ratio']:.3f}x" for c in search.neighbours()))
    for p, shape in zip(plans, shapes):
        shown = [w for w in p.warnings if not (args.no_mla_warnings and w in P.mla_limits(shape))]
        for w in shown:
            print(f"warning [{p.name}]: {w}")

    if args.write_mla_config:
        cfg = mla_config(P.normalize_config(P.read_config_file(args.model)), shapes[1].kv_lora_rank,
                         shapes[1].qk_rope_head_dim, export="deepseek", torch_dtype=settings.dtype.lower())
        with atomic_output_dir(args.write_mla_config, args.overwrite, inputs, "--write-mla-config",
                               kind="config") as tmp:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(cfg, f, indent=2)
                f.write("\n")
        print(f"\nwrote {os.path.join(args.write_mla_config, 'config.json')}")
    if args.json:
        base = plans[0].max_concurrency
        models = []
        for shape, plan, src in zip(shapes, plans, sources):
            d = plan.to_dict()
            d["source"] = src
            d["shape"] = shape.to_dict()
            d["ratio"] = plan.max_concurrency / base if base > 0 else None
            models.append(d)
        out = {"settings": settings.to_dict(), "models": models}
        if len(plans) == 2:
            out["ratio"] = models[1]["ratio"]
        if search is not None:
            out["rank_search"] = {"target_ratio": search.target_ratio, "mode": search.mode,
                                  "multiple": args.rank_multiple, "kv_lora_rank": search.kv_lora_rank,
                                  "qk_rope_head_dim": search.qk_rope_head_dim, "ratio": search.ratio,
                                  "candidates": search.candidates}
        write_json_output(args.json, out, args.overwrite, inputs)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
