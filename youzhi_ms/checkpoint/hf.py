"""Hugging Face checkpoint directories: config.json plus single-file or sharded safetensors, read one tensor at a time.

bf16 tensors are widened to float32 with a bit shift in numpy, so reading never depends on a framework's bf16 support.
Writing goes through `atomic_output_dir` so an interrupted job never leaves a half-written directory.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
from typing import Dict, Iterable, Mapping, Optional, Tuple

import numpy as np

from youzhi_ms.cli import path_problem
from youzhi_ms.contract import MLA_MODEL_TYPE, expected_tensors, parse_config, read_config_json, stock_mla_config
from youzhi_ms.errors import YouzhiError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files copied verbatim from a source directory into a converted one (tokenizer, chat template, generation settings).
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed, never read
HEADER_MAX_BYTES = 100_000_000  # the safetensors library's own limit
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def check_finite(arr: np.ndarray, st_dtype: str, where: str, name: str) -> None:
    """Refuse a tensor holding NaN or Inf (stored dtype `st_dtype`, BF16 as its uint16 bits): carried into a conversion
    or a training run it poisons every output that touches it (an Inf embedding row makes the model emit token 0)."""
    if st_dtype == "BF16":
        bad = (np.asarray(arr).view(np.uint16) & 0x7F80) == 0x7F80
    elif st_dtype in ("F32", "F16", "F64"):
        bad = ~np.isfinite(arr)
    else:
        return
    if bad.any():
        at = np.unravel_index(int(np.argmax(bad)), np.shape(bad)) if np.ndim(bad) else ()
        raise YouzhiError(f"{where}: tensor {name} holds {int(bad.sum())} NaN/Inf value(s) (first at index "
                          f"{tuple(int(i) for i in at)}); the weights are damaged: re-export or re-download them")


def _more(names: list) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bf16 bit pattern (uint16)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + 0x7FFF
    return ((u + rounding) >> 16).astype(np.uint16)


def read_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        problem = path_problem(model_dir, "folder")
        parent = os.path.dirname(os.path.abspath(model_dir))
        if os.path.isfile(model_dir) and os.path.isfile(os.path.join(parent, "config.json")):
            problem += f"; pass the model's folder, {parent}"  # e.g. its config.json was given
        raise YouzhiError(f"model directory {model_dir} {problem}")
    if not os.path.isfile(path):
        raise YouzhiError(f"{model_dir} has no config.json; pass a Hugging Face model directory "
                          "(tools/gguf_to_hf.py makes one from a GGUF file)")
    return read_config_json(path)


def _damaged(path: str, what: str) -> YouzhiError:
    return YouzhiError(f"{path}: {what}; the file is not a valid safetensors file (damaged or not a checkpoint): "
                       "replace it with a complete copy")


def _read_header(path: str) -> Tuple[dict, int]:
    """The tensor table of a safetensors file, checked as hostile input: a sane header length, a JSON object, every
    entry with a known dtype, a shape of non-negative integers and data_offsets inside the file that match the shape
    and do not overlap another tensor's bytes."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise _damaged(path, f"only {size} bytes")
            (n,) = struct.unpack("<Q", raw)
            if n > HEADER_MAX_BYTES or 8 + n > size:
                raise _damaged(path, f"the header claims {n} bytes (the file has {size})")
            text = f.read(n)
    except OSError as exc:
        raise YouzhiError(f"cannot read {path}: {exc.strerror}") from None
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _damaged(path, "the header is not JSON") from None
    if not isinstance(header, dict):
        raise _damaged(path, "the header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
        raise _damaged(path, "__metadata__ is not an object")
    body = size - 8 - n
    spans = []
    for name, m in header.items():
        if not isinstance(m, dict) or not {"dtype", "shape", "data_offsets"} <= set(m):
            raise _damaged(path, f"tensor {name!r} lacks dtype / shape / data_offsets")
        dt, shape, offs = m["dtype"], m["shape"], m["data_offsets"]
        if dt not in _ST_DTYPES:
            raise YouzhiError(f"{path}: tensor {name} has unsupported dtype {dt!r} (supported: "
                              f"{', '.join(_ST_DTYPES)}); convert the checkpoint to float32/bfloat16/float16")
        if not isinstance(shape, list) or not all(type(x) is int and x >= 0 for x in shape):
            raise _damaged(path, f"tensor {name!r} has shape {shape!r}")
        if not isinstance(offs, list) or len(offs) != 2 or not all(type(x) is int for x in offs) or \
                not 0 <= offs[0] <= offs[1] <= body:
            raise _damaged(path, f"tensor {name!r} has data_offsets {offs!r} outside the {body}-byte data area")
        if offs[1] - offs[0] != math.prod(shape) * np.dtype(_ST_DTYPES[dt]).itemsize:
            raise _damaged(path, f"tensor {name!r} has {offs[1] - offs[0]} bytes for shape {shape} in {dt}")
        spans.append((offs[0], offs[1], name))
    spans.sort()
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise _damaged(path, f"tensors {an!r} and {bn!r} share bytes (overlapping data_offsets)")
    return header, 8 + n


def _read_index(model_dir: str) -> Dict[str, str]:
    """weight_map of model.safetensors.index.json: tensor name -> shard file, the shard inside `model_dir`."""
    path = os.path.join(model_dir, INDEX_FILE)
    index = read_config_json(path)
    wm = index.get("weight_map")
    if not isinstance(wm, dict) or not wm or \
            not all(isinstance(k, str) and isinstance(v, str) and v for k, v in wm.items()):
        raise YouzhiError(f"{path}: weight_map must be a non-empty object of tensor name -> shard file; the index is "
                          "damaged: replace it (or remove it when the directory holds a single model.safetensors)")
    root = os.path.realpath(model_dir)
    for shard in sorted(set(wm.values())):
        real = os.path.realpath(os.path.join(root, shard))
        if os.path.isabs(shard) or not real.startswith(root + os.sep):
            raise YouzhiError(f"{path}: shard {shard!r} lies outside {model_dir}; an index may only name files in "
                              "its own directory, so it is not followed: fix the index")
    return wm


class HFCheckpoint:
    """Lazy view of a HF model directory's tensors: `names()`, `shape(name)`, `dtype(name)`, `get(name)` (float32)."""

    def __init__(self, model_dir: str, check: bool = True):
        """`check`: compare the tensors with config.json (see `_check_against_config`)."""
        self.dir = model_dir
        self.config = read_config(model_dir)
        index_path = os.path.join(model_dir, INDEX_FILE)
        single = os.path.join(model_dir, SINGLE_FILE)
        if os.path.isfile(index_path):
            weight_map: Optional[Dict[str, str]] = _read_index(model_dir)
            missing = sorted({s for s in weight_map.values() if not os.path.isfile(os.path.join(model_dir, s))})
            if missing:
                raise YouzhiError(f"{model_dir}: shard(s) {', '.join(missing)} listed in {INDEX_FILE} are missing; "
                                  "copy the complete checkpoint (all shards) into the directory")
        elif os.path.isfile(single):
            weight_map = None
        else:
            raise YouzhiError(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}; only safetensors checkpoints "
                              "are read (convert .bin/pickle checkpoints with transformers' save_pretrained first)")
        self._entries: Dict[str, Tuple[str, dict, int]] = {}
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        for fname in files:
            fpath = os.path.join(model_dir, fname)
            header, offset = _read_header(fpath)
            for name, meta in header.items():
                if name in self._entries:
                    raise YouzhiError(f"{model_dir}: tensor {name} is stored twice ({self._entries[name][0]} and "
                                      f"{fpath}); the shards are from different checkpoints")
                self._entries[name] = (fpath, meta, offset)
        if weight_map:
            absent = sorted(set(weight_map) - set(self._entries))
            if absent:
                raise YouzhiError(f"{model_dir}: tensor {absent[0]} is listed in {INDEX_FILE} but not found in its "
                                  f"shard {weight_map[absent[0]]}; the shard is corrupt or from another checkpoint")
        if check:
            self._check_against_config()

    def _check_against_config(self) -> None:
        """Every tensor the config implies is there with its shape and a floating-point dtype, and nothing else
        (contract.expected_tensors), before any weight is read or any model is built."""
        # lazy: the converter reads checkpoints through this module and imports nothing from models/ (the MindSpore
        # models' package; tests/test_convert_exact.py)
        from youzhi_ms.models.names import ms_to_hf
        f = parse_config(self.config, os.path.join(self.dir, "config.json"))
        want = expected_tensors(f)
        kind = "mla" if f["model_type"] == MLA_MODEL_TYPE else "gqa"
        ms_layout = any(n.startswith(("decoder.", "embedding.")) for n in self._entries)
        have = {ms_to_hf(n, kind) if ms_layout else n: n for n in self._entries if not n.endswith(IGNORED_SUFFIXES)}
        if f["tie_word_embeddings"] and "lm_head.weight" in have:  # some tied checkpoints store the head anyway
            want["lm_head.weight"] = want["model.embed_tokens.weight"]
        missing = [n for n in want if n not in have]
        if missing:
            raise YouzhiError(f"{self.dir}: tensor {missing[0]} is missing{_more(missing)}; the checkpoint is "
                              "incomplete or does not match config.json")
        extra = [have[n] for n in have if n not in want]
        if extra:
            raise YouzhiError(f"{self.dir}: tensor {extra[0]}{_more(extra)} is not part of the {f['model_type']} model "
                              "config.json describes; the architecture has parts youzhi_ms does not support (e.g. "
                              "q/k norms) or config.json is wrong")
        for hf_name in want:
            name = have[hf_name]
            meta = self._entries[name][1]
            if tuple(meta["shape"]) != tuple(want[hf_name]):
                raise YouzhiError(f"{self.dir}: tensor {name} has shape {tuple(meta['shape'])}, expected "
                                  f"{tuple(want[hf_name])} from config.json; the weights and config.json do not "
                                  "belong to the same model")
            if meta["dtype"] not in FLOAT_DTYPES:
                raise YouzhiError(f"{self.dir}: tensor {name} is stored as {meta['dtype']}, not a floating-point "
                                  "type; model weights are never integers: the checkpoint is damaged or mislabelled")

    @classmethod
    def from_file(cls, path: str) -> "HFCheckpoint":
        """A lone safetensors file (no config.json), e.g. a converter's per-layer work file."""
        self = cls.__new__(cls)
        self.dir, self.config = os.path.dirname(path), {}
        header, offset = _read_header(path)
        self._entries = {n: (path, m, offset) for n, m in header.items()}
        return self

    def names(self) -> list:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple:
        return tuple(self._entries[name][1]["shape"])

    def dtype(self, name: str) -> str:
        return self._entries[name][1]["dtype"]

    def raw(self, name: str) -> np.ndarray:
        """The tensor in its stored dtype (bf16 as a uint16 bit pattern)."""
        if name not in self._entries:
            raise YouzhiError(f"{self.dir}: tensor {name} is missing from the checkpoint")
        path, meta, offset = self._entries[name]
        dt = _ST_DTYPES.get(meta["dtype"])
        if dt is None:
            raise YouzhiError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        start, end = meta["data_offsets"]
        count = int(np.prod(meta["shape"])) if meta["shape"] else 1
        arr = np.fromfile(path, dtype=dt, count=count, offset=offset + start)
        if arr.nbytes != end - start:
            raise YouzhiError(f"{path}: tensor {name} is truncated; the file is incomplete")
        check_finite(arr, meta["dtype"], path, name)
        return arr.reshape(meta["shape"])

    def file_range(self, name: str) -> Tuple[str, int, int]:
        """(path, byte offset, byte length) of a tensor's stored bytes, for chunked copies."""
        if name not in self._entries:
            raise YouzhiError(f"{self.dir}: tensor {name} is missing from the checkpoint")
        path, meta, offset = self._entries[name]
        start, end = meta["data_offsets"]
        return path, offset + start, end - start

    def row_blocks(self, name: str, block_bytes: int = 64 << 20):
        """The tensor as float32 blocks of leading-axis rows, read block by block (never the whole tensor)."""
        path, start, nbytes = self.file_range(name)
        meta = self._entries[name][1]
        dt = np.dtype(_ST_DTYPES[meta["dtype"]])
        shape = tuple(meta["shape"]) or (1,)
        row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        step = max(1, block_bytes // max(1, row * dt.itemsize))
        for r0 in range(0, shape[0], step):
            n = min(step, shape[0] - r0)
            arr = np.fromfile(path, dtype=dt, count=n * row, offset=start + r0 * row * dt.itemsize)
            if arr.size != n * row:
                raise YouzhiError(f"{path}: tensor {name} is truncated; the file is incomplete")
            check_finite(arr, meta["dtype"], path, name)
            arr = bf16_to_f32(arr) if meta["dtype"] == "BF16" else arr.astype(np.float32, copy=False)
            yield arr.reshape((n,) + shape[1:])

    def take_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """float32 rows of a 2-D tensor through a memory map (an embedding lookup without reading the table)."""
        path, meta, offset = self._entries[name]
        dt = _ST_DTYPES[meta["dtype"]]
        mm = np.memmap(path, dtype=dt, mode="r", offset=offset + meta["data_offsets"][0], shape=tuple(meta["shape"]))
        out = np.asarray(mm[np.asarray(rows)])
        del mm
        check_finite(out, meta["dtype"], path, name)
        return bf16_to_f32(out) if meta["dtype"] == "BF16" else out.astype(np.float32)

    def get(self, name: str, expect_shape: Optional[tuple] = None) -> np.ndarray:
        """The tensor as float32 (fp16/bf16/fp32 sources), shape-checked when `expect_shape` is given."""
        arr = self.raw(name)
        if self.dtype(name) == "BF16":
            arr = bf16_to_f32(arr)
        arr = arr.astype(np.float32, copy=False)
        if expect_shape is not None and tuple(arr.shape) != tuple(expect_shape):
            raise YouzhiError(f"{self.dir}: tensor {name} has shape {tuple(arr.shape)}, expected {tuple(expect_shape)} "
                              "from config.json; the weights and config.json do not belong to the same model")
        return arr


def _encode(arr: np.ndarray, dtype: str) -> Tuple[str, np.ndarray]:
    if dtype == "bf16":
        return "BF16", f32_to_bf16(arr.astype(np.float32, copy=False))
    if dtype == "fp16":
        return "F16", arr.astype(np.float16)
    if dtype == "fp32":
        return "F32", arr.astype(np.float32, copy=False)
    if dtype == "keep":  # raw stored dtype, e.g. from HFCheckpoint.raw
        inv = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
        return inv[arr.dtype], arr
    raise YouzhiError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16")


def _write_header(f, header: dict) -> None:
    """The safetensors preamble: little-endian u64 length, then the JSON header space-padded to 8 bytes."""
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    f.write(struct.pack("<Q", len(hb)))
    f.write(hb)


def save_safetensors(path: str, tensors: Iterable[Tuple[str, np.ndarray]], dtype: str = "fp32",
                     raw_dtypes: Optional[Mapping[str, str]] = None, metadata: Optional[dict] = None) -> None:
    """Write (name, array) pairs as one safetensors file. Arrays are encoded as `dtype`; with `raw_dtypes`, a name's
    array is taken as already encoded in that safetensors dtype (used for bit-exact bf16 round trips)."""
    items = []
    for name, arr in tensors:
        if raw_dtypes and name in raw_dtypes:
            st, data = raw_dtypes[name], np.ascontiguousarray(arr)
        else:
            st, data = _encode(np.ascontiguousarray(arr), dtype)
        items.append((name, st, np.ascontiguousarray(data)))
    header, offset = {}, 0
    for name, st, data in items:
        header[name] = {"dtype": st, "shape": list(data.shape), "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    with open(path, "wb") as f:
        _write_header(f, header)
        for _, _, data in items:
            f.write(memoryview(data).cast("B"))  # no second copy of the tensor


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def copy_side_files(src_dir: str, dst_dir: str) -> None:
    """Copy tokenizer / generation files that exist in src_dir."""
    for name in SIDE_FILES:
        p = os.path.join(src_dir, name)
        if os.path.isfile(p):
            shutil.copy2(p, os.path.join(dst_dir, name))


def write_model_files(out_dir: str, config: Mapping, side_files_from: str) -> None:
    """The non-weight files of a Hugging Face model directory, the same for every writer (conversion, training's
    hf_model, merged slices): config.json through the contract (`contract.stock_mla_config`) and the tokenizer /
    generation side files of `side_files_from`."""
    write_json(os.path.join(out_dir, "config.json"), stock_mla_config(config, os.path.join(out_dir, "config.json")))
    copy_side_files(side_files_from, out_dir)


class ShardedWriter:
    """Write tensors into shards of at most `max_shard_bytes`, plus the index file.

    Each tensor is encoded and appended to the current shard's body file as it arrives, and a shard's header is written
    in front of its body when the shard is full, so memory holds one tensor at a time, never a shard's worth (a 7B
    conversion's lm_head alone is 1 GB in bf16). `add_file_range` copies stored bytes in chunks without reading the
    whole tensor."""

    CHUNK = 64 << 20

    DEFAULT_SHARD_BYTES = 2 << 30

    def __init__(self, out_dir: str, dtype: str = "fp32", max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out_dir, self.dtype, self.max = out_dir, dtype, max_shard_bytes
        self._shards: list = []  # list of list of names
        self._header: dict = {}
        self._body = None
        self._body_bytes = 0

    @property
    def st_dtype(self) -> str:
        return {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}[self.dtype]

    def _start(self, name: str, st_dtype: str, shape, nbytes: int):
        if self._body is not None and self._header and self._body_bytes + nbytes > self.max:
            self._flush()
        if self._body is None:
            self._body = open(self._part(len(self._shards)) + ".body", "wb")
        self._header[name] = {"dtype": st_dtype, "shape": [int(x) for x in shape],
                              "data_offsets": [self._body_bytes, self._body_bytes + nbytes]}
        self._body_bytes += nbytes
        return self._body

    def add(self, name: str, arr: np.ndarray, raw_dtype: Optional[str] = None) -> None:
        """`raw_dtype` marks `arr` as already encoded in that safetensors dtype (e.g. bf16 bits as uint16)."""
        if raw_dtype is None:
            raw_dtype, arr = _encode(np.ascontiguousarray(arr), self.dtype)
        arr = np.ascontiguousarray(arr)
        self._start(name, raw_dtype, arr.shape, arr.nbytes).write(memoryview(arr).cast("B"))

    def add_file_range(self, name: str, st_dtype: str, shape, path: str, offset: int, nbytes: int,
                       source_name: Optional[str] = None) -> None:
        """A tensor whose encoded bytes are `nbytes` at `offset` of `path` (where it is `source_name`), copied in
        chunks, each checked finite."""
        f = self._start(name, st_dtype, shape, nbytes)
        with open(path, "rb") as src:
            src.seek(offset)
            left = nbytes
            while left:
                buf = src.read(min(self.CHUNK, left))
                if not buf:
                    raise YouzhiError(f"{path}: tensor {name} is truncated; the file is incomplete")
                if st_dtype in _ST_DTYPES and len(buf) % np.dtype(_ST_DTYPES[st_dtype]).itemsize == 0:
                    check_finite(np.frombuffer(buf, _ST_DTYPES[st_dtype]), st_dtype, path, source_name or name)
                f.write(buf)
                left -= len(buf)

    def add_blocks(self, name: str, shape, blocks) -> None:
        """A tensor given as float32 blocks of leading-axis rows (HFCheckpoint.row_blocks), encoded block by block."""
        itemsize = {"bf16": 2, "fp16": 2, "fp32": 4}[self.dtype]
        f = self._start(name, self.st_dtype, shape, int(np.prod(shape)) * itemsize if len(shape) else itemsize)
        for b in blocks:
            f.write(memoryview(np.ascontiguousarray(_encode(b, self.dtype)[1])).cast("B"))

    def _part(self, idx: int) -> str:
        return os.path.join(self.out_dir, f"model-{idx:05d}.safetensors.part")

    def _flush(self) -> None:
        idx = len(self._shards)
        if self._body is None:
            self._body = open(self._part(idx) + ".body", "wb")
        self._body.close()
        with open(self._part(idx), "wb") as f, open(self._part(idx) + ".body", "rb") as body:
            _write_header(f, self._header)
            shutil.copyfileobj(body, f, self.CHUNK)
        os.remove(self._part(idx) + ".body")
        self._shards.append(list(self._header))
        self._header, self._body, self._body_bytes = {}, None, 0

    def close(self) -> None:
        if self._header or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.rename(self._part(0), os.path.join(self.out_dir, SINGLE_FILE))
            return
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(self._part(i), os.path.join(self.out_dir, final))
            weight_map.update({name: final for name in names})
        write_json(os.path.join(self.out_dir, INDEX_FILE), {"metadata": {}, "weight_map": weight_map})
