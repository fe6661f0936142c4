"""A small chat dataset made from the Wikipedia sample, so SFT runs without outside data.

Each example asks the assistant to continue an encyclopedia passage: the user message holds the first sentences of a
paragraph, the assistant message the next ones. Deterministic for a seed; written as `{"messages": [...]}` jsonl, the
format `train_dataset.format: chat` reads.
"""
from __future__ import annotations

import json
import random
import re
from typing import Dict, Iterator, List

from youzhi_ms.data.text import load_documents
from youzhi_ms.errors import YouzhiError
from youzhi_ms.fsutil import atomic_output_file, check_output_file

PROMPT = "Continue this encyclopedia passage in the same style:\n\n{}"
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def sentences(paragraph: str) -> List[str]:
    return [s.strip() for s in _SENTENCE.split(paragraph.strip()) if s.strip()]


def continuation_examples(docs: List[str], n: int, seed: int = 0, prompt_sentences: int = 2,
                          response_sentences: int = 2, max_chars: int = 600) -> Iterator[Dict]:
    """Up to n chat examples from paragraphs with at least prompt+response sentences, in a seeded order."""
    paras = [p for d in docs for p in d.split("\n") if p.strip()]
    order = list(range(len(paras)))
    random.Random(seed).shuffle(order)
    made = 0
    for i in order:
        s = sentences(paras[i])
        if len(s) < prompt_sentences + response_sentences:
            continue
        prompt = " ".join(s[:prompt_sentences])
        response = " ".join(s[prompt_sentences:prompt_sentences + response_sentences])
        if len(prompt) + len(response) > max_chars:
            continue
        yield {"messages": [{"role": "user", "content": PROMPT.format(prompt)},
                            {"role": "assistant", "content": response}]}
        made += 1
        if made == n:
            return


def write_chat_jsonl(path: str, source: str = "wiki-calib", n: int = 2000, seed: int = 0,
                     overwrite: bool = False) -> int:
    """Write the examples to `path` (via a temp file, so an interrupted run leaves no partial file); returns count.
    An existing `path` is replaced only with `overwrite` (see fsutil for the rule)."""
    inputs = [("--source", source)]
    check_output_file(path, overwrite, inputs, "--out")
    rows = list(continuation_examples(load_documents(source), n, seed))
    if not rows:
        raise YouzhiError(f"{source} has no paragraph with four sentences; pass a longer text")
    with atomic_output_file(path, overwrite, inputs, "--out") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return len(rows)
