#!/usr/bin/env python
"""Convert a Hugging Face checkpoint directory to MindSpore (MindFormers parameter names), or back with --reverse.

  python tools/convert_hf_weights.py --input-dir HF_DIR --output-dir MS_DIR [--dtype fp32|fp16|bf16]
  python tools/convert_hf_weights.py --input-dir MS_DIR --output-dir HF_DIR --reverse

Without --dtype the stored bits are copied unchanged, so HF -> MS -> HF is bit-exact. Works for source (Llama/Qwen2)
and converted (DeepSeek-V3 MLA) directories; tensors are read and written one at a time.
"""
import argparse

import _bootstrap  # noqa: F401

from youzhi_ms.checkpoint.mindspore_ckpt import convert_dir
from youzhi_ms.cli import ArgumentParser
from youzhi_ms.errors import cli_main
from youzhi_ms.fsutil import OVERWRITE_HELP


@cli_main
def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input-dir", required=True, help="source directory (config.json + safetensors)")
    ap.add_argument("--output-dir", required=True, help="destination directory (written atomically)")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                    help="re-encode tensors (default: keep the stored dtype bit for bit)")
    ap.add_argument("--reverse", action="store_true", help="MindSpore names -> Hugging Face names")
    ap.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = ap.parse_args(argv)
    n = convert_dir(args.input_dir, args.output_dir, dtype=args.dtype or "keep", reverse=args.reverse,
                    overwrite=args.overwrite)
    print(f"converted {n} tensors {'MindSpore -> HF' if args.reverse else 'HF -> MindSpore'}: {args.output_dir}")


if __name__ == "__main__":
    main()
