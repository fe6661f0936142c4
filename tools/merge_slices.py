#!/usr/bin/env python
"""Merge the per-rank parameter slices of a model / pipeline parallel training run into one Hugging Face DeepSeek-V3
directory, with MindSpore's distributed-checkpoint tooling (merge_pipeline_strategys + unified_safetensors).

  python tools/merge_slices.py --run output/gkd_qwen2_5_7b_mla            # -> output/gkd_qwen2_5_7b_mla/hf_model
  python tools/merge_slices.py --run RUN --step 2000 --output-dir out/youzhi7b --dtype bf16

Reads RUN/checkpoint/step_N/rank_R/student.safetensors (every rank's; copy the other nodes' rank_R/ directories
here first), RUN/strategy/strategy_rank_R.ckpt and RUN/run_config.yaml (the student directory whose config.json and
tokenizer files are copied, and model.save_dtype). The newest step where every rank's slices are complete is used
unless --step is given. The output is written atomically (an existing directory is replaced only with --overwrite and
only if youzhi_ms wrote it) and loads with tools/eval_ppl.py, transformers and vLLM.
"""
import argparse

import _bootstrap  # noqa: F401

from youzhi_ms.cli import NONNEGATIVE, ArgumentParser
from youzhi_ms.errors import cli_main
from youzhi_ms.fsutil import OVERWRITE_HELP


@cli_main
def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the training run's output_dir")
    ap.add_argument("--step", type=NONNEGATIVE, default=None, help="checkpoint step (default: newest complete)")
    ap.add_argument("--output-dir", default=None, help="Hugging Face directory to write (default RUN/hf_model)")
    ap.add_argument("--strategy-dir", default=None, help="strategy files (default RUN/strategy)")
    ap.add_argument("--student-dir", default=None, help="the converted student the run started from "
                                                          "(default: model.student of RUN/run_config.yaml)")
    ap.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                    help="weights dtype (default: model.save_dtype of the run)")
    ap.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = ap.parse_args(argv)
    from youzhi_ms.train.merge_slices import merge_run
    merge_run(args.run, args.output_dir, args.step, args.strategy_dir, args.student_dir, args.dtype,
              overwrite=args.overwrite)


if __name__ == "__main__":
    main()
