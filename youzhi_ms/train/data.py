"""Training data for distillation and SFT.

Datasets (every example is laid out in the *shifted* convention of `losses.py`: position t's logits predict
`labels[t] = tokens[t + 1]`, and `loss_mask[t]` says whether that prediction is scored):

- `PackedText`: a plain-text / jsonl corpus or a wiki split packed into one token stream exactly as the perplexity
  protocol does (each document preceded by the end-of-text token), cut into non-overlapping `seq_len` windows. Every
  position but the last is scored (there is no padding in a packed window).
- Replay (`train_dataset.replay_path` / `replay_fraction`, packed text only): windows of a second, general text are
  added to the windows of the training text so that they make `replay_fraction` of all windows; the sampler shuffles
  the union, so every batch mixes the two in that proportion on average. The domain step of tools/pipeline.py uses it
  to keep the general ability the GKD stage restored (continued pre-training on a domain corpus alone drifts away from
  general text: the forgetting the pipeline measures). The general windows are the first ones of the replay text, so
  the set is the same in every run and on every rank.
- `ChatExamples`: a jsonl file, one example per line, either `{"messages": [{"role", "content"}, ...]}` rendered with
  the tokenizer's chat template, or `{"prompt": ..., "response": ...}` (rendered as a user / assistant exchange when a
  chat template exists, else `prompt + response + eos`). Only assistant tokens are scored (the rendered assistant turn,
  its end-of-turn token included, trailing whitespace excluded); text after the last response is dropped. Rendering
  is checked to be prefix-stable, and the text is tokenized segment by segment so each token is either prompt or
  response. Examples longer than `seq_len + 1`
  tokens are cut on the right; examples with nothing left to score are dropped (and counted).

Sampling: `EpochSampler` walks a permutation of the examples drawn from `default_rng([seed, epoch])` (a new one each
epoch); its whole state is `(epoch, offset)`, saved in checkpoints. A global micro-batch is the next
`batch_size * world_size` indices; rank r takes rows r, r + world, ... (`shard_rows`), so 2 data-parallel workers see
exactly the batch one process would see.

On-policy data (GKD): `StudentContinuation` continues prompts with the student's own samples over the MLA decode path
(one prefill of the right-padded prompts, then one compiled decode step per token against a latent cache of
`seq_len` positions). Prompts are at most `seq_len - max_new_tokens` tokens (a packed window keeps its beginning, a
chat prompt its end); every row generates up to `max_new_tokens` tokens and stops after an end token (`eos_id`,
`eot_id`). Only the generated tokens are scored. Each row samples with its own generator
`default_rng([seed, step, micro, global_row])`, so the samples do not depend on how the batch is split over ranks.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from youzhi_ms.cli import path_problem
from youzhi_ms.data.text import iter_jsonl, load_token_stream
from youzhi_ms.errors import YouzhiError
from youzhi_ms.infer.generate import EagerRunner, decode_state, sample_next

__all__ = ["Example", "PackedText", "add_replay", "replay_windows", "ChatExamples", "build_dataset", "detect_format",
           "layout", "EpochSampler", "shard_rows", "collate", "row_rngs", "StudentContinuation"]


@dataclass
class Example:
    input_ids: np.ndarray  # int32 [S]
    labels: np.ndarray  # int32 [S]
    loss_mask: np.ndarray  # float32 [S]
    prompt_len: int  # tokens before the (last) response: the on-policy prompt


def layout(tokens: Sequence[int], scored: Sequence[bool], seq_len: int, pad_id: int):
    """(input_ids, labels, loss_mask) of length seq_len from a token list and a per-token 'is scored' flag.

    input_ids[t] = tokens[t], labels[t] = tokens[t + 1], loss_mask[t] = scored[t + 1], for t < min(len - 1, seq_len);
    the rest is padding (pad_id, mask 0). For scored = prompt zeros + response ones this equals
    `losses.build_sft_labels(prompt, response, seq_len, pad_id)`.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    scored = np.asarray(scored, dtype=bool)
    n = max(min(len(tokens) - 1, seq_len), 0)
    ids = np.full(seq_len, pad_id, np.int32)
    labels = np.full(seq_len, pad_id, np.int32)
    mask = np.zeros(seq_len, np.float32)
    ids[:n] = tokens[:n]
    labels[:n] = tokens[1:n + 1]
    mask[:n] = scored[1:n + 1]
    return ids, labels, mask


