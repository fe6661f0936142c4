"""Write a Hugging Face model directory as one GGUF file for llama.cpp (flag names as in llama.cpp's own converter).

    python tools/export_gguf.py --model work_dirs/smollm2_mla --outfile smollm2_mla.gguf --outtype f16
"""
from __future__ import annotations

import argparse

import _bootstrap  # noqa: F401  (this checkout's youzhi_ms, even when another copy is installed)

from youzhi_ms.checkpoint.gguf_writer import OUTTYPES, export_gguf
from youzhi_ms.cli import ArgumentParser
from youzhi_ms.errors import cli_main
from youzhi_ms.fsutil import OVERWRITE_HELP


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="Write a converted MLA model (DeepSeek-V3 directory from convert_gqa_to_mla.py --export deepseek) "
                    "as a llama.cpp deepseek2 GGUF that runs with its latent KV cache, or a source Llama / Qwen2 / "
                    "Mistral model as a llama / qwen2 GGUF, tokenizer and chat template included. Written with the "
                    "`gguf` library (the llama.cpp project's writer).")
    p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face model directory")
    p.add_argument("--outfile", required=True, metavar="FILE.gguf",
                   help="GGUF file to write (it appears only when complete)")
    p.add_argument("--outtype", choices=OUTTYPES, default="f16",
                   help="type of the weight matrices (norms and biases stay f32; default f16)")
    p.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return p


@cli_main
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    s = export_gguf(args.model, args.outfile, args.outtype, progress=not args.no_progress, overwrite=args.overwrite)
    types = ", ".join(f"{n} {k}" for k, n in sorted(s["tensor_types"].items()))
    print(f"wrote {s['path']}: {s['arch']} GGUF, {s['n_tensors']} tensors ({types}), {s['bytes'] / 2 ** 20:.1f} MiB, "
          f"vocabulary {s['n_vocab']} ({s['pre_tokenizer']} pre-tokenizer)")


if __name__ == "__main__":
    main()
