"""The model-config contract, in one place: what a config.json must hold to be read, and the DeepSeek-V3 config a
GQA -> MLA conversion produces.

Pure Python (no numpy, no MindSpore), so the concurrency planner uses it on any machine. Everything that reads or
writes a model config goes through here:

- `read_config_json`: a config.json read as hostile input (not UTF-8, not JSON, not an object, absurdly large);
- `parse_config`: the validated fields of a Llama / Qwen2 / Mistral (GQA) or dense DeepSeek-V3 (MLA) config. Every
  count is a positive integer (not a string, float or bool), head counts divide, head_dim is even (RoPE pairs),
  rope_scaling holds what its type needs. `config.SourceConfig` / `MLAConfig` (the models, the converter) and
  `infer.planner.ModelShape` are built from these fields; `check_runnable` adds what only the MindSpore models and the
  converter need (SwiGLU, no sliding window, no q/k norm);
- the conversion's dimensions: qk_rope_head_dim (even, divides head_dim) and the maximal rank
  `2 * num_key_value_heads * head_dim - qk_rope_head_dim`, the width of the joint K/V latent with the rope dims moved
  out, where the conversion is lossless (`max_rank`, `check_rank`);
- `mla_config`: the config.json of the converted model. A stock DeepSeek-V3 dense config (num_key_value_heads =
  heads, qk_nope_head_dim = v_head_dim = head_dim, q_lora_rank null, no experts, interleaved rope) that transformers,
  vLLM / vLLM-Ascend and MindFormers load without custom code; `--export exact` adds the youzhi extensions;
- `deployment_warnings`: what will stop or slow a vLLM / vLLM-Ascend deployment of an MLA model.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional

from youzhi_ms.errors import YouzhiError

GQA_MODEL_TYPES = ("llama", "qwen2", "mistral")
MLA_MODEL_TYPE = "deepseek_v3"
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral",
                 "DeepseekV3ForCausalLM": "deepseek_v3"}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "dbrx", "olmoe", "jamba", "granitemoe")
QK_NORM_MODEL_TYPES = ("qwen3", "qwen3_moe", "gemma3", "olmo2", "cohere2")
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "float32": "float32",
                "bfloat16": "bfloat16", "float16": "float16", "float": "float32", "half": "float16"}

# What each engine's MLA path accepts, with the source it was read from (shared/design/serving.md has the details).
# vLLM-Ascend's MLA graph mode (torchair) supports these query-head counts per latent KV head (vllm-ascend #1451).
ASCEND_MLA_GRAPH_HEADS = (32, 64, 128)
# vLLM (CUDA; main branch as read in Dec 2026): the common MLA attention layer takes a cache head of
# kv_lora_rank + qk_rope_head_dim in {320, 576} (older releases: 576 only); FlashMLA, its fastest kernel, 512 + 64.
VLLM_MLA_CACHE_WIDTHS = (320, 576)
FLASHMLA_CACHE_WIDTH = 576
# llama.cpp (ggml-org@0c1e57098, as vendored by llama-cpp-python 0.3.36; measured in tests/test_export_gguf.py and
# benchmarks/bench_llamacpp.py): no constraint on the latent width or the head count; it caches kv_lora_rank + rope per
# token and layer, K only.
CONFIG_MAX_BYTES = 16 << 20  # real config.json files are a few kB
# q_lora_rank null (a full-rank q_proj) as GGUF writes it: llama.cpp's deepseek2 loader requires the key and reads 0 as
# "no q_a / q_b"; config.json keeps null (transformers would build q_a_proj / q_b_proj at random for 0)
GGUF_Q_LORA_RANK_NONE = 0
MAX_POSITIONS = 1 << 22  # ~4M positions: past any released checkpoint, below a RoPE table that exhausts memory


# ---------------------------------------------------------------------------------------------------- reading
def read_config_json(path: str) -> Dict[str, Any]:
    """The JSON object in `path`, or one clear error."""
    try:
        size = os.path.getsize(path)
        if size > CONFIG_MAX_BYTES:
            raise YouzhiError(f"{path} is {size} bytes, not a model config (those are a few kB); check the path")
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as exc:
        raise YouzhiError(f"cannot read {path}: {exc.strerror}; check the path and permissions") from None
    except UnicodeDecodeError:
        raise YouzhiError(f"{path} is not UTF-8 text; it is not a config.json (or it is damaged)") from None
    try:
        cfg = json.loads(text)
    except ValueError as exc:
        raise YouzhiError(f"{path} is not valid JSON ({exc}); fix or replace the file") from None
    if not isinstance(cfg, dict):
        raise YouzhiError(f"{path} holds a JSON {type(cfg).__name__}, not an object of config keys; fix the file")
    return cfg


# ---------------------------------------------------------------------------------------------------- values
def _pos_int(cfg: Mapping, key: str, where: str) -> int:
    val = cfg.get(key)
    if val is None:
        raise YouzhiError(f"{where}: no {key!r} key; pass a complete Hugging Face config.json")
    if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
        raise YouzhiError(f"{where}: {key} must be a positive integer, got {val!r}; fix the config")
    return val


def _opt_pos_int(cfg: Mapping, key: str, where: str) -> Optional[int]:
    return None if cfg.get(key) is None else _pos_int(cfg, key, where)


def _pos_float(cfg: Mapping, key: str, default: float, where: str) -> float:
    val = cfg.get(key)
    if val is None:
        return default
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) or val <= 0:
        raise YouzhiError(f"{where}: {key} must be a positive number, got {val!r}; fix the config")
    return float(val)


def _bool(cfg: Mapping, key: str, where: str, default: bool = False) -> bool:
    val = cfg.get(key)
    if val is None:
        return default
    if not isinstance(val, bool):
        raise YouzhiError(f"{where}: {key} must be true or false, got {val!r}; fix the config")
    return val


def _token_ids(cfg: Mapping, key: str, where: str):
    val = cfg.get(key)
    ok = val is None or (isinstance(val, int) and not isinstance(val, bool) and val >= 0) or \
        (isinstance(val, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in val))
    if not ok:
        raise YouzhiError(f"{where}: {key} must be a token id (or a list of them), got {val!r}; fix the config")
    return val


def rope_type(scaling, where: str = "config") -> str:
    """The rope_scaling type, after checking the fields that type needs."""
    if not scaling:
        return "default"
    if not isinstance(scaling, Mapping):
        raise YouzhiError(f"{where}: rope_scaling must be an object or null, got {scaling!r}; fix the config")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise YouzhiError(f"rope_scaling type {kind!r} is not supported (supported: none, linear, llama3, yarn); "
                          "dynamic/longrope checkpoints need a static rope_scaling to be converted")
    need = {"default": (), "linear": ("factor",), "yarn": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}[kind]
    for key in need:
        if scaling.get(key) is None:
            raise YouzhiError(f"{where}: rope_scaling of type {kind} has no {key}; fix the config")
    for key in ("factor", "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast", "beta_slow",
                "mscale", "mscale_all_dim"):
        _pos_float(scaling, key, None, f"{where}: rope_scaling")
    _opt_pos_int(scaling, "original_max_position_embeddings", f"{where}: rope_scaling")
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise YouzhiError(f"{where}: rope_scaling high_freq_factor must exceed low_freq_factor, got "
                          f"{scaling['high_freq_factor']} <= {scaling['low_freq_factor']}; fix the config")
    return kind


# ---------------------------------------------------------------------------------------------------- parsing
def model_type(cfg: Mapping, where: str = "config") -> str:
    """model_type, else the type behind architectures[0]; the specific refusals come first."""
    arch = cfg.get("architectures")
    arch = arch[0] if isinstance(arch, list) and arch and isinstance(arch[0], str) else None
    mt = cfg.get("model_type")
    if mt is not None and not isinstance(mt, str):
        raise YouzhiError(f"{where}: model_type must be a string, got {mt!r}; fix the config")
    if mt in QK_NORM_MODEL_TYPES or (arch and "Qwen3" in arch):
        raise YouzhiError(f"{arch or mt} ({mt}) applies a per-head q/k RMSNorm before RoPE, which the RoRoPE rotation "
                          "and the MLA latent cannot absorb; only Llama, Qwen2/Qwen2.5 and Mistral (no q/k norm) are "
                          "supported")
    moe_keys = [k for k in ("num_experts", "num_local_experts") if cfg.get(k)]
    if mt in MOE_MODEL_TYPES or moe_keys or (mt and "moe" in mt.lower()):
        raise YouzhiError(f"{where}: {arch or mt} is a mixture-of-experts model ({', '.join(moe_keys) or mt}); "
                          "youzhi_ms handles dense models only (Llama/Qwen2/Mistral GQA, DeepSeek-V3 with "
                          "n_routed_experts null)")
    kind = mt if mt in GQA_MODEL_TYPES + (MLA_MODEL_TYPE,) else ARCHITECTURES.get(arch) if mt is None else None
    if kind is None:
        raise YouzhiError(f"{where}: unsupported model_type {mt!r} (architecture {arch}); supported: "
                          f"{', '.join(GQA_MODEL_TYPES + (MLA_MODEL_TYPE,))} ({', '.join(ARCHITECTURES)})")
    return kind


def parse_config(cfg: Mapping, where: str = "config") -> Dict[str, Any]:
    """The validated, normalised fields of a Hugging Face config dict (keys as in config.json):

    model_type, vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, head_dim (MLA: qk_rope_head_dim), max_position_embeddings (None if absent),
    tie_word_embeddings, rms_norm_eps, rope_theta, rope_scaling, bos_token_id, eos_token_id, mlp_bias and the
    per-architecture bias flags qkv_bias / o_bias (llama: attention_bias covers q, k, v and o; qwen2: q, k, v always,
    o never; mistral: none; deepseek_v3: attention_bias covers kv_a_proj_with_mqa and o_proj). MLA adds kv_lora_rank,
    qk_rope_head_dim, qk_nope_head_dim, v_head_dim, q_lora_rank, rope_interleave and the youzhi extensions q_bias,
    kv_layernorm.
    """
    if not isinstance(cfg, Mapping):
        raise YouzhiError(f"{where}: expected a mapping of config keys, got {type(cfg).__name__}; fix the config")
    fields = _shared_fields(cfg, model_type(cfg, where), where)
    bias = _bool(cfg, "attention_bias", where)
    if fields["model_type"] == MLA_MODEL_TYPE:
        fields.update(_mla_fields(cfg, fields, bias, where))
    else:
        fields.update(_gqa_fields(cfg, fields, bias, where))
    return fields


def _shared_fields(cfg: Mapping, mtype: str, where: str) -> Dict[str, Any]:
    """parse_config's fields every architecture has."""
    f: Dict[str, Any] = {"model_type": mtype}
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"):
        f[key] = _pos_int(cfg, key, where)
    f["max_position_embeddings"] = _opt_pos_int(cfg, "max_position_embeddings", where)
    f["tie_word_embeddings"] = _bool(cfg, "tie_word_embeddings", where)
    f["rms_norm_eps"] = _pos_float(cfg, "rms_norm_eps", 1e-6, where)
    f["rope_theta"] = _pos_float(cfg, "rope_theta", 10000.0, where)
    rope_type(cfg.get("rope_scaling"), where)
    f["rope_scaling"] = cfg.get("rope_scaling") or None
    f["bos_token_id"] = _token_ids(cfg, "bos_token_id", where)
    f["eos_token_id"] = _token_ids(cfg, "eos_token_id", where)
    f["mlp_bias"] = _bool(cfg, "mlp_bias", where)
    return f