class PackedText:
    """Non-overlapping `seq_len` windows of a packed token stream (wiki split, .txt or .jsonl with "text")."""

    kind = "packed"
    prompt_keeps_end = False  # on-policy prompt = the window's first seq_len - max_new_tokens tokens
    replay = 0  # windows appended from a replay text (`add_replay`): the last `replay` ones

    def __init__(self, source: str, tokenizer, seq_len: int, max_tokens: Optional[int] = None, pad_id: int = 0):
        stream = load_token_stream(source, tokenizer)
        if max_tokens:
            stream = stream[:max_tokens]
        n = len(stream) // seq_len
        if n == 0:
            raise YouzhiError(f"train_dataset.data_path {source!r} has {len(stream)} tokens, fewer than one window of "
                              f"runner_config.seq_length {seq_len}; use more text or a shorter seq_length")
        self.windows = np.ascontiguousarray(stream[:n * seq_len].reshape(n, seq_len), dtype=np.int32)
        self.seq_len, self.pad_id, self.dropped = seq_len, pad_id, 0

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> Example:
        w = self.windows[i]
        ids, labels, mask = layout(np.concatenate([w, [self.pad_id]]), np.ones(len(w) + 1, bool), self.seq_len,
                                   self.pad_id)
        mask[-1] = 0.0  # the last position's label is padding, not text
        return Example(ids, labels, mask, self.seq_len)


def _read_chat_jsonl(path: str) -> List[dict]:
    rows = []
    for lineno, obj in iter_jsonl(path, "a chat .jsonl file"):
        if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            msgs = obj["messages"]
            for m in msgs:
                if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"),
                                                                                              str)):
                    raise YouzhiError(f"{path}:{lineno}: every message needs string 'role' and 'content' fields")
            if not any(m["role"] == "assistant" for m in msgs):
                raise YouzhiError(f"{path}:{lineno}: the conversation has no assistant message, so nothing would "
                                  "be trained on")
            if msgs[0]["role"] == "assistant":
                raise YouzhiError(f"{path}:{lineno}: the conversation starts with an assistant message; it needs "
                                  "a user (or system) message before the first response")
            rows.append({"messages": msgs, "line": lineno})
        elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
            if not obj["response"]:
                raise YouzhiError(f"{path}:{lineno}: empty response; there is nothing to train on")
            rows.append({"prompt": obj["prompt"], "response": obj["response"], "line": lineno})
        else:
            raise YouzhiError(f"{path}:{lineno}: expected {{\"messages\": [...]}} or {{\"prompt\": ..., "
                              "\"response\": ...}")
    if not rows:
        raise YouzhiError(f"{path} contains no examples")
    return rows


