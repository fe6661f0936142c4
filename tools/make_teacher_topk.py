#!/usr/bin/env python
"""Offline teacher for GKD: run the teacher once over the training windows and store its top-k next-word
log-probabilities (and the tail mass) per token in one memory-mapped file; train with
`--set distill.offline_teacher=FILE` and no teacher in memory (on-policy batches, distill.lmbda > 0, still need the
live teacher).

  python tools/make_teacher_topk.py --config yaml_configs/distill_smollm2_mla.yaml --k 64 --out output/k64.topk \
      [--set model.student=... --set distill.teacher=...] [--steps 300 [--world 2] | --all-windows]
  python tools/make_teacher_topk.py --config ... --k 16 --from output/teacher_k256.topk --out output/teacher_k16.topk

The windows are the ones the trainer reads with the same config (train_dataset, seq_length, tokenizer, seed):
by default those its sampler visits in runner_config.max_steps (or --steps) steps of batch_size x --world x
accumulation rows; --all-windows stores the whole dataset. Log-probabilities are at distill.temperature (the
trainer refuses a file made at another temperature or seq_length). Interrupted runs resume from OUT.partial.
"""
import argparse

import _bootstrap  # noqa: F401

from youzhi_ms.cli import POSITIVE, ArgumentParser
from youzhi_ms.errors import cli_main


@cli_main
def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the training yaml (yaml_configs/*.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--k", type=POSITIVE, required=True, help="stored words per token (e.g. 16, 64, 256)")
    ap.add_argument("--out", required=True, help="the file to write (never replaced)")
    ap.add_argument("--steps", type=POSITIVE, default=None, help="windows of this many steps (default max_steps)")
    ap.add_argument("--world", type=POSITIVE, default=1, help="data-parallel workers of the training run")
    ap.add_argument("--all-windows", action="store_true", help="every window of the dataset")
    ap.add_argument("--from", dest="source", default=None, metavar="FILE",
                    help="derive from a top-k file with a larger k instead of running the teacher")
    ap.add_argument("--batch-size", type=POSITIVE, default=2)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    from youzhi_ms.train.run_config import load_run_config
    cfg = load_run_config(args.config, args.overrides)
    from youzhi_ms.runtime import init_context
    init_context("graph")
    from youzhi_ms.train.teacher_topk import write_teacher_topk
    steps = None if args.all_windows else (args.steps or cfg["runner_config"]["max_steps"])
    res = write_teacher_topk(cfg, args.out, args.k, steps, args.world, args.batch_size, args.source,
                             progress=not args.no_progress)
    print(f"wrote {res['path']}: top-{res['k']} of {res['windows']} windows")


if __name__ == "__main__":
    main()
