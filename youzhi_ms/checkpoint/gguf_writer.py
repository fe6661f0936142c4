"""Hugging Face model directory -> one GGUF file that stock llama.cpp loads, written with the `gguf` library (the
llama.cpp project's own writer; `gguf.GGUFWriter`), never byte by byte here.

Architectures (the GGUF name llama.cpp dispatches on):
- DeepSeek-V3 dense MLA (the `--export deepseek` output of the converter) -> `deepseek2`. kv_b_proj [H*(nope+v), r]
  is split per head into attn_k_b [H, r, nope] (the key half, transposed so llama.cpp can absorb it into the query and
  attend on the latent) and attn_v_b [H, v, r]; the cache is then one (r + rope)-wide K row per token and no V.
  `q_lora_rank` null is written as 0 into the GGUF (llama.cpp requires the key; 0 in config.json would make
  transformers build random q_a/q_b projections, so the contract keeps it null there).
- Llama / Mistral (no sliding window) -> `llama`, with Q/K rows interleaved per head (llama.cpp's rope rotates
  consecutive pairs; Hugging Face rotates the two halves).
- Qwen2 -> `qwen2` with its q/k/v biases (llama.cpp's qwen2 rope rotates halves, as Hugging Face does).

What GGUF cannot hold exactly is refused with one line instead of written approximately: the `--export exact` MLA
extensions (a q_proj bias, kv_a / o biases, no latent norm: llama.cpp's deepseek2 graph has neither biases nor a way to
skip kv_a_norm), half-split (non-interleaved) DeepSeek rope, rope_scaling other than linear, and tokenizers that are
not byte-level BPE with a pre-tokenizer llama.cpp names.

Output types follow llama.cpp's converter: f32 / f16 / bf16 / q8_0 for matrices; norms and biases stay f32 (they are
tiny and llama.cpp adds them in f32); a matrix whose rows are not a multiple of the q8_0 block (32) falls back to f16.
Tensors are written one at a time (declared first, then streamed), so memory holds one tensor, not the model.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from youzhi_ms.checkpoint.hf import HFCheckpoint
from youzhi_ms.contract import GGUF_Q_LORA_RANK_NONE, MLA_MODEL_TYPE, check_runnable, parse_config
from youzhi_ms.errors import YouzhiError
from youzhi_ms.fsutil import atomic_output_file, check_output_file
from youzhi_ms.progress import ProgressBar

# `gguf` (the llama.cpp project's writer) is an optional dependency (setup.py's test extra): it is imported inside the
# functions that use it, so this module, which the pipeline imports, loads without it.

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
ARCH_OF = {MLA_MODEL_TYPE: "deepseek2", "llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
DEFAULT_CONTEXT = 4096  # context_length when config.json has no max_position_embeddings
Q8_BLOCK = 32
JSON_MAX_BYTES = 64 << 20  # tokenizer.json of Llama-3 / Qwen2 are 7-9 MiB

# The pre-tokenizer regexes llama.cpp implements, by the name its vocab loader dispatches on (src/llama-vocab.cpp of
# llama.cpp as vendored by llama-cpp-python 0.3.36). Matched against tokenizer.json's pre_tokenizer structure.
_GPT2_RE = None  # ByteLevel(use_regex=True) carries the GPT-2 regex itself
_LLAMA3_RE = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
              "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_RE = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
             "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


# ---------------------------------------------------------------------------------------------------- tokenizer
def _read_json(path: str, what: str) -> dict:
    try:
        if os.path.getsize(path) > JSON_MAX_BYTES:
            raise YouzhiError(f"{path} is over {JSON_MAX_BYTES >> 20} MiB; that is not a {what} (the largest real "
                              "ones are ~10 MiB)")
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except OSError as exc:
        raise YouzhiError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError):
        raise YouzhiError(f"{path} is not valid UTF-8 JSON; replace the {what}") from None
    if not isinstance(obj, dict):
        raise YouzhiError(f"{path} is not a JSON object; replace the {what}")
    return obj


def tokenizer_pre(pre: Optional[dict]) -> str:
    """The llama.cpp pre-tokenizer name of a tokenizer.json `pre_tokenizer`, or one error naming what it is."""
    def kind(p):
        return p.get("type") if isinstance(p, dict) else None

    parts = pre.get("pretokenizers") if kind(pre) == "Sequence" else [pre]
    parts = parts if isinstance(parts, list) else []
    kinds = [kind(p) for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # digits one by one, then the GPT-2 regex
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex == _QWEN2_RE:
            return "qwen2"
        if regex == _LLAMA3_RE:
            return "llama-bpe"
    raise YouzhiError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not one llama.cpp "
                      "implements under a known name (GPT-2 byte-level, SmolLM2 digits + byte-level, Qwen2, Llama-3); "
                      "llama.cpp would split text differently from the model's own tokenizer")


@dataclass
class Vocab:
    tokens: List[str]
    types: List[int]
    merges: List[str]
    pre: str
    special: Dict[str, int]  # bos / eos / unk / pad -> id
    add_bos: bool
    add_eos: bool
    chat_template: Optional[str]


def read_vocab(model_dir: str, vocab_size: int) -> Vocab:
    """The byte-level BPE vocabulary of `model_dir`'s tokenizer.json, padded to the model's vocab_size with unused
    tokens (embedding rows no text maps to), plus the special ids and chat template of tokenizer_config.json."""
    import gguf
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise YouzhiError(f"{model_dir} has no tokenizer.json; llama.cpp needs the vocabulary inside the GGUF: copy the "
                          "source model's tokenizer files into the directory")
    tj = _read_json(path, "tokenizer.json")
    model = tj.get("model") if isinstance(tj.get("model"), dict) else {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or kind_of(tj.get("decoder")) != "ByteLevel":
        raise YouzhiError(f"{path}: only byte-level BPE tokenizers (GPT-2 style: Llama-3, Qwen2, SmolLM2) are written; "
                          f"this one is {model.get('type')} with a {kind_of(tj.get('decoder'))} decoder")
    pre = tokenizer_pre(tj.get("pre_tokenizer"))
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and type(v) is int for k, v in vocab.items()):
        raise YouzhiError(f"{path}: model.vocab is not an object of token -> id; the file is damaged")
    by_id: Dict[int, Tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in vocab.items()}
    for tok in tj.get("added_tokens") or []:
        if not isinstance(tok, dict) or type(tok.get("id")) is not int or not isinstance(tok.get("content"), str):
            raise YouzhiError(f"{path}: an added_tokens entry lacks an integer id or a content string")
        by_id[tok["id"]] = (tok["content"],
                            gguf.TokenType.CONTROL if tok.get("special") else gguf.TokenType.USER_DEFINED)
    if not by_id or min(by_id) < 0 or max(by_id) >= vocab_size:
        raise YouzhiError(f"{path}: token ids run to {max(by_id, default=-1)}, beyond the model's vocab_size "
                          f"{vocab_size}; the tokenizer belongs to another model")
    tokens, types = [], []
    for i in range(vocab_size):
        text, typ = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(int(typ))
    merges = model.get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges
              if isinstance(m, str) or (isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m))]
    if not merges:
        raise YouzhiError(f"{path} has no BPE merges; llama.cpp does not load a BPE vocabulary without them")
    tcfg_path = os.path.join(model_dir, "tokenizer_config.json")
    tcfg = _read_json(tcfg_path, "tokenizer_config.json") if os.path.isfile(tcfg_path) else {}
    ids = {t: i for i, t in enumerate(tokens)}
    special = {}
    for key in ("bos", "eos", "unk", "pad"):
        val = tcfg.get(f"{key}_token")
        val = val.get("content") if isinstance(val, dict) else val
        if isinstance(val, str) and val in ids:
            special[key] = ids[val]
    template = tcfg.get("chat_template")
    jinja = os.path.join(model_dir, "chat_template.jinja")
    if template is None and os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read(1 << 20)
    return Vocab(tokens, types, merges, pre, special, bool(tcfg.get("add_bos_token", False)),
                 bool(tcfg.get("add_eos_token", False)), template if isinstance(template, str) else None)


def kind_of(obj) -> Optional[str]:
    return obj.get("type") if isinstance(obj, dict) else None


# ---------------------------------------------------------------------------------------------------- tensors
@dataclass
class _Tensor:
    name: str  # GGUF name
    shape: Tuple[int, ...]  # numpy (row-major) shape; ggml's ne is its reverse
    load: Callable[[], np.ndarray]  # float32 data


def _interleave_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face rotate_half row order -> llama.cpp's consecutive rope pairs, per head (rows = heads x head_dim)."""
    rows = w.shape[0]
    d = rows // n_heads
    return w.reshape((n_heads, 2, d // 2) + w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _plan(ck: HFCheckpoint, f: dict) -> List[_Tensor]:
    arch = ARCH_OF[f["model_type"]]
    H, L = f["num_attention_heads"], f["num_hidden_layers"]
    shapes = {}

    def t(gname, hf, fn=None, shape=None):
        shp = shape or ck.shape(hf)
        shapes[gname] = shp
        return _Tensor(gname, tuple(shp), (lambda: fn(ck.get(hf))) if fn else (lambda: ck.get(hf)))

    out = [t("token_embd.weight", "model.embed_tokens.weight")]
    for i in range(L):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out += [t(b + "attn_norm.weight", p + "input_layernorm.weight")]
        if arch == "deepseek2":
            nope, v, r = f["qk_nope_head_dim"], f["v_head_dim"], f["kv_lora_rank"]
            if f["q_lora_rank"] is None:
                out.append(t(b + "attn_q.weight", p + "self_attn.q_proj.weight"))
            else:
                out += [t(b + "attn_q_a.weight", p + "self_attn.q_a_proj.weight"),
                        t(b + "attn_q_a_norm.weight", p + "self_attn.q_a_layernorm.weight"),
                        t(b + "attn_q_b.weight", p + "self_attn.q_b_proj.weight")]
            kvb = p + "self_attn.kv_b_proj.weight"
            out += [t(b + "attn_kv_a_mqa.weight", p + "self_attn.kv_a_proj_with_mqa.weight"),
                    t(b + "attn_kv_a_norm.weight", p + "self_attn.kv_a_layernorm.weight"),
                    # per head: nope key rows then v rows; the key part transposed to [r, nope]
                    t(b + "attn_k_b.weight", kvb, lambda w, nope=nope, v=v, r=r:
                      np.ascontiguousarray(w.reshape(H, nope + v, r)[:, :nope].transpose(0, 2, 1)), (H, r, nope)),
                    t(b + "attn_v_b.weight", kvb, lambda w, nope=nope, v=v, r=r:
                      np.ascontiguousarray(w.reshape(H, nope + v, r)[:, nope:]), (H, v, r))]
        else:
            kv = f["num_key_value_heads"]
            qk = (lambda n: (lambda w: _interleave_rows(w, n))) if arch == "llama" else (lambda n: None)
            out += [t(b + "attn_q.weight", p + "self_attn.q_proj.weight", qk(H)),
                    t(b + "attn_k.weight", p + "self_attn.k_proj.weight", qk(kv)),
                    t(b + "attn_v.weight", p + "self_attn.v_proj.weight")]
            if f["qkv_bias"]:
                out += [t(b + "attn_q.bias", p + "self_attn.q_proj.bias", qk(H)),
                        t(b + "attn_k.bias", p + "self_attn.k_proj.bias", qk(kv)),
                        t(b + "attn_v.bias", p + "self_attn.v_proj.bias")]
        out.append(t(b + "attn_output.weight", p + "self_attn.o_proj.weight"))
        if f["o_bias"] and arch != "deepseek2":
            out.append(t(b + "attn_output.bias", p + "self_attn.o_proj.bias"))
        out += [t(b + "ffn_norm.weight", p + "post_attention_layernorm.weight"),
                t(b + "ffn_gate.weight", p + "mlp.gate_proj.weight"),
                t(b + "ffn_up.weight", p + "mlp.up_proj.weight"),
                t(b + "ffn_down.weight", p + "mlp.down_proj.weight")]
    out.append(t("output_norm.weight", "model.norm.weight"))
    if not f["tie_word_embeddings"]:
        out.append(t("output.weight", "lm_head.weight"))
    return out


def _encode(name: str, shape: Tuple[int, ...], outtype: str):
    """(ggml type, byte shape, numpy dtype of the stored array, encoder) for one tensor."""
    import gguf
    from gguf.quants import quant_shape_to_byte_shape, quantize
    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or outtype == "f32":  # norms and biases stay f32, as in llama.cpp's converter
        return Q.F32, shape, np.float32, lambda a: a.astype(np.float32, copy=False)
    if outtype == "q8_0" and shape[-1] % Q8_BLOCK == 0:
        return Q.Q8_0, quant_shape_to_byte_shape(shape, Q.Q8_0), np.uint8, lambda a: quantize(a, Q.Q8_0)
    if outtype == "bf16":
        return Q.BF16, quant_shape_to_byte_shape(shape, Q.BF16), np.uint8, lambda a: quantize(a, Q.BF16)
    return Q.F16, shape, np.float16, lambda a: a.astype(np.float16)  # f16, or q8_0 rows that do not fill blocks


# ---------------------------------------------------------------------------------------------------- checks
def check_exportable(cfg: dict, f: dict, where: str) -> None:
    """Refuse what llama.cpp cannot run exactly as the Hugging Face model computes it."""
    check_runnable(cfg, f, where)
    rs = f["rope_scaling"]
    kind = (rs or {}).get("rope_type", (rs or {}).get("type", "default"))
    if kind not in ("default", "linear"):
        raise YouzhiError(f"{where}: rope_scaling type {kind} is not written to GGUF by this exporter yet (none and "
                          "linear are); use llama.cpp's own convert_hf_to_gguf.py for this model")
    if f["model_type"] != MLA_MODEL_TYPE:
        return
    extensions = [name for name, on in (("a q_proj bias", f["q_bias"]), ("kv_a / o_proj biases", f["qkv_bias"]),
                                        ("no kv_a_layernorm", not f["kv_layernorm"])) if on]
    if extensions:
        raise YouzhiError(f"{where} is an exact-export MLA model ({', '.join(extensions)}); llama.cpp's deepseek2 graph "
                          "has no attention biases and always normalises the latent, so it cannot run it exactly: "
                          "convert with --export deepseek (the stock serving format) and export that")
    if not f["rope_interleave"]:
        raise YouzhiError(f"{where}: rope_interleave is false (rotate-half rope); llama.cpp's deepseek2 rotates "
                          "interleaved pairs: export a model with rope_interleave true (every youzhi_ms conversion)")


# ---------------------------------------------------------------------------------------------------- writing
def _metadata(w, cfg: dict, f: dict, arch: str, outtype: str, name: str) -> None:
    import gguf
    L, H = f["num_hidden_layers"], f["num_attention_heads"]
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    w.add_block_count(L)
    w.add_context_length(f["max_position_embeddings"] or DEFAULT_CONTEXT)
    w.add_embedding_length(f["hidden_size"])
    w.add_feed_forward_length(f["intermediate_size"])
    w.add_head_count(H)
    w.add_rope_freq_base(f["rope_theta"])
    w.add_layer_norm_rms_eps(f["rms_norm_eps"])
    w.add_vocab_size(f["vocab_size"])
    rs = f["rope_scaling"] or {}
    if rs.get("rope_type", rs.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs["factor"]))
    if arch == "deepseek2":
        r, rope = f["kv_lora_rank"], f["qk_rope_head_dim"]
        # MLA as llama.cpp runs it: one shared (r + rope)-wide key head, values read from the latent (r wide)
        w.add_head_count_kv(1)
        w.add_key_length(r + rope)
        w.add_value_length(r)
        w.add_key_length_mla(f["qk_nope_head_dim"] + rope)
        w.add_value_length_mla(f["v_head_dim"])
        w.add_kv_lora_rank(r)
        w.add_q_lora_rank(GGUF_Q_LORA_RANK_NONE if f["q_lora_rank"] is None else f["q_lora_rank"])
        w.add_rope_dimension_count(rope)
        w.add_leading_dense_block_count(L)  # every layer dense
        w.add_expert_feed_forward_length(f["intermediate_size"])  # required key; unused without experts
        w.add_expert_shared_count(0)
    else:
        d = f["head_dim"]
        w.add_head_count_kv(f["num_key_value_heads"])
        w.add_key_length(d)
        w.add_value_length(d)
        w.add_rope_dimension_count(d)


def _add_vocab(w, v: Vocab) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    w.add_token_merges(v.merges)
    for key, tid in v.special.items():
        getattr(w, f"add_{key}_token_id")(tid)
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(v.add_eos)
    if v.chat_template:
        w.add_chat_template(v.chat_template)


def export_gguf(model_dir: str, outfile: str, outtype: str = "f32", progress: bool = True,
                overwrite: bool = False) -> dict:
    """Write `model_dir` (a Hugging Face Llama / Qwen2 / Mistral or dense DeepSeek-V3 directory) to `outfile` under
    the output rule (youzhi_ms/fsutil.py: refused if it exists without `overwrite` or is an input; written to a temp
    sibling and renamed when complete). Returns a summary dict."""
    try:
        import gguf  # a runtime dependency (setup.py); imported here so that reading GGUF files does not need it
    except ImportError:
        raise YouzhiError("the GGUF export needs the `gguf` package (the llama.cpp project's writer), which this "
                          "environment lacks: run `bash run_scripts/setup_env.sh` or `pip install gguf==0.19.0`"
                          ) from None
    if outtype not in OUTTYPES:
        raise YouzhiError(f"--outtype {outtype!r}: use one of {', '.join(OUTTYPES)}")
    check_output_file(outfile, overwrite, [("--model", model_dir)], "--outfile")
    ck = HFCheckpoint(model_dir)
    where = os.path.join(model_dir, "config.json")
    fields = parse_config(ck.config, where)
    check_exportable(ck.config, fields, where)
    arch = ARCH_OF[fields["model_type"]]
    vocab = read_vocab(model_dir, fields["vocab_size"])
    plan = _plan(ck, fields)
    types: Dict[str, int] = {}
    with atomic_output_file(outfile, overwrite, [("--model", model_dir)], "--outfile") as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        _metadata(writer, ck.config, fields, arch, outtype,
                  os.path.basename(os.path.abspath(model_dir).rstrip(os.sep)))
        _add_vocab(writer, vocab)
        encoders = []
        for te in plan:
            qtype, byte_shape, dt, enc = _encode(te.name, te.shape, outtype)
            nbytes = int(np.prod(byte_shape)) * np.dtype(dt).itemsize
            writer.add_tensor_info(te.name, byte_shape, np.dtype(dt), nbytes, raw_dtype=qtype)
            encoders.append((te, enc, byte_shape))
            types[qtype.name] = types.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        it = encoders
        if progress:
            it = ProgressBar(encoders, desc=f"{os.path.basename(outfile)} ({arch}, {outtype})", unit="tensor",
                             leave=False)
        for te, enc, byte_shape in it:
            arr = te.load()
            if tuple(arr.shape) != tuple(te.shape):
                raise YouzhiError(f"{model_dir}: {te.name} came out {arr.shape}, expected {te.shape}")
            data = np.ascontiguousarray(enc(arr))
            writer.write_tensor_data(data.reshape(byte_shape))
        writer.close()
    return {"path": outfile, "arch": arch, "outtype": outtype, "n_tensors": len(plan), "tensor_types": types,
            "bytes": os.path.getsize(outfile), "pre_tokenizer": vocab.pre, "n_vocab": len(vocab.tokens)}