def render_chat(tokenizer, messages: List[dict], where: str = "") -> tuple:
    """(tokens, scored flags, prompt_len) of one conversation; assistant turns scored, everything else not."""
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise YouzhiError(f"{where}the chat template does not render conversations prefix-stably (a later turn "
                              "changes the text of earlier ones), so assistant tokens cannot be located; use "
                              "{\"prompt\", \"response\"} examples or a model whose template appends turns")
        end = len(upto.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    tokens: List[int] = []
    scored: List[bool] = []
    pos = 0
    prompt_len = 0
    for start, end in spans:
        ids = tokenizer.encode(full[pos:start])
        tokens += ids
        scored += [False] * len(ids)
        prompt_len = len(tokens)
        ids = tokenizer.encode(full[start:end])
        tokens += ids
        scored += [True] * len(ids)
        pos = end
    # text after the last response (e.g. the template's trailing newline) is neither scored nor needed as context
    return tokens, scored, prompt_len


class ChatExamples:
    """Chat / prompt-response jsonl examples, assistant tokens scored."""

    kind = "chat"
    prompt_keeps_end = True  # on-policy prompt = the conversation up to the last response (its end kept)

    def __init__(self, path: str, tokenizer, seq_len: int, pad_id: int = 0):
        if not os.path.isfile(path):
            raise YouzhiError(f"train_dataset.data_path {path} {path_problem(path, 'file')}")
        self.seq_len, self.pad_id = seq_len, pad_id
        has_template = tokenizer.chat_template is not None
        eos = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.eot_id
        self.examples: List[Example] = []
        self.dropped = 0
        for row in _read_chat_jsonl(path):
            where = f"{path}:{row['line']}: "
            if "messages" in row:
                tokens, scored, prompt_len = render_chat(tokenizer, row["messages"], where)
            elif has_template:
                msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
                tokens, scored, prompt_len = render_chat(tokenizer, msgs, where)
            else:
                p, r = tokenizer.encode(row["prompt"]), tokenizer.encode(row["response"]) + [eos]
                tokens, scored, prompt_len = p + r, [False] * len(p) + [True] * len(r), len(p)
            ids, labels, mask = layout(tokens, scored, seq_len, pad_id)
            if mask.sum() == 0 or prompt_len == 0:
                self.dropped += 1
                continue
            self.examples.append(Example(ids, labels, mask, prompt_len))
        if not self.examples:
            raise YouzhiError(f"{path}: no example has a response token within runner_config.seq_length {seq_len}; "
                              "use a longer seq_length or shorter prompts")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def detect_format(data_path: str) -> str:
    """'chat' for a jsonl whose first object has "messages" or "prompt"; else 'packed'."""
    if data_path.lower().endswith(".jsonl") and os.path.isfile(data_path):
        with open(data_path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        return "packed"  # the reader reports the error with its line number
                    return "chat" if isinstance(obj, dict) and ("messages" in obj or "prompt" in obj) else "packed"
    return "packed"


def replay_windows(n_train: int, fraction: float) -> int:
    """How many replay windows make `fraction` of the union with `n_train` training windows (0 for fraction 0)."""
    return int(round(n_train * fraction / (1.0 - fraction))) if fraction > 0 else 0


def add_replay(train: PackedText, replay_path: str, fraction: float, tokenizer) -> PackedText:
    """`train` with the first `replay_windows(len(train), fraction)` windows of `replay_path` appended (module
    docstring); `train.replay` counts them."""
    want = replay_windows(len(train), fraction)
    if want == 0:
        return train
    stream = load_token_stream(replay_path, tokenizer)
    have = len(stream) // train.seq_len
    if have < want:
        raise YouzhiError(f"train_dataset.replay_path {replay_path!r} has {have} windows of {train.seq_len} tokens, "
                          f"fewer than the {want} that make replay_fraction {fraction} of the {len(train)} training "
                          "windows; use a longer replay text or a smaller replay_fraction")
    general = stream[:want * train.seq_len].reshape(want, train.seq_len).astype(np.int32)
    train.windows = np.ascontiguousarray(np.concatenate([train.windows, general]))
    train.replay = want
    return train


def build_dataset(dataset_cfg: dict, tokenizer, seq_len: int, pad_id: int):
    path = dataset_cfg["data_path"]
    fmt = dataset_cfg.get("format", "auto")
    if fmt == "auto":
        fmt = detect_format(path)
    fraction = float(dataset_cfg.get("replay_fraction") or 0.0)
    if fmt == "chat":
        if fraction > 0:
            raise YouzhiError(f"train_dataset.replay_fraction {fraction} works with packed text only, but "
                              f"{path} is chat data; set train_dataset.replay_fraction=0 or train on a packed text")
        return ChatExamples(path, tokenizer, seq_len, pad_id)
    data = PackedText(path, tokenizer, seq_len, dataset_cfg.get("max_tokens"), pad_id)
    return add_replay(data, dataset_cfg.get("replay_path"), fraction, tokenizer) if fraction > 0 else data


class EpochSampler:
    """Deterministic order over `n` examples: epoch e visits `default_rng([seed, e]).permutation(n)` (or 0..n-1)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.epoch, self.offset = 0, 0
        self._order_epoch, self._order = None, None

    def order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                           else np.arange(self.n))
            self._order_epoch = epoch
        return self._order

    def take(self, k: int) -> np.ndarray:
        out = []
        while len(out) < k:
            o = self.order(self.epoch)
            m = min(k - len(out), self.n - self.offset)
            out.extend(o[self.offset:self.offset + m].tolist())
            self.offset += m
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
        return np.asarray(out, dtype=np.int64)

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "n": self.n}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if int(state.get("n", self.n)) != self.n:
            raise YouzhiError(f"the checkpoint was made with a dataset of {state['n']} examples, this run has "
                              f"{self.n}; resume with the same train_dataset and runner_config.seq_length")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


def shard_rows(global_rows: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank r's part of a global micro-batch: rows r, r + world, r + 2 world, ..."""
    return global_rows[rank::world]


def collate(examples: Sequence[Example]) -> Dict[str, np.ndarray]:
    return {"input_ids": np.stack([e.input_ids for e in examples]),
            "labels": np.stack([e.labels for e in examples]),
            "loss_mask": np.stack([e.loss_mask for e in examples]),
            "prompt_len": np.array([e.prompt_len for e in examples], np.int64)}


def row_rngs(seed: int, step: int, micro: int, global_rows: Sequence[int]) -> List[np.random.Generator]:
    return [np.random.default_rng([int(seed), int(step), int(micro), int(r)]) for r in global_rows]


class StudentContinuation:
    """Batched on-policy continuation with the student (see the module docstring). The prefill / decode cells are
    compiled once for (batch, seq_len - max_new_tokens) and (batch, 1) and share the student's parameters, so they
    always sample from the current weights."""

    def __init__(self, model, cfg, seq_len: int, max_new_tokens: int, temperature: float, top_p: float = 1.0,
                 stop_ids: Sequence[int] = (), pad_id: int = 0):
        if max_new_tokens >= seq_len:
            raise YouzhiError(f"max_new_tokens ({max_new_tokens}) must be smaller than seq_length ({seq_len})")
        self.runner = EagerRunner(model, cfg)
        self.cfg = cfg
        self.seq_len, self.max_new = int(seq_len), int(max_new_tokens)
        self.prompt_max = self.seq_len - self.max_new
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.stop = {int(s) for s in stop_ids if s is not None}
        self.pad_id = int(pad_id)

    def prompts(self, batch: Dict[str, np.ndarray], keep_end: bool) -> List[np.ndarray]:
        out = []
        for ids, n in zip(batch["input_ids"], batch["prompt_len"]):
            p = ids[:min(int(n), self.seq_len)]
            p = p[-self.prompt_max:] if keep_end else p[:self.prompt_max]
            if len(p) == 0:
                raise YouzhiError("an on-policy prompt is empty; every example needs at least one prompt token")
            out.append(p)
        return out

    def __call__(self, prompts: List[np.ndarray], rngs: List[np.random.Generator]) -> Dict[str, np.ndarray]:
        B, S, P, N = len(prompts), self.seq_len, self.prompt_max, self.max_new
        lens = np.array([len(p) for p in prompts])
        pre = np.full((B, P), self.pad_id, np.int32)
        for b, p in enumerate(prompts):
            pre[b, :len(p)] = p
        logits, *prefilled = self.runner.prefill(pre)
        caches = decode_state(self.runner, prefilled, B, S)
        gen: List[List[int]] = [[] for _ in range(B)]
        done = np.zeros(B, bool)
        nxt = [sample_next(logits[b, lens[b] - 1], self.temperature, self.top_p, rngs[b]) for b in range(B)]
        for step in range(N):
            for b in range(B):
                if not done[b]:
                    gen[b].append(nxt[b])
                    done[b] = nxt[b] in self.stop
            if step == N - 1 or done.all():
                break
            feed = np.array([[nxt[b] if not done[b] else self.pad_id] for b in range(B)], np.int32)
            logits, *caches = self.runner.decode(feed, lens + step, *caches)
            nxt = [sample_next(logits[b, 0], self.temperature, self.top_p, rngs[b]) if not done[b] else self.pad_id
                   for b in range(B)]
        ids = np.full((B, S), self.pad_id, np.int32)
        labels = np.full((B, S), self.pad_id, np.int32)
        mask = np.zeros((B, S), np.float32)
        for b in range(B):
            seq = np.concatenate([prompts[b], np.asarray(gen[b], np.int64)])
            ids[b, :len(seq)] = seq
            labels[b, :len(seq) - 1] = seq[1:]
            mask[b, lens[b] - 1:len(seq) - 1] = 1.0
        return {"input_ids": ids, "labels": labels, "loss_mask": mask, "prompt_len": lens.astype(np.int64),
                "generated": [list(g) for g in gen]}
