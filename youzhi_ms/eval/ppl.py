"""The perplexity protocol, fixed so others can reproduce the figure.

1. Documents: `wiki-calib` / `wiki-eval` (see youzhi_ms.data.text), a `.jsonl` file (one document per line's `text`), or
   a plain-text file split into documents at blank lines.
2. Each document is preceded by the tokenizer's end-of-text token; all are concatenated into one stream.
3. `max_tokens` truncates the stream; it is cut into non-overlapping windows of `seq_len` tokens and a final partial
   window is dropped.
4. Every token of a window but its first is scored: ppl = exp(mean NLL), `tokens` = number of scored tokens.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Optional

import numpy as np
from mindspore import Tensor, nn, ops
import mindspore as ms

from youzhi_ms.checkpoint.hf import HFCheckpoint, read_config
from youzhi_ms.checkpoint.mindspore_ckpt import load_model, load_weights, model_kind
from youzhi_ms.compile_cache import GraphCache, announce_compile
from youzhi_ms.config import load_any_config
from youzhi_ms.data.text import load_token_stream
from youzhi_ms.data.tokenizer import Tokenizer
from youzhi_ms.errors import YouzhiError
from youzhi_ms.progress import ProgressBar, step
from youzhi_ms.train.checkpointing import STUDENT_FILE


class TokenNLL(nn.Cell):
    """ids [B,S] -> NLL of tokens 1..S-1 given their prefixes, [B,S-1], computed inside the graph so the full logits
    never leave it."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)  # keep the wrapped model's parameter names (MindFormers names)
        self.model = model

    def construct(self, input_ids):
        logits = self.model(input_ids)[:, :-1].astype(ms.float32)
        logp = ops.log_softmax(logits, -1)
        tgt = input_ids[:, 1:].astype(ms.int32).expand_dims(-1)
        return -ops.gather_elements(logp, -1, tgt).squeeze(-1)


def token_stream(text_source: str, tokenizer, max_tokens: Optional[int] = None) -> np.ndarray:
    stream = load_token_stream(text_source, tokenizer)
    if max_tokens:
        stream = stream[:max_tokens]
    return stream


def windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    n = len(stream) // seq_len
    if n == 0:
        raise YouzhiError(f"the text has {len(stream)} tokens, fewer than one window of --seq-len {seq_len}; "
                          "use a longer text or a smaller --seq-len")
    return stream[: n * seq_len].reshape(n, seq_len)


def perplexity(model, stream: np.ndarray, seq_len: int = 512, batch_size: int = 1, progress: bool = True,
               graph_cache=None, scorer=None) -> dict:
    """Run the protocol on an already-built model; returns {'ppl', 'nll', 'tokens', 'seq_len', 'windows', 'seconds'}.

    batch_size 1 by default: MindSpore's CPU graph keeps every intermediate of the forward alive (measured on SmolLM2,
    512 tokens: peak RSS 3.8 GB at batch 1, 10.9 GB at batch 4), and on CPU a bigger batch is not faster per token.
    graph_cache: a `youzhi_ms.compile_cache.GraphCache` planned as `[graph_signature(batch_size, seq_len)]`.
    scorer: a `TokenNLL(model)` already used by an earlier call: its compiled graph is reused (several texts scored
    with one compile); then pass graph_cache=None and progress announcements of a compile are not made."""
    win = windows(stream, seq_len)
    compiled = scorer is not None
    scorer = scorer if compiled else TokenNLL(model)
    total, count = 0.0, 0
    t0 = time.time()
    bar = None
    for i in range(0, len(win), batch_size):
        batch = win[i:i + batch_size]
        real = len(batch)
        if real < batch_size:  # keep one compiled shape: pad with copies and discard their scores
            batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - real, 0)])
        with _first_window(i == 0 and not compiled, progress, graph_cache, graph_signature(batch_size, seq_len)):
            nll = scorer(Tensor(batch.astype(np.int32))).asnumpy()[:real].astype(np.float64)
        if not np.all(np.isfinite(nll)):
            raise YouzhiError("the model produced non-finite log-probabilities; the weights are corrupt or overflow "
                              "in this dtype (evaluate in fp32)")
        total += float(nll.sum())
        count += nll.size
        if bar is None:  # after the first window's compile, so its status lines do not break the bar
            bar = ProgressBar(total=len(win), initial=real, desc="ppl", unit="win", disable=not progress)
        else:
            bar.update(real)
        bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    bar.close()
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": int(count), "seq_len": int(seq_len),
            "windows": int(len(win)), "seconds": round(time.time() - t0, 2)}


def graph_signature(batch_size: int, seq_len: int) -> str:
    return f"token nll ids[{batch_size}, {seq_len}]"


def _first_window(first: bool, announce: bool, graph_cache, signature: str):
    """The first window's call compiles the graph: load it from the cache if there is one, and say so."""
    if first and graph_cache is not None:
        return graph_cache.compiling(signature, "the perplexity graph")
    if not (first and announce):
        return contextlib.nullcontext()
    return announce_compile("the perplexity graph")


def evaluate_dir(model_dir: str, text: str = "wiki-eval", seq_len: int = 512, max_tokens: Optional[int] = None,
                 batch_size: int = 1, progress: bool = True, train_checkpoint: Optional[str] = None,
                 compile_cache: bool = False) -> dict:
    """`train_checkpoint`: a step directory written by the trainer (tools/train.py); its student weights replace the
    directory's, so an unfinished training run can be evaluated without exporting it. The text is checked before the
    model is loaded (loading a large model takes a while). compile_cache: reuse the compiled graph across runs
    (youzhi_ms/compile_cache.py)."""
    cfg = load_any_config(read_config(model_dir))
    if seq_len > cfg.max_position_embeddings:
        raise YouzhiError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings "
                          f"{cfg.max_position_embeddings}")
    if train_checkpoint:
        if not os.path.isfile(os.path.join(train_checkpoint, STUDENT_FILE)):
            raise YouzhiError(f"{train_checkpoint} has no {STUDENT_FILE}; pass a step_* directory under the training "
                              "run's checkpoint/ directory")
    tok = Tokenizer.from_dir(model_dir)
    stream = token_stream(text, tok, max_tokens)
    n_win = len(windows(stream, seq_len))  # too short a text is an error now, not after loading the model
    if batch_size > n_win:  # a batch larger than the windows would only be padded with copies (and allocated)
        raise YouzhiError(f"--batch-size {batch_size} is more than the {n_win} window(s) of {seq_len} tokens in the "
                          f"text; use at most {n_win}")
    with (step(f"loading {model_dir}") if progress else contextlib.nullcontext()):
        model, cfg = load_model(model_dir, table_len=seq_len)
    if train_checkpoint:
        path = os.path.join(train_checkpoint, STUDENT_FILE)
        load_weights(model, HFCheckpoint.from_file(path), model_kind(cfg))  # MindFormers names, shape-checked
    cache = None
    if compile_cache:
        cache = GraphCache("ppl", {"config": cfg.raw, "dtype": "float32", "table_len": seq_len},
                           [graph_signature(batch_size, seq_len)])
    res = perplexity(model, stream, seq_len, batch_size, progress, graph_cache=cache)
    res.update(model=model_dir, text=text, max_tokens=max_tokens, model_type=cfg.raw.get("model_type"),
               train_checkpoint=train_checkpoint)
    return res