def _mla_fields(cfg: Mapping, shared: Mapping, bias: bool, where: str) -> Dict[str, Any]:
    """parse_config's DeepSeek-V3 fields (dense MLA only); `shared`: the _shared_fields already read."""
    layers = shared["num_hidden_layers"]
    n_routed, first_dense = cfg.get("n_routed_experts"), cfg.get("first_k_dense_replace")
    if n_routed and (not isinstance(first_dense, int) or first_dense < layers):
        raise YouzhiError(f"{where}: DeepSeek-V3 config with n_routed_experts={n_routed} and first_k_dense_replace="
                          f"{first_dense} < num_hidden_layers={layers} is a mixture-of-experts "
                          "model; youzhi_ms handles dense MLA only (n_routed_experts null, first_k_dense_replace = "
                          "num_hidden_layers)")
    f = {key: _pos_int(cfg, key, where) for key in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
                                                     "v_head_dim")}
    f["q_lora_rank"] = _opt_pos_int(cfg, "q_lora_rank", where)
    if f["qk_rope_head_dim"] % 2:
        raise YouzhiError(f"{where}: qk_rope_head_dim must be even (RoPE rotates pairs), got "
                          f"{f['qk_rope_head_dim']}; fix the config")
    yz = cfg.get("youzhi") or {}
    if not isinstance(yz, Mapping):
        raise YouzhiError(f"{where}: the youzhi block must be an object, got {yz!r}; fix the config")
    f.update(num_key_value_heads=shared["num_attention_heads"], head_dim=f["qk_rope_head_dim"], qkv_bias=bias,
             o_bias=bias, rope_interleave=_bool(cfg, "rope_interleave", where, True),
             q_bias=_bool(yz, "q_proj_bias", where + " youzhi"),
             kv_layernorm=not _bool(yz, "no_kv_layernorm", where + " youzhi"))
    return f


