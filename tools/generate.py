#!/usr/bin/env python
"""Generate text from a source (GQA) or converted (MLA, absorbed latent-cache decode) model directory.

  python tools/generate.py --model DIR --prompt "The capital of France is" [--max-new-tokens 32]
  python tools/generate.py --model DIR --chat                   (a conversation at the terminal)
  printf 'Hi!\nAnd then?\n' | python tools/generate.py --model DIR --chat   (one message per line, for scripts)
  python tools/generate.py --model DIR --chat --prompt "What is a KV cache?" --temperature 0.7 --top-p 0.9 --seed 1
Greedy when --temperature is 0 (the default). Tokens are printed as they are produced.
--chat wraps the messages with the tokenizer's chat template. At a terminal it asks for a message (`you> `), answers
after each Enter (`assistant> `) and keeps the conversation: every turn's prompt is the whole history. `exit`, `quit`
or Ctrl-D ends it, `/reset` starts a new conversation. With standard input from a pipe or a file, each line is one
user message of the same conversation and each reply is printed on its own line, unlabelled; with --prompt, one turn.
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


def _piped_messages():
    """One user message per line of standard input, read as each line arrives; blank lines are skipped."""
    try:
        for line in sys.stdin:
            if line.strip():
                yield line.rstrip("\n")
    except UnicodeDecodeError:
        raise YouzhiError("standard input is not UTF-8 text; give the messages as UTF-8") from None


def _typed_messages(model, conversation):
    """Messages typed at the terminal, until an exit word or Ctrl-D; `/reset` empties the conversation."""
    import readline  # noqa: F401  (line editing and the up-arrow history for input())
    from youzhi_ms.infer.chat import EXIT_WORDS, RESET_WORD
    print(f"chat with {model}: type a message and press Enter; `exit` or Ctrl-D ends, {RESET_WORD} starts over",
          file=sys.stderr, flush=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:  # Ctrl-D
            print()
            return
        if line.strip() in EXIT_WORDS:
            return
        if line.strip() == RESET_WORD:
            conversation.reset()
            print("(a new conversation: the earlier turns are forgotten)", file=sys.stderr, flush=True)
        elif line.strip():
            yield line


@cli_main
def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (source or converted)")
    ap.add_argument("--mindir", help="directory written by tools/export_mindir.py (instead of --model)")
    ap.add_argument("--prompt", default=None, type=nonempty("the text to continue"))
    ap.add_argument("--chat", action="store_true", help="a conversation with the tokenizer's chat template (see above)")
    ap.add_argument("--max-new-tokens", type=POSITIVE, default=None,
                    help="the longest continuation or reply (default 32; 256 with --chat)")
    ap.add_argument("--temperature", type=number(0), default=0.0, help="0: greedy (default)")
    ap.add_argument("--top-p", type=number(0, 1, lo_open=True), default=1.0)
    ap.add_argument("--seed", type=NONNEGATIVE, default=0)
    ap.add_argument("--json", default=None, help='write {"prompt_ids", "output_ids", "text"} here (a list of them for '
                    'a conversation of several turns)')
    ap.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = ap.parse_args(argv)
    if not args.model and not args.mindir:
        raise YouzhiError("give --model DIR or --mindir DIR")
    if args.prompt is None and not args.chat:
        raise YouzhiError("give --prompt TEXT, or --chat for a conversation")
    if args.max_new_tokens is None:
        args.max_new_tokens = 256 if args.chat else 32
    inputs = [("--model", args.model), ("--mindir", args.mindir)]
    if args.json is not None:
        check_output_file(args.json, args.overwrite, inputs)  # now, not after the generation
    from youzhi_ms.runtime import init_context
    init_context("graph")
    from youzhi_ms.data.tokenizer import Tokenizer
    from youzhi_ms.infer.chat import Conversation
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
    # the decode cache and the RoPE table end at the model's context (MindIR: the exported cache length)
    limit = getattr(runner, "max_seq_len", None) or runner.cfg.max_position_embeddings
    conversation = Conversation(tok, limit, args.max_new_tokens)
    if args.chat:
        conversation.prompt_ids("")  # a model without a chat template is refused now, not after the first message
    interactive = args.chat and args.prompt is None and sys.stdin.isatty()
    if args.prompt is not None:
        turns = [args.prompt]
    else:
        turns = _typed_messages(args.model or args.mindir, conversation) if interactive else _piped_messages()
    stop = {i for i in (tok.eos_id, tok.eot_id) if i is not None}
    results = []
    session_len = None  # the first turn's cache length; later turns keep it while they fit (one decode graph)
    try:
        for turn in turns:
            if args.chat:
                try:
                    ids = conversation.prompt_ids(turn)
                except YouzhiError as exc:
                    if not interactive:
                        raise
                    print(f"not answered: {exc}", file=sys.stderr, flush=True)
                    continue
            else:
                ids = tok.encode(turn)
                if len(ids) + args.max_new_tokens > limit:
                    raise YouzhiError(f"the prompt ({len(ids)} tokens) plus --max-new-tokens {args.max_new_tokens} "
                                      f"exceed the model's context of {limit} tokens; shorten the prompt or lower "
                                      "--max-new-tokens")
            if not ids:
                raise YouzhiError("the prompt encodes to no tokens; give some text the tokenizer knows")
            if session_len is None:
                session_len = cache_length(len(ids) + args.max_new_tokens)
                if not args.mindir:
                    from youzhi_ms.compile_cache import GraphCache
                    runner.graph_cache = GraphCache("generate", {"config": cfg.raw, "dtype": "float32"},
                                                    runner.graph_plan(1, session_len))
            fits = len(ids) + args.max_new_tokens <= session_len
            # the label (or the echoed prompt) waits for the first token: compile lines on stderr come before it
            label = ("assistant> " if interactive else "") if args.chat else turn
            out = generate(runner, ids, args.max_new_tokens, args.temperature, args.top_p, args.seed, stop,
                           max_len=session_len if fits else None, on_token=Streamer(tok, label))
            sys.stdout.write("\n")
            sys.stdout.flush()
            reply = tok.decode(out)
            if interactive and out[-1] not in stop:
                print(f"(cut at --max-new-tokens {args.max_new_tokens})", file=sys.stderr, flush=True)
            conversation.add(turn, reply)
            results.append({"prompt_ids": ids, "output_ids": out, "text": reply})
    except KeyboardInterrupt as exc:
        if interactive:
            exc.add_note("the chat ended" + (" (--json not written)" if args.json else ""))
        raise
    if args.json is not None and results:
        write_json_output(args.json, results[0] if len(results) == 1 else results, args.overwrite, inputs)
    elif args.chat and not results and not interactive:
        raise YouzhiError("standard input held no message; give one message per line (or --prompt TEXT)")


if __name__ == "__main__":
    main()
