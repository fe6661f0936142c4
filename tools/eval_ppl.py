#!/usr/bin/env python
"""Perplexity of a source (GQA) or converted (MLA) model directory with the MindSpore model, by the fixed protocol
in youzhi_ms/eval/ppl.py (documents joined by the end-of-text token, non-overlapping windows, first token of each window
unscored).

  python tools/eval_ppl.py --model DIR --text wiki-eval [--seq-len 512] [--max-tokens N] [--json OUT]
  python tools/eval_ppl.py --model STUDENT_DIR --train-checkpoint RUN/checkpoint/step_00000100
"""
import argparse

import _bootstrap  # noqa: F401

from youzhi_ms.cli import POSITIVE, ArgumentParser, int_at_least
from youzhi_ms.errors import cli_main
from youzhi_ms.fsutil import OVERWRITE_HELP, check_output_file, write_json_output


@cli_main
def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face (or MindSpore-layout) model directory")
    ap.add_argument("--text", default="wiki-eval", help="wiki-eval | wiki-calib | news | a .txt or .jsonl file")
    ap.add_argument("--seq-len", type=int_at_least(2), default=512,
                    help="window length; every token but a window's first is scored (default 512)")
    ap.add_argument("--max-tokens", type=int_at_least(2), default=None, help="truncate the token stream first")
    ap.add_argument("--batch-size", type=POSITIVE, default=1)
    ap.add_argument("--train-checkpoint", default=None, metavar="STEP_DIR",
                    help="evaluate the student weights of a training checkpoint (OUTPUT/checkpoint/step_N) in --model's "
                         "architecture (the student directory the training started from)")
    ap.add_argument("--json", default=None, help="write the result as JSON here")
    ap.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = ap.parse_args(argv)
    inputs = [("--model", args.model), ("--text", args.text), ("--train-checkpoint", args.train_checkpoint)]
    if args.json is not None:
        check_output_file(args.json, args.overwrite, inputs)  # now, not after the evaluation
    from youzhi_ms.runtime import init_context
    init_context("graph")
    from youzhi_ms.eval.ppl import evaluate_dir
    res = evaluate_dir(args.model, args.text, args.seq_len, args.max_tokens, args.batch_size,
                       train_checkpoint=args.train_checkpoint, compile_cache=True)
    print(f"ppl {res['ppl']:.4f} on {res['tokens']} tokens ({res['windows']} windows of {res['seq_len']}) "
          f"text={args.text} model={args.model} [{res['seconds']} s]")
    if args.json is not None:
        write_json_output(args.json, res, args.overwrite, inputs)


if __name__ == "__main__":
    main()