def _gqa_fields(cfg: Mapping, shared: Mapping, bias: bool, where: str) -> Dict[str, Any]:
    """parse_config's GQA fields: key/value heads, head_dim, and the architecture's bias flags."""
    heads = shared["num_attention_heads"]
    kv_heads = _opt_pos_int(cfg, "num_key_value_heads", where) or heads
    if heads % kv_heads:
        raise YouzhiError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}; "
                          "fix the config")
    head_dim = _opt_pos_int(cfg, "head_dim", where)
    if head_dim is None:
        if shared["hidden_size"] % heads:
            raise YouzhiError(f"{where}: hidden_size={shared['hidden_size']} is not divisible by num_attention_heads="
                              f"{heads} and the config has no head_dim; add head_dim to the config")
        head_dim = shared["hidden_size"] // heads
    if head_dim % 2:
        raise YouzhiError(f"{where}: head_dim must be even (RoPE rotates pairs), got {head_dim}; fix the config")
    qkv_bias, o_bias = (True, False) if shared["model_type"] == "qwen2" else (bias, bias)
    return dict(num_key_value_heads=kv_heads, head_dim=head_dim, qkv_bias=qkv_bias, o_bias=o_bias)


def check_runnable(cfg: Mapping, fields: Mapping, where: str = "config") -> None:
    """What the MindSpore models and the converter need beyond `parse_config` (the planner does not)."""
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise YouzhiError(f"hidden_act {act!r} is not supported; only SwiGLU (silu) MLPs are")
    if fields["mlp_bias"]:
        raise YouzhiError("mlp_bias=true is not supported (no Llama/Qwen2 release uses it)")
    kind = fields["model_type"]
    if kind == "qwen2" and cfg.get("use_sliding_window"):
        raise YouzhiError("Qwen2 sliding-window attention (use_sliding_window=true) is not supported; "
                          "set use_sliding_window=false if the checkpoint was trained without it")
    window = cfg.get("sliding_window")
    if kind == "mistral" and window not in (None, 0):
        if isinstance(window, bool) or not isinstance(window, int) or \
                window < (fields["max_position_embeddings"] or 0):
            raise YouzhiError("Mistral sliding-window attention is not supported; use a checkpoint with "
                              "sliding_window null")
    prf = cfg.get("partial_rotary_factor", 1.0)
    if prf != 1.0:
        raise YouzhiError("partial_rotary_factor != 1 is not supported")
    if (fields["max_position_embeddings"] or 0) > MAX_POSITIONS:
        raise YouzhiError(f"{where}: max_position_embeddings {fields['max_position_embeddings']} is beyond "
                          f"{MAX_POSITIONS} (the models precompute a RoPE table for every position); fix the config")


