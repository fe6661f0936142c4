#!/usr/bin/env python
"""Generate text from a source (GQA) or converted (MLA, absorbed latent-cache decode) model directory.

  python tools/generate.py --model DIR --prompt "The capital of France is" [--max-new-tokens 32]
  python tools/generate.py --model DIR --chat --prompt "What is a KV cache?" --temperature 0.7 --top-p 0.9 --seed 1
Greedy when --temperature is 0 (the default). --chat wraps the prompt with the tokenizer's chat template; without
--prompt, --chat reads turns from standard input. Tokens are printed as they are produced.
The first run compiles the prefill and decode graphs (5-25 s each for SmolLM2 on 2 CPU cores, by machine load); later
runs with the same model config load them from the compile cache (youzhi_ms/compile_cache.py; YOUZHI_COMPILE_CACHE=0
turns it off).
"""
import argparse
import sys

import _bootstrap  # noqa: F401

from youzhi_ms.cli import NONNEGATIVE, POSITIVE, ArgumentParser, nonempty, number
from youzhi_ms.errors import YouzhiError, cli_main
from youzhi_ms.fsutil import OVERWRITE_HELP, check_output_file, write_json_output


class Streamer:
    """Prints only the newly completed text (BPE pieces can split multi-byte characters), after `prefix` (the echoed
    prompt), which waits for the first token so that compile messages on stderr do not split it from its completion."""

    def __init__(self, tok, prefix=""):
        self.tok, self.ids, self.shown, self.prefix = tok, [], "", prefix

    def __call__(self, i):
        if self.prefix:
            sys.stdout.write(self.prefix)
            self.prefix = ""
        self.ids.append(i)
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text


@cli_main
def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (source or converted)")
    ap.add_argument("--mindir", help="directory written by tools/export_mindir.py (instead of --model)")
    ap.add_argument("--prompt", default=None, type=nonempty("the text to continue"))
    ap.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    ap.add_argument("--max-new-tokens", type=POSITIVE, default=32)
    ap.add_argument("--temperature", type=number(0), default=0.0, help="0: greedy (default)")
    ap.add_argument("--top-p", type=number(0, 1, lo_open=True), default=1.0)
    ap.add_argument("--seed", type=NONNEGATIVE, default=0)
    ap.add_argument("--json", default=None, help='write {"prompt_ids", "output_ids", "text"} here')
    ap.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = ap.parse_args(argv)
    if not args.model and not args.mindir:
        raise YouzhiError("give --model DIR or --mindir DIR")
    inputs = [("--model", args.model), ("--mindir", args.mindir)]
    if args.json is not None:
        check_output_file(args.json, args.overwrite, inputs)  # now, not after the generation
    from youzhi_ms.runtime import init_context
    init_context("graph")
    from youzhi_ms.data.tokenizer import Tokenizer
    from youzhi_ms.infer.generate import cache_length, generate
    from youzhi_ms.progress import step
    if args.mindir:
        from youzhi_ms.infer.mindir import MindIRRunner
        with step(f"loading {args.mindir}"):
            runner = MindIRRunner(args.mindir)
        tok = Tokenizer.from_dir(runner.tokenizer_dir)
    else:
        from youzhi_ms.checkpoint.mindspore_ckpt import load_model
        from youzhi_ms.infer.generate import EagerRunner
        with step(f"loading {args.model}"):
            model, cfg = load_model(args.model)
        runner = EagerRunner(model, cfg, dynamic_length=True)
        tok = Tokenizer.from_dir(args.model)
    try:
        turns = [args.prompt] if args.prompt is not None else \
            ([ln.rstrip("\n") for ln in sys.stdin] if args.chat else [])
    except UnicodeDecodeError:
        raise YouzhiError("standard input is not UTF-8 text; give the messages as UTF-8") from None
    # the decode cache and the RoPE table end at the model's context (MindIR: the exported cache length)
    limit = getattr(runner, "max_seq_len", None) or runner.cfg.max_position_embeddings
    if not turns:
        raise YouzhiError("give --prompt TEXT (or --chat with the message on standard input)")
    messages, results = [], []
    session_len = None  # the first turn's cache length; later turns keep it while they fit (one decode graph)
    for turn in turns:
        if args.chat:
            messages.append({"role": "user", "content": turn})
            text = tok.apply_chat_template(messages, add_generation_prompt=True)
        else:
            text = turn
        ids = tok.encode(text)
        if not ids:
            raise YouzhiError("the prompt encodes to no tokens; give some text the tokenizer knows")
        if len(ids) + args.max_new_tokens > limit:
            raise YouzhiError(f"the prompt ({len(ids)} tokens) plus --max-new-tokens {args.max_new_tokens} exceed the "
                              f"model's context of {limit} tokens; shorten the prompt or lower --max-new-tokens")
        stop = {i for i in (tok.eos_id, tok.eot_id) if i is not None}
        if session_len is None:
            session_len = cache_length(len(ids) + args.max_new_tokens)
            if not args.mindir:
                from youzhi_ms.compile_cache import GraphCache
                runner.graph_cache = GraphCache("generate", {"config": cfg.raw, "dtype": "float32"},
                                                runner.graph_plan(1, session_len))
        fits = len(ids) + args.max_new_tokens <= session_len
        out = generate(runner, ids, args.max_new_tokens, args.temperature, args.top_p, args.seed, stop,
                       max_len=session_len if fits else None, on_token=Streamer(tok, "" if args.chat else text))
        sys.stdout.write("\n")
        reply = tok.decode(out)
        messages.append({"role": "assistant", "content": reply})
        results.append({"prompt_ids": ids, "output_ids": out, "text": reply})
    if args.json is not None:
        write_json_output(args.json, results[0] if len(results) == 1 else results, args.overwrite, inputs)


if __name__ == "__main__":
    main()
