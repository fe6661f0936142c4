#!/usr/bin/env python
"""Multiple-choice accuracy by log-likelihood (lm-evaluation-harness style) for a source or converted model directory.

  python tools/eval_mcq.py --model DIR --data ceval/val --dev ceval/dev --shots 5 --json out.json
  python tools/eval_mcq.py --model DIR --data cmmlu/test --format cmmlu
  python tools/eval_mcq.py --model DIR --data questions.jsonl --score text

Formats: C-Eval csv (id,question,A,B,C,D,answer), CMMLU csv ((index),Question,A,B,C,D,Answer), jsonl
({"question", "choices": [...], "answer": 0-based int or letter, "subject"?}); a folder = all its files, one subject per
file unless a subject column is given. Each option is scored as the continuation " A"/" B"... (--score letters, the
default) or " <option text>" (--score text); acc uses the summed log-likelihood, acc_norm divides it by the option's
length in characters. The prompt template and the K-shot rule are documented in youzhi_ms/eval/mcq.py.
"""
import argparse

import _bootstrap  # noqa: F401

from youzhi_ms.cli import NONNEGATIVE, POSITIVE, ArgumentParser, int_at_least
from youzhi_ms.errors import cli_main
from youzhi_ms.fsutil import OVERWRITE_HELP, check_output_file, write_json_output


@cli_main
def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (source or converted)")
    ap.add_argument("--data", required=True, help="csv/jsonl file or a folder of them")
    ap.add_argument("--format", choices=("ceval", "cmmlu", "jsonl"), default=None, help="default: from the file")
    ap.add_argument("--shots", type=NONNEGATIVE, default=0, help="K-shot examples per question (default 0)")
    ap.add_argument("--dev", default=None, help="file/folder the K shots come from (default: the first K items of "
                                                "each subject, which are then not scored)")
    ap.add_argument("--score", choices=("letters", "text"), default="letters")
    ap.add_argument("--lang", choices=("zh", "en"), default=None, help="prompt language (default: zh for "
                                                                       "ceval/cmmlu, en for jsonl)")
    ap.add_argument("--batch-size", type=POSITIVE, default=8)
    ap.add_argument("--max-len", type=int_at_least(2), default=None,
                    help="longest input (default max_position_embeddings); longer prompts lose their oldest tokens")
    ap.add_argument("--limit", type=POSITIVE, default=None, help="score only the first N questions")
    ap.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's bos token")
    ap.add_argument("--json", default=None, help="write the summary and per-item log-likelihoods here")
    ap.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = ap.parse_args(argv)
    inputs = [("--model", args.model), ("--data", args.data), ("--dev", args.dev)]
    if args.json is not None:
        check_output_file(args.json, args.overwrite, inputs)  # now, not after the evaluation
    from youzhi_ms.runtime import init_context
    init_context("graph")
    from youzhi_ms.eval.mcq import evaluate_mcq
    res = evaluate_mcq(args.model, args.data, args.format, args.shots, args.dev, args.score, args.lang,
                       args.batch_size, args.max_len, args.limit, args.add_bos)
    width = max([len(s) for s in res["subjects"]] + [7])
    print(f"{'subject':<{width}}  {'n':>5}  {'acc':>6}  {'acc_norm':>8}")
    for s, v in res["subjects"].items():
        print(f"{s:<{width}}  {v['n']:>5}  {v['acc']:>6.4f}  {v['acc_norm']:>8.4f}")
    print(f"{'overall':<{width}}  {res['n']:>5}  {res['acc']:>6.4f}  {res['acc_norm']:>8.4f}  "
          f"(macro acc {res['acc_macro']:.4f}; {args.shots}-shot, {args.score}, {res['seconds']} s)")
    if args.json is not None:
        write_json_output(args.json, res, args.overwrite, inputs)


if __name__ == "__main__":
    main()
