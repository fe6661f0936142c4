"""The offline teacher: its top-k log-probabilities per token of the training windows, in one memory-mapped file.

`tools/make_teacher_topk.py` runs the teacher once over the dataset windows the trainer reads (the same
`train_dataset`, `seq_length` and tokenizer) and writes, for each window and position, the k most likely next words,
their log-probabilities at the loss temperature, and the log of the remaining mass (the tail bucket). The trainer
(`distill.offline_teacher`) then distills from the file (`chunked_loss.TopKGKDLoss`) without the teacher in memory.

File layout (little-endian; no pickle: a json header and raw arrays that `numpy.memmap` maps in place):

    b"YZTOPK01" | uint64 header length | json header | zero padding to 64 bytes | the arrays, each 64-byte aligned

The header names every array with its dtype, shape and offset (`rows` int64 [R]: the dataset window indices held;
`input_ids` int32 [R, T]: the window's tokens, checked against the trainer's; `ids` uint16 or int32 [R, T, k];
`logp` float32 [R, T, k]; `tail` float32 [R, T]), plus k, vocab size, sequence length, temperature and where the
numbers came from. Everything in the header is checked against the file size before anything is mapped.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Dict, Optional, Sequence

import numpy as np
import mindspore as ms


from youzhi_ms.checkpoint.hf import read_config
from youzhi_ms.checkpoint.mindspore_ckpt import load_model
from youzhi_ms.config import load_any_config
from youzhi_ms.data.tokenizer import Tokenizer
from youzhi_ms.cli import path_problem
from youzhi_ms.errors import YouzhiError
from youzhi_ms.progress import ProgressBar
from youzhi_ms.train.data import EpochSampler, build_dataset
from youzhi_ms.train.run_config import RunConfig

MAGIC = b"YZTOPK01"
VERSION = 1
ALIGN = 64
ARRAYS = ("rows", "input_ids", "ids", "logp", "tail")
_DTYPES = {"int64": np.int64, "int32": np.int32, "uint16": np.uint16, "float32": np.float32}
_MAX_HEADER = 1 << 20


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def id_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "int32"


class TopKWriter:
    """Create `path` for R windows of T tokens and fill it window by window (`write(i, ...)`); `close()` makes it
    visible under its name (written to `path + '.partial'` first, so an interrupted run leaves no half file).
    `done()` tells which windows are already written, so an interrupted run can resume from the partial file."""

    def __init__(self, path: str, rows: Sequence[int], seq_len: int, k: int, vocab_size: int, temperature: float,
                 meta: Optional[dict] = None, resume: bool = False):
        self.path = path
        self.partial = path + ".partial"
        self.shapes = {"rows": (len(rows),), "input_ids": (len(rows), seq_len), "ids": (len(rows), seq_len, k),
                       "logp": (len(rows), seq_len, k), "tail": (len(rows), seq_len)}
        dtypes = {"rows": "int64", "input_ids": "int32", "ids": id_dtype(vocab_size), "logp": "float32",
                  "tail": "float32"}
        header = {"version": VERSION, "k": int(k), "vocab_size": int(vocab_size), "seq_length": int(seq_len),
                  "temperature": float(temperature), "meta": meta or {}, "arrays": {}}
        # offsets depend on the header's own length: lay out with a placeholder, then fix the header size
        body = 0
        for name in ARRAYS:
            nbytes = int(np.prod(self.shapes[name])) * np.dtype(_DTYPES[dtypes[name]]).itemsize
            header["arrays"][name] = {"dtype": dtypes[name], "shape": list(self.shapes[name]), "offset": body,
                                      "nbytes": nbytes}
            body = _align(body + nbytes)
        blob = json.dumps(header).encode()
        start = _align(len(MAGIC) + 8 + len(blob) + 64)  # room for the offsets growing by a few digits
        for name in ARRAYS:
            header["arrays"][name]["offset"] += start
        blob = json.dumps(header).encode()
        if len(MAGIC) + 8 + len(blob) > start:
            raise AssertionError("top-k header outgrew its reserved space")
        self.header = header
        fresh = not (resume and os.path.isfile(self.partial) and self._same_layout(blob, start + body))
        if fresh:
            with open(self.partial, "wb") as f:
                f.write(MAGIC + struct.pack("<Q", len(blob)) + blob)
                f.truncate(start + body)
        self.maps = {name: np.memmap(self.partial, dtype=_DTYPES[dtypes[name]], mode="r+",
                                     offset=header["arrays"][name]["offset"], shape=self.shapes[name])
                     for name in ARRAYS}
        if fresh:
            self.maps["rows"][:] = np.asarray(rows, np.int64)
            self.maps["tail"][:] = np.nan  # NaN marks a window not yet written (a real tail is finite or -inf)

    def _same_layout(self, blob: bytes, size: int) -> bool:
        with open(self.partial, "rb") as f:
            head = f.read(len(MAGIC) + 8 + len(blob))
        return head == MAGIC + struct.pack("<Q", len(blob)) + blob and os.path.getsize(self.partial) == size

    def done(self) -> np.ndarray:
        return ~np.isnan(self.maps["tail"][:, 0])

    def write(self, i: int, input_ids: np.ndarray, ids: np.ndarray, logp: np.ndarray, tail: np.ndarray) -> None:
        self.maps["input_ids"][i] = input_ids
        self.maps["ids"][i] = ids
        self.maps["logp"][i] = logp
        self.maps["tail"][i] = tail

    def close(self) -> str:
        if not self.done().all():
            raise YouzhiError(f"{self.partial}: {int((~self.done()).sum())} windows not written yet")
        for m in self.maps.values():
            m.flush()
        self.maps = {}
        os.replace(self.partial, self.path)
        return self.path


class TopKStore:
    """A top-k file opened read-only and memory-mapped; `batch(rows, input_ids)` gives the trainer's arrays."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise YouzhiError(f"offline teacher file {path} {path_problem(path, 'file')}; write it with "
                              "tools/make_teacher_topk.py")
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            magic = f.read(len(MAGIC))
            if magic != MAGIC:
                raise YouzhiError(f"{path} is not a top-k teacher file (bad magic {magic[:8]!r}); write it with "
                                  "tools/make_teacher_topk.py")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(_MAX_HEADER, size):
                raise YouzhiError(f"{path}: header length {n} is larger than the file; the file is damaged")
            try:
                h = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise YouzhiError(f"{path}: the header is not json ({exc}); the file is damaged") from None
        self.header = h
        self._check_header(size)
        self.k, self.vocab_size, self.seq_len = h["k"], h["vocab_size"], h["seq_length"]
        self.temperature = h["temperature"]
        self.arrays = {name: np.memmap(path, dtype=_DTYPES[a["dtype"]], mode="r", offset=a["offset"],
                                       shape=tuple(a["shape"]))
                       for name, a in h["arrays"].items()}
        rows = np.asarray(self.arrays["rows"])
        self.index: Dict[int, int] = {int(r): i for i, r in enumerate(rows)}
        if len(self.index) != len(rows):
            raise YouzhiError(f"{path}: a dataset window is stored twice; the file is damaged")

    def _check_header(self, size: int) -> None:
        h, path = self.header, self.path

        def bad(what):
            return YouzhiError(f"{path}: {what}; the file is damaged or from another version (rewrite it with "
                               "tools/make_teacher_topk.py)")
        if not isinstance(h, dict) or h.get("version") != VERSION:
            raise bad(f"unsupported version {h.get('version') if isinstance(h, dict) else h!r}")
        for key in ("k", "vocab_size", "seq_length"):
            if not isinstance(h.get(key), int) or isinstance(h.get(key), bool) or h[key] < 1:
                raise bad(f"{key} {h.get(key)!r} is not a positive integer")
        if h["k"] > h["vocab_size"]:
            raise bad(f"k {h['k']} exceeds the vocabulary size {h['vocab_size']}")
        if not isinstance(h.get("temperature"), (int, float)) or not h["temperature"] > 0:
            raise bad(f"temperature {h.get('temperature')!r} is not a positive number")
        arrays = h.get("arrays")
        if not isinstance(arrays, dict) or sorted(arrays) != sorted(ARRAYS):
            raise bad(f"arrays {sorted(arrays) if isinstance(arrays, dict) else arrays!r} are not {list(ARRAYS)}")
        r = arrays["rows"].get("shape", [None])[0] if isinstance(arrays["rows"], dict) else None
        t, k = h["seq_length"], h["k"]
        want = {"rows": ("int64", [r]), "input_ids": ("int32", [r, t]), "ids": (id_dtype(h["vocab_size"]), [r, t, k]),
                "logp": ("float32", [r, t, k]), "tail": ("float32", [r, t])}
        for name, (dtype, shape) in want.items():
            a = arrays[name]
            if not isinstance(a, dict) or a.get("dtype") != dtype or a.get("shape") != shape or \
                    not isinstance(r, int) or r < 1:
                raise bad(f"array {name} is {a!r}, expected dtype {dtype} shape {shape}")
            nbytes = int(np.prod(shape)) * np.dtype(_DTYPES[dtype]).itemsize
            off = a.get("offset")
            if not isinstance(off, int) or off < 0 or off % ALIGN or a.get("nbytes") != nbytes or off + nbytes > size:
                raise bad(f"array {name} (offset {off!r}, {nbytes} bytes) does not lie inside the {size}-byte file")

    def check_compatible(self, vocab_size: int, seq_len: int, temperature: float) -> None:
        if vocab_size != self.vocab_size:
            raise YouzhiError(f"{self.path} holds a {self.vocab_size}-word teacher, the student has {vocab_size} "
                              "words; write the file with the conversion's source model")
        if seq_len != self.seq_len:
            raise YouzhiError(f"{self.path} was written for seq_length {self.seq_len}, this run has {seq_len}; "
                              "use the same runner_config.seq_length or rewrite the file")
        if abs(temperature - self.temperature) > 1e-9 * max(1.0, temperature):
            raise YouzhiError(f"{self.path} holds log-probabilities at temperature {self.temperature}, this run's "
                              f"distill.temperature is {temperature}; use the same temperature or rewrite the file")

    def batch(self, rows: Sequence[int], input_ids: np.ndarray) -> Dict[str, np.ndarray]:
        """ids int32 [B, T, k], lq_top float32 [B, T, k], lq_tail float32 [B, T] of dataset windows `rows`, whose
        tokens must be `input_ids` (the file was written from the same data)."""
        idx = []
        for r in rows:
            if int(r) not in self.index:
                raise YouzhiError(f"{self.path} has no entry for dataset window {int(r)}; it was written for other "
                                  "data or fewer steps (rewrite it with the run's config and max_steps)")
            idx.append(self.index[int(r)])
        stored = np.asarray(self.arrays["input_ids"][idx])
        if not np.array_equal(stored, np.asarray(input_ids, np.int32)):
            raise YouzhiError(f"{self.path}: the stored tokens of dataset window(s) {list(map(int, rows))} differ "
                              "from this run's; the file was written from another dataset, tokenizer or "
                              "seq_length")
        ids = np.asarray(self.arrays["ids"][idx]).astype(np.int32)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise YouzhiError(f"{self.path}: word ids outside [0, {self.vocab_size}); the file is damaged")
        return {"ids": ids, "lq_top": np.asarray(self.arrays["logp"][idx]),
                "lq_tail": np.asarray(self.arrays["tail"][idx])}


