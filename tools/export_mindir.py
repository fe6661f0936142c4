#!/usr/bin/env python
"""Export a source (GQA) or converted (MLA) model directory to MindIR: a prefill graph with a dynamic prompt length and
a single-token decode graph whose state is exactly the KV cache (MLA: the latent c_kv and the shared rope key k_pe).

  python tools/export_mindir.py --model DIR --output-dir OUT [--batch 1] [--max-seq-len 2048] [--verify]
  python tools/generate.py --mindir OUT --prompt "The capital of France is"

OUT holds prefill.mindir, decode.mindir, manifest.json (inputs/outputs, cache bytes per token in fp32 and bf16),
config.json and the tokenizer files. It appears only when complete. --verify re-loads the graphs and compares them with
the eager model on a random prompt (adds one more compile of each graph).
"""
import argparse
import json

import _bootstrap  # noqa: F401

from youzhi_ms.cli import POSITIVE, ArgumentParser, int_at_least
from youzhi_ms.errors import cli_main
from youzhi_ms.fsutil import OVERWRITE_HELP, check_output_dir


@cli_main
def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (source or converted)")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--batch", type=POSITIVE, default=1, help="batch size of both graphs (default 1)")
    ap.add_argument("--max-seq-len", type=int_at_least(2), default=None,
                    help="cache length of the decode graph (default min(2048, max_position_embeddings))")
    ap.add_argument("--verify", action="store_true", help="check the exported graphs against the eager model")
    ap.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = ap.parse_args(argv)
    check_output_dir(args.output_dir, args.overwrite, [("--model", args.model)])  # before MindSpore starts
    from youzhi_ms.runtime import init_context
    init_context("graph")
    from youzhi_ms.infer.mindir import export_mindir
    m = export_mindir(args.model, args.output_dir, batch=args.batch, max_seq_len=args.max_seq_len,
                      verify=args.verify, overwrite=args.overwrite)
    dec = m["graphs"]["decode"]
    print(json.dumps({"output_dir": args.output_dir, "model_type": m["model_type"], "batch": m["batch"],
                      "max_seq_len": m["max_seq_len"], "cache_bytes_per_token": m["cache_bytes_per_token"],
                      "decode_state": {io["name"]: io["shape"] for io in dec["inputs"][2:]},
                      **({"verify": m["verify"]} if "verify" in m else {})}, indent=1))


if __name__ == "__main__":
    main()