def expected_tensors(f: Mapping) -> Dict[str, tuple]:
    """{Hugging Face tensor name: shape} of every weight a checkpoint of the parsed config `f` holds (lm_head only
    when untied). The checkpoint readers compare a directory's safetensors headers with this before any weight is
    read or any model is built, so a checkpoint that is incomplete, has extra parts (e.g. a q_norm under a llama
    config) or does not match its config.json is refused up front."""
    D, I, V, H = f["hidden_size"], f["intermediate_size"], f["vocab_size"], f["num_attention_heads"]
    out = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not f["tie_word_embeddings"]:
        out["lm_head.weight"] = (V, D)
    for i in range(f["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t = {"input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
             "mlp.gate_proj.weight": (I, D), "mlp.up_proj.weight": (I, D), "mlp.down_proj.weight": (D, I)}
        if f["model_type"] == MLA_MODEL_TYPE:
            r, rope, nope, v, rq = (f["kv_lora_rank"], f["qk_rope_head_dim"], f["qk_nope_head_dim"], f["v_head_dim"],
                                    f["q_lora_rank"])
            if rq is None:
                t["self_attn.q_proj.weight"] = (H * (nope + rope), D)
                if f["q_bias"]:
                    t["self_attn.q_proj.bias"] = (H * (nope + rope),)
            else:
                t.update({"self_attn.q_a_proj.weight": (rq, D), "self_attn.q_a_layernorm.weight": (rq,),
                          "self_attn.q_b_proj.weight": (H * (nope + rope), rq)})
                if f["qkv_bias"]:
                    t["self_attn.q_a_proj.bias"] = (rq,)
            t["self_attn.kv_a_proj_with_mqa.weight"] = (r + rope, D)
            if f["kv_layernorm"]:
                t["self_attn.kv_a_layernorm.weight"] = (r,)
            t["self_attn.kv_b_proj.weight"] = (H * (nope + v), r)
            t["self_attn.o_proj.weight"] = (D, H * v)
            if f["qkv_bias"]:
                t["self_attn.kv_a_proj_with_mqa.bias"] = (r + rope,)
        else:
            d, kv = f["head_dim"], f["num_key_value_heads"]
            t.update({"self_attn.q_proj.weight": (H * d, D), "self_attn.k_proj.weight": (kv * d, D),
                      "self_attn.v_proj.weight": (kv * d, D), "self_attn.o_proj.weight": (D, H * d)})
            if f["qkv_bias"]:
                t.update({"self_attn.q_proj.bias": (H * d,), "self_attn.k_proj.bias": (kv * d,),
                          "self_attn.v_proj.bias": (kv * d,)})
        if f["o_bias"]:
            t["self_attn.o_proj.bias"] = (D,)
        out.update({p + k: v for k, v in t.items()})
    return out


# ---------------------------------------------------------------------------------------------------- conversion
def max_rank(n_kv: int, d: int, rope: int) -> int:
    """Width of the joint K/V latent (2 n_kv d) minus the rope dims that leave it for k_pe: the lossless rank."""
    return 2 * n_kv * d - rope


def check_rope_dim(rope, d: int) -> int:
    """qk_rope_head_dim: even (RoPE pairs) and a divisor of head_dim (FreqFold folds c = head_dim / rope
    frequencies onto each rope pair)."""
    if isinstance(rope, bool) or not isinstance(rope, int) or rope < 2 or rope % 2 or d % rope:
        raise YouzhiError(f"--qk-rope-dim {rope!r} must be even and divide head_dim {d} (e.g. {d // 2} or {d // 4})")
    return rope


def check_rank(rank, n_kv: int, d: int, rope: int, tokens: Optional[int] = None) -> None:
    top = max_rank(n_kv, d, rope)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= top:
        raise YouzhiError(f"--kv-lora-rank {rank!r} is out of range: at most 2*n_kv*head_dim - qk_rope_dim = "
                          f"2*{n_kv}*{d} - {rope} = {top} for this model (that is the lossless latent)")
    if tokens is not None and tokens < top:
        raise YouzhiError(f"{tokens} calibration tokens are too few for a {top}-dimensional PCA (need at least {top}); "
                          "raise --calib-tokens")


def conversion_dims(fields: Mapping, kv_lora_rank, qk_rope_head_dim=None) -> int:
    """Check a conversion of the parsed GQA config `fields`; returns qk_rope_head_dim (default head_dim / 2)."""
    if fields["model_type"] == MLA_MODEL_TYPE:
        raise YouzhiError(f"the model is already MLA (kv_lora_rank={fields['kv_lora_rank']}); convert or plan from a "
                          "GQA model")
    d = fields["head_dim"]
    rope = check_rope_dim(d // 2 if qk_rope_head_dim is None else qk_rope_head_dim, d)
    check_rank(kv_lora_rank, fields["num_key_value_heads"], d, rope)
    return rope


def dense_moe_keys(num_hidden_layers: int, intermediate_size: int) -> Dict[str, Any]:
    """The mixture-of-experts keys of a dense DeepSeek-V3 config, each stated so that no loader fills in DeepSeek-V3's
    MoE defaults: llama.cpp's converter fails on a null n_shared_experts (0 is inert: no shared expert) and llama.cpp
    aborts on load with the n_group / topk_group (8 / 4) that transformers' config class fills in when they are
    absent (null keeps them unset); every layer is dense because first_k_dense_replace is the layer count and
    n_routed_experts is null (vLLM and transformers build an MoE block only where both say so)."""
    return {"n_routed_experts": None, "n_shared_experts": 0, "n_group": None, "topk_group": None,
            "num_experts_per_tok": None, "first_k_dense_replace": num_hidden_layers, "moe_layer_freq": 1,
            "moe_intermediate_size": intermediate_size}


def stock_mla_config(cfg: Mapping, where: str = "config") -> Dict[str, Any]:
    """`cfg` with the contract's dense MoE keys when it is a dense DeepSeek-V3 config (a checkpoint converted before
    the keys were fixed gets them on its next write); any other config unchanged. Every writer of a model directory's
    config.json goes through here (checkpoint.hf.write_model_files)."""
    out = dict(cfg)
    if out.get("model_type") == MLA_MODEL_TYPE:
        f = parse_config(out, where)  # refuses a mixture of experts
        out.update(dense_moe_keys(f["num_hidden_layers"], f["intermediate_size"]))
    return out


def mla_config(source_cfg: Mapping, kv_lora_rank: int, qk_rope_head_dim: Optional[int] = None,
               export: str = "deepseek", torch_dtype: str = "bfloat16", q_bias: Optional[bool] = None,
               kv_bias: Optional[bool] = None, youzhi: Optional[Mapping] = None) -> Dict[str, Any]:
    """The config.json of the GQA -> MLA conversion of `source_cfg`.

    export "deepseek": the stock contract (no attention bias, kv_a_layernorm). export "exact": `attention_bias` when
    the source has k/v biases (kv_a_proj_with_mqa and o_proj get one) and the youzhi block records the extensions the
    exact model needs (`no_kv_layernorm`, `q_proj_bias`). `q_bias` / `kv_bias` default to the source config's flags
    (the converter passes what the checkpoint holds). `torch_dtype` is the dtype of the written weights. `youzhi`:
    extra provenance for the youzhi block (FreqFold choice, calibration); without it and for a stock export the config
    has no youzhi block. Transformers' DeepseekV3Config defaults to a mixture of experts, so every expert key is
    written explicitly (null / dense)."""
    f = parse_config(source_cfg, "source config")
    rope = conversion_dims(f, kv_lora_rank, qk_rope_head_dim)
    if export not in ("exact", "deepseek"):
        raise YouzhiError(f"--export {export!r}: use exact or deepseek")
    if torch_dtype not in TORCH_DTYPES:
        raise YouzhiError(f"unknown dtype {torch_dtype!r}; use one of {', '.join(TORCH_DTYPES)}")
    q_bias = f["qkv_bias"] if q_bias is None else q_bias
    kv_bias = f["qkv_bias"] if kv_bias is None else kv_bias
    exact = export == "exact"
    head_dim, layers = f["head_dim"], f["num_hidden_layers"]
    out: Dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": MLA_MODEL_TYPE,
        "vocab_size": f["vocab_size"],
        "hidden_size": f["hidden_size"],
        "intermediate_size": f["intermediate_size"],
        "num_hidden_layers": layers,
        "num_attention_heads": f["num_attention_heads"],
        "num_key_value_heads": f["num_attention_heads"],
        "kv_lora_rank": kv_lora_rank,
        "q_lora_rank": None,
        "qk_nope_head_dim": head_dim,
        "qk_rope_head_dim": rope,
        "v_head_dim": head_dim,
        "head_dim": rope,  # what transformers' DeepseekV3Config sets (the rope part of a query/key head)
        **dense_moe_keys(layers, f["intermediate_size"]),
        "hidden_act": "silu",
        "max_position_embeddings": f["max_position_embeddings"],
        "rms_norm_eps": f["rms_norm_eps"],
        "rope_theta": f["rope_theta"],
        "rope_scaling": f["rope_scaling"],
        "rope_interleave": True,
        "attention_bias": bool(exact and kv_bias),
        "attention_dropout": float(source_cfg.get("attention_dropout") or 0.0),
        "tie_word_embeddings": f["tie_word_embeddings"],
        "initializer_range": source_cfg.get("initializer_range", 0.02),
        "bos_token_id": f["bos_token_id"],
        "eos_token_id": f["eos_token_id"],
        "pad_token_id": _token_ids(source_cfg, "pad_token_id", "source config"),
        "torch_dtype": TORCH_DTYPES[torch_dtype],
        "use_cache": True,
    }
    if exact or youzhi:
        out["youzhi"] = _youzhi_block(export, q_bias, youzhi)
    return out


def _youzhi_block(export: str, q_bias: bool, provenance: Optional[Mapping]) -> Dict[str, Any]:
    """The config's youzhi block: `provenance`, the export kind and, for an exact export, the extensions its model
    needs (no kv_a_layernorm; a q_proj bias when the source has one)."""
    block = dict(provenance or {})
    block["export"] = export
    if export == "exact":
        block["no_kv_layernorm"] = True
        block["q_proj_bias"] = bool(q_bias)
    return block


# ---------------------------------------------------------------------------------------------------- deployment
def deployment_warnings(num_heads: int, kv_lora_rank: int, qk_rope_head_dim: int,
                        attention_bias: bool = False) -> List[str]:
    """Things that will stop or slow a vLLM / vLLM-Ascend deployment of an MLA model, each naming the engine version
    or change it was read from. Strings, not errors: the model is still correct and useful elsewhere (llama.cpp has
    none of these limits)."""
    out: List[str] = []
    if num_heads not in ASCEND_MLA_GRAPH_HEADS:
        out.append(f"vLLM-Ascend MLA graph mode needs num_attention_heads per latent KV head (per card) in "
                   f"{{32, 64, 128}} (vllm-ascend #1451); this model has {num_heads}: serve it in eager mode, or shard "
                   "it so each card holds a supported head count")
    if num_heads & (num_heads - 1):
        padded = 1 << num_heads.bit_length()
        out.append(f"vLLM-Ascend pads the MLA head count up to a power of two (vllm-ascend PR #9560; native counts "
                   f"only from PR #15882): {num_heads} heads run as {padded}, {padded / num_heads - 1:.0%} more "
                   "attention compute per token")
    if kv_lora_rank % 16:
        out.append(f"kv_lora_rank={kv_lora_rank} is not a multiple of 16; vLLM-Ascend's fused MLA cache kernels "
                   "(as read in Dec 2026) reshape the latent by 16: pick a multiple of 16")
    width = kv_lora_rank + qk_rope_head_dim
    if width not in VLLM_MLA_CACHE_WIDTHS:
        out.append(f"kv_lora_rank + qk_rope_head_dim = {width}: vLLM's CUDA MLA attention layer (main, Dec 2026) "
                   "accepts 320 or 576 only (older releases 576 only) and FlashMLA only 512 + 64, so this model does "
                   "not serve on vLLM GPUs; llama.cpp (any width) and vLLM-Ascend do serve it")
    elif width != FLASHMLA_CACHE_WIDTH:
        out.append(f"kv_lora_rank + qk_rope_head_dim = {width}: vLLM serves it, but not with FlashMLA (512 + 64 only), "
                   "its fastest CUDA MLA kernel")
    if attention_bias:
        out.append("attention_bias is set: stock vLLM DeepSeek-V2/V3 attention has no biases and its loader "
                   "silently skips .bias tensors, and llama.cpp's deepseek2 has none either; export without biases "
                   "(--export deepseek; recover the loss by distillation)")
    return out