def topk_of_logits(logits: np.ndarray, k: int, temperature: float):
    """Top-k (ids, log-probs) and tail log-mass per row of logits [..., V] at `temperature`, in float64 then stored
    as float32 (ids sorted by decreasing probability)."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    lse = np.log(np.exp(z).sum(-1, keepdims=True))
    lp = z - lse
    ids = np.argpartition(-lp, k - 1, axis=-1)[..., :k] if k < lp.shape[-1] else \
        np.broadcast_to(np.arange(lp.shape[-1]), lp.shape).copy()
    top = np.take_along_axis(lp, ids, -1)
    order = np.argsort(-top, -1, kind="stable")
    ids, top = np.take_along_axis(ids, order, -1), np.take_along_axis(top, order, -1)
    rest = lp.copy()
    np.put_along_axis(rest, ids, -np.inf, -1)
    return ids.astype(np.int64), top.astype(np.float32), _logsumexp(rest).astype(np.float32)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """log sum exp over the last axis; -inf for a row of -inf (an empty bucket), not NaN."""
    m = x.max(-1, keepdims=True)
    safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.where(np.isfinite(m[..., 0]), (safe + np.log(np.exp(x - safe).sum(-1, keepdims=True)))[..., 0],
                        -np.inf)


def shrink(ids: np.ndarray, logp: np.ndarray, tail: np.ndarray, k: int):
    """The top-k of a stored top-K (K >= k, sorted): the first k entries, the others folded into the tail."""
    parts = np.concatenate([logp[..., k:].astype(np.float64), tail[..., None].astype(np.float64)], -1)
    return ids[..., :k], logp[..., :k], _logsumexp(parts).astype(np.float32)


def rows_for_steps(n_windows: int, seed: int, shuffle: bool, steps: int, rows_per_step: int) -> np.ndarray:
    """The dataset windows the trainer's sampler visits in `steps` optimizer steps of `rows_per_step` global rows
    (batch_size x data-parallel workers x accumulation), sorted."""
    sampler = EpochSampler(n_windows, seed, shuffle)
    return np.unique(np.concatenate([sampler.take(rows_per_step) for _ in range(steps)]))


def write_teacher_topk(cfg: dict, out: str, k: int, steps: Optional[int] = None, world: int = 1,
                       batch_size: int = 2, source: Optional[str] = None, progress: bool = True,
                       resume: bool = True) -> dict:
    """Run the teacher (`distill.teacher`) over the training windows of run config `cfg` (load_run_config's dict)
    and write their top-k file to `out`: every window, or (`steps`) those the trainer visits in that many steps with
    `world` data-parallel workers. With `source` (a file with k' >= k) shrink it instead of running the teacher. An
    interrupted run resumes from `out + '.partial'`."""
    if os.path.exists(out):
        raise YouzhiError(f"{out} already exists; choose another --out (this tool never replaces a file)")
    run = RunConfig.parse(cfg)
    distill = run.distill
    student = run.model.student
    if student is None:
        raise YouzhiError("model.student is not set: the training data is tokenized with the student's tokenizer")
    tok = Tokenizer.from_dir(student)
    seq_len = run.runner.seq_length
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eot_id
    dataset = build_dataset(cfg["train_dataset"], tok, seq_len, pad_id)
    if steps is None:
        rows = np.arange(len(dataset))
    else:
        rows = rows_for_steps(len(dataset), run.seed, run.train_dataset.shuffle, steps,
                              run.runner.batch_size * world * run.runner.gradient_accumulation_steps)
    temperature = float(distill.temperature)
    if source is not None:
        src = TopKStore(source)
        if src.k < k or src.seq_len != seq_len or abs(src.temperature - temperature) > 1e-9:
            raise YouzhiError(f"{source} (k {src.k}, seq_length {src.seq_len}, temperature {src.temperature}) "
                              f"cannot give k {k} at seq_length {seq_len}, temperature {temperature}")
        vocab, meta = src.vocab_size, dict(src.header["meta"], shrunk_from=source, k=k)
    else:
        if distill.teacher is None:
            raise YouzhiError("distill.teacher is not set; pass the source (GQA) model directory")
        vocab = load_any_config(read_config(distill.teacher)).vocab_size
        meta = {"teacher": distill.teacher, "data_path": run.train_dataset.data_path, "k": k}
    if not 1 <= k <= vocab:
        raise YouzhiError(f"--k must be in [1, {vocab}], got {k}")
    writer = TopKWriter(out, rows, seq_len, k, vocab, temperature, meta, resume=resume)
    todo = np.flatnonzero(~writer.done())
    if source is not None:
        for i in ProgressBar(todo, desc="shrink", unit="window", disable=not progress):
            ex = dataset[int(rows[i])]
            stored = src.batch([int(rows[i])], ex.input_ids[None])
            ids, lp, tail = shrink(stored["ids"][0], stored["lq_top"][0], stored["lq_tail"][0], k)
            writer.write(i, ex.input_ids, ids, lp, tail)
        return {"path": writer.close(), "windows": int(len(rows)), "k": k}
    teacher, _ = load_model(distill.teacher)
    bar = ProgressBar(total=len(todo), desc=f"teacher top-{k}", unit="window", disable=not progress)
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        ids_in = np.stack([dataset[int(rows[i])].input_ids for i in idx])
        logits = teacher(ms.Tensor(ids_in, ms.int32)).asnumpy()
        top_ids, top_lp, tail = topk_of_logits(logits, k, temperature)
        for j, i in enumerate(idx):
            writer.write(i, ids_in[j], top_ids[j], top_lp[j], tail[j])
        bar.update(len(idx))
    bar.close()
    return {"path": writer.close(), "windows": int(len(rows)), "k": k}
