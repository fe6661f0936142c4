#!/usr/bin/env python
"""Write a small chat jsonl for SFT from the Wikipedia sample (no outside data): each example asks the assistant to
continue a passage (user: first sentences of a paragraph, assistant: the next ones).

  python tools/make_sft_data.py --out output/sft_wiki_chat.jsonl [--source wiki-calib] [--n 2000] [--seed 0]

The default output path is the one yaml_configs/sft_smollm2_mla.yaml reads.
"""
import argparse

import _bootstrap  # noqa: F401

from youzhi_ms.cli import NONNEGATIVE, POSITIVE, ArgumentParser
from youzhi_ms.errors import cli_main
from youzhi_ms.fsutil import OVERWRITE_HELP, check_output_file


@cli_main
def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="output/sft_wiki_chat.jsonl")
    ap.add_argument("--source", default="wiki-calib", help="wiki-calib | wiki-eval | a .txt or .jsonl file")
    ap.add_argument("--n", type=POSITIVE, default=2000, help="number of conversations (fewer if the text runs out)")
    ap.add_argument("--seed", type=NONNEGATIVE, default=0)
    ap.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = ap.parse_args(argv)
    check_output_file(args.out, args.overwrite, [("--source", args.source)], "--out")
    from youzhi_ms.data.sft_data import write_chat_jsonl
    n = write_chat_jsonl(args.out, args.source, args.n, args.seed, overwrite=args.overwrite)
    print(f"wrote {n} conversations to {args.out}")


if __name__ == "__main__":
    main()
