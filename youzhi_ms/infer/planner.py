"""KV-cache budget arithmetic: how many concurrent full-length requests a model serves on one accelerator card.

Pure Python (no MindSpore, no numpy) so it runs anywhere, including on a laptop before a conversion.

The plan mirrors how vLLM / vLLM-Ascend size the paged KV cache at start-up:

    budget    = device_memory × memory_utilization
    usable    = budget − weight_bytes − activation_reserve           (bytes left for the KV cache)
    num_blocks = floor(usable / (block_size × kv_bytes_per_token))   (one block holds block_size tokens, all layers)
    max_concurrency = num_blocks × block_size / max_model_len        (vLLM logs it as
                                                                      "Maximum concurrency for N tokens per request")

KV bytes per token (all layers):
    GQA  layers × 2 × num_key_value_heads × head_dim × bytes          (separate K and V per KV head)
    MLA  layers × (kv_lora_rank + qk_rope_head_dim) × bytes           (one shared latent plus the rope key; no factor 2)

Activation reserve (what vLLM's profile run measures as peak non-weight memory; we estimate it, see
`activation_reserve_bytes`):
    max_num_batched_tokens × (4·hidden + max(3·intermediate, attention width)) × act_bytes   one profile forward
  + max_num_seqs × vocab × 4 B × 2                                                       fp32 logits + probabilities
  + runtime_overhead_gib                                                                 runtime workspaces, buffers
with defaults 8192 batched tokens, 256 sequences, 1 GiB. `activation_reserve_gib` replaces the estimate with a fixed
figure (e.g. the "activation memory" a real vLLM start-up logged).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import yaml

from youzhi_ms import contract
from youzhi_ms.errors import YouzhiError
from youzhi_ms.train.run_config import load_yaml

GIB = 1 << 30

# Bytes per element. KV-only dtypes (fp8/int8) are accepted for the cache, not for weights.
_DTYPE_BYTES = {
    "bf16": 2, "bfloat16": 2,
    "fp16": 2, "float16": 2, "half": 2,
    "fp32": 4, "float32": 4, "float": 4,
}
_KV_ONLY_DTYPE_BYTES = {"fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1}

# MindFormers-style (legacy) key names that map onto the Hugging Face ones.
_KEY_ALIASES = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "qkv_has_bias": "attention_bias",
}
_TYPE_ALIASES = {"LlamaConfig": "llama", "Qwen2Config": "qwen2", "MistralConfig": "mistral",
                 "DeepseekV3Config": "deepseek_v3"}



def dtype_bytes(dtype: str, kv_only_ok: bool = False) -> int:
    key = str(dtype).lower()
    if key in _DTYPE_BYTES:
        return _DTYPE_BYTES[key]
    if kv_only_ok and key in _KV_ONLY_DTYPE_BYTES:
        return _KV_ONLY_DTYPE_BYTES[key]
    allowed = sorted(set(_DTYPE_BYTES) | (set(_KV_ONLY_DTYPE_BYTES) if kv_only_ok else set()))
    raise YouzhiError(f"unknown dtype {dtype!r}; use one of {', '.join(allowed)}")


# --------------------------------------------------------------------------------------------------------------------
# Model shapes
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """The architecture figures that decide weight and KV-cache bytes.

    GQA models (llama/qwen2/mistral) use `num_key_value_heads` and `head_dim`; DeepSeek-V3 dense MLA models use
    `kv_lora_rank`, `qk_rope_head_dim`, `qk_nope_head_dim`, `v_head_dim` and `q_lora_rank` (None = full-rank q_proj).
    Bias flags follow each architecture's Hugging Face modelling code:
      llama: `attention_bias` puts a bias on q, k, v and o; qwen2: q, k, v always biased, o never; mistral: none;
      deepseek_v3: `attention_bias` biases q_a_proj, kv_a_proj_with_mqa and o_proj (q_proj, q_b_proj, kv_b_proj never).
    """

    model_type: str
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    kv_lora_rank: Optional[int] = None
    qk_rope_head_dim: Optional[int] = None
    qk_nope_head_dim: Optional[int] = None
    v_head_dim: Optional[int] = None
    q_lora_rank: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    name: str = ""

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def attention(self) -> str:
        return "MLA" if self.is_mla else "GQA"

    # -- parameter count --------------------------------------------------------------------------------------------
    def attention_params_per_layer(self) -> int:
        D, H = self.hidden_size, self.num_attention_heads
        if not self.is_mla:
            d, kv = self.head_dim, self.num_key_value_heads
            n = D * H * d + 2 * D * kv * d + H * d * D  # q, k, v, o
            if self.qkv_bias:
                n += H * d + 2 * kv * d
            if self.o_bias:
                n += D
            return n
        r, rope, nope, v = self.kv_lora_rank, self.qk_rope_head_dim, self.qk_nope_head_dim, self.v_head_dim
        qk = nope + rope
        if self.q_lora_rank is None:
            n = D * H * qk  # q_proj (no bias in DeepSeek-V3)
        else:
            rq = self.q_lora_rank
            n = D * rq + rq + rq * H * qk  # q_a_proj, q_a_layernorm, q_b_proj
            if self.qkv_bias:
                n += rq
        n += D * (r + rope) + r  # kv_a_proj_with_mqa, kv_a_layernorm
        n += r * H * (nope + v)  # kv_b_proj
        n += H * v * D  # o_proj
        if self.qkv_bias:
            n += r + rope
        if self.o_bias:
            n += D
        return n

    def mlp_params_per_layer(self) -> int:
        D, I = self.hidden_size, self.intermediate_size
        return 3 * D * I + ((2 * I + D) if self.mlp_bias else 0)

    def num_params(self) -> int:
        D, V = self.hidden_size, self.vocab_size
        per_layer = self.attention_params_per_layer() + self.mlp_params_per_layer() + 2 * D  # + two RMSNorms
        embed = V * D
        head = 0 if self.tie_word_embeddings else V * D
        return embed + self.num_hidden_layers * per_layer + D + head  # + final norm

    def weight_bytes(self, dtype: str = "bf16") -> int:
        return self.num_params() * dtype_bytes(dtype)

    def kv_elements_per_token_per_layer(self) -> int:
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_key_value_heads * self.head_dim

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def kv_bytes_per_token(shape: ModelShape, dtype: str = "bf16") -> int:
    """KV-cache bytes one token occupies across all layers (see the module docstring for both formulas)."""
    return shape.num_hidden_layers * shape.kv_elements_per_token_per_layer() * dtype_bytes(dtype, kv_only_ok=True)


def normalize_config(cfg: Mapping[str, Any], where: str = "config") -> Dict[str, Any]:
    """Hugging Face key names for a config that may use MindFormers-style ones (num_layers, num_heads, n_kv_heads,
    qkv_has_bias, and `type: LlamaConfig` instead of model_type)."""
    if not isinstance(cfg, Mapping):
        raise YouzhiError(f"{where}: expected a JSON/YAML mapping of config keys, got {type(cfg).__name__}")
    cfg = {_KEY_ALIASES.get(k, k): v for k, v in cfg.items()}
    if not cfg.get("model_type") and str(cfg.get("type", "")) in _TYPE_ALIASES:
        cfg["model_type"] = _TYPE_ALIASES[str(cfg["type"])]
    return cfg


def shape_from_config(cfg: Mapping[str, Any], name: str = "") -> ModelShape:
    """A `ModelShape` from a Hugging Face config.json dict (Llama/Qwen2/Mistral GQA or DeepSeek-V3 dense MLA), validated
    by `contract.parse_config`; MindFormers-style key names are accepted (`normalize_config`)."""
    where = name or "config"
    f = contract.parse_config(normalize_config(cfg, where), where)
    return ModelShape(**{k: f.get(k) for k in (
        "model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
        "intermediate_size", "vocab_size", "tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias", "kv_lora_rank",
        "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "q_lora_rank", "max_position_embeddings")}, name=name)


def read_config_file(path: str) -> Dict[str, Any]:
    """The config dict behind `path`: a model directory (its config.json), a .json file or a .yaml/.yml file.

    YAML files may hold the config keys at top level or under `model: model_config:` (MindFormers run configs).
    """
    if not os.path.exists(path):
        raise YouzhiError(f"{path} does not exist; pass a model directory, a config.json or a yaml config")
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise YouzhiError(f"{path} has no config.json; pass a Hugging Face model directory or a config file")
        path = cfg_path
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".yaml", ".yml"):
        return contract.read_config_json(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise YouzhiError(f"cannot read {path}: {exc.strerror}; check the path and permissions") from None
    except UnicodeDecodeError:
        raise YouzhiError(f"{path} is not UTF-8 text; fix the file") from None
    try:
        cfg = load_yaml(text)
    except yaml.YAMLError as exc:
        raise YouzhiError(f"{path} is not valid YAML ({' '.join(str(exc).split())}); fix the file") from None
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) and \
            isinstance(cfg["model"].get("model_config"), dict):
        cfg = cfg["model"]["model_config"]
    elif isinstance(cfg, dict) and isinstance(cfg.get("model_config"), dict):
        cfg = cfg["model_config"]
    if not isinstance(cfg, dict):
        raise YouzhiError(f"{path} does not contain a mapping of config keys")
    return cfg


def model_label(path: str) -> str:
    p = os.path.abspath(path)
    if os.path.isdir(p):
        return os.path.basename(p.rstrip(os.sep))
    base = os.path.basename(p)
    if base == "config.json":
        return os.path.basename(os.path.dirname(p))
    return os.path.splitext(base)[0]


def load_model_shape(path: str) -> ModelShape:
    """`ModelShape` of a model directory (reads its config.json) or of a config.json / yaml file."""
    return shape_from_config(read_config_file(path), name=model_label(path))


# --------------------------------------------------------------------------------------------------------------------
# GQA -> MLA shape
# --------------------------------------------------------------------------------------------------------------------
def _check_conversion_args(source: ModelShape, kv_lora_rank: int, qk_rope_head_dim: Optional[int]) -> int:
    return contract.conversion_dims(dataclasses.asdict(source), kv_lora_rank, qk_rope_head_dim)


def mla_shape_from_source(source: ModelShape, kv_lora_rank: int, qk_rope_head_dim: Optional[int] = None,
                          attention_bias: bool = False) -> ModelShape:
    """The DeepSeek-V3 dense shape a GQA → MLA conversion of `source` produces.

    num_key_value_heads = num_attention_heads; qk_nope_head_dim = v_head_dim = head_dim; qk_rope_head_dim defaults to
    head_dim / 2; q_lora_rank None. Per layer: q_proj [n_h·(d + rope), D], kv_a_proj_with_mqa [r + rope, D],
    kv_a_layernorm [r], kv_b_proj [n_h·2d, r], o_proj [D, n_h·d] unchanged; MLP, norms, embeddings unchanged.
    `attention_bias=False` is the stock export (the checkpoint contract has no attention biases).
    """
    rope = _check_conversion_args(source, kv_lora_rank, qk_rope_head_dim)
    d = source.head_dim
    return dataclasses.replace(
        source, model_type="deepseek_v3", num_key_value_heads=source.num_attention_heads, head_dim=rope,
        qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=False,
        kv_lora_rank=kv_lora_rank, qk_rope_head_dim=rope, qk_nope_head_dim=d, v_head_dim=d, q_lora_rank=None,
        name=f"{source.name or 'model'}_mla_r{kv_lora_rank}" + ("" if rope == 64 else f"_rope{rope}"))


# --------------------------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanSettings:
    """Serving assumptions. Defaults: one 64 GiB Ascend 910B card, vLLM-Ascend-style paged cache (block 128),
    bf16 weights and cache, `gpu_memory_utilization` 0.9, 4096-token requests."""

    device_memory_gib: float = 64.0
    memory_utilization: float = 0.9
    max_model_len: int = 4096
    block_size: int = 128
    dtype: str = "bf16"
    kv_cache_dtype: Optional[str] = None  # None: same as dtype
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    runtime_overhead_gib: float = 1.0
    activation_reserve_gib: Optional[float] = None  # set: use this instead of the profile-run estimate

    @property
    def kv_dtype(self) -> str:
        return self.kv_cache_dtype or self.dtype

    def validate(self) -> "PlanSettings":
        if not self.device_memory_gib > 0:
            raise YouzhiError(f"device memory must be positive, got {self.device_memory_gib} GiB")
        if not 0 < self.memory_utilization <= 1:
            raise YouzhiError(f"memory utilization must be in (0, 1], got {self.memory_utilization}")
        for key in ("max_model_len", "block_size", "max_num_batched_tokens", "max_num_seqs"):
            val = getattr(self, key)
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise YouzhiError(f"{key.replace('_', '-')} must be a positive integer, got {val!r}")
        if self.runtime_overhead_gib < 0:
            raise YouzhiError(f"runtime overhead must be >= 0 GiB, got {self.runtime_overhead_gib}")
        if self.activation_reserve_gib is not None and self.activation_reserve_gib < 0:
            raise YouzhiError(f"activation reserve must be >= 0 GiB, got {self.activation_reserve_gib}")
        dtype_bytes(self.dtype)
        dtype_bytes(self.kv_dtype, kv_only_ok=True)
        return self

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kv_cache_dtype"] = self.kv_dtype
        return d


def attention_activation_width(shape: ModelShape) -> int:
    """Elements per token live in one attention block of a prefill forward (q, k, v as computed, attention output)."""
    H = shape.num_attention_heads
    if shape.is_mla:
        qk = shape.qk_nope_head_dim + shape.qk_rope_head_dim
        latent = shape.kv_lora_rank + shape.qk_rope_head_dim
        return H * qk + latent + H * qk + H * shape.v_head_dim + H * shape.v_head_dim  # q, latent, k, v, out
    return H * shape.head_dim + 2 * shape.num_key_value_heads * shape.head_dim + H * shape.head_dim


def activation_reserve_bytes(shape: ModelShape, settings: PlanSettings = PlanSettings()) -> int:
    """Estimate of the peak non-weight memory vLLM's start-up profile run measures.

    forward: max_num_batched_tokens tokens in one layer hold the residual stream, the normed input, the attention
             output and the block output (4·hidden) plus the wider of the MLP intermediates (gate, up, act: 3·inter)
             and the attention projections, in the activation dtype;
    logits:  the sampler's dummy run over max_num_seqs sequences: fp32 logits plus fp32 probabilities (2 × 4 B × vocab);
    runtime: a fixed allowance for runtime workspaces and communication buffers (`runtime_overhead_gib`).
    `settings.activation_reserve_gib` overrides the whole estimate.
    """
    if settings.activation_reserve_gib is not None:
        return int(round(settings.activation_reserve_gib * GIB))
    act = dtype_bytes(settings.dtype)
    per_token = (4 * shape.hidden_size + max(3 * shape.intermediate_size, attention_activation_width(shape))) * act
    forward = settings.max_num_batched_tokens * per_token
    logits = settings.max_num_seqs * shape.vocab_size * 4 * 2
    return forward + logits + int(round(settings.runtime_overhead_gib * GIB))


@dataclass
class ConcurrencyPlan:
    """All figures of one plan (bytes are exact integers; max_concurrency is num_blocks·block_size/max_model_len)."""

    name: str
    attention: str
    model_type: str
    num_params: int
    weight_bytes: int
    device_memory_bytes: int
    memory_utilization: float
    budget_bytes: int
    activation_reserve_bytes: int
    kv_budget_bytes: int
    kv_bytes_per_token: int
    block_size: int
    block_bytes: int
    num_blocks: int
    kv_cache_tokens: int
    max_model_len: int
    max_concurrency: float
    warnings: List[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.max_concurrency >= 1

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["weight_gib"] = self.weight_bytes / GIB
        d["kv_budget_gib"] = self.kv_budget_bytes / GIB
        d["activation_reserve_gib"] = self.activation_reserve_bytes / GIB
        return d


def plan_concurrency(shape: ModelShape, settings: PlanSettings = PlanSettings()) -> ConcurrencyPlan:
    """The vLLM-style KV-cache plan of `shape` under `settings` (see the module docstring)."""
    settings.validate()
    weights = shape.weight_bytes(settings.dtype)
    device = int(round(settings.device_memory_gib * GIB))
    budget = int(device * settings.memory_utilization)
    reserve = activation_reserve_bytes(shape, settings)
    kv_budget = budget - weights - reserve
    per_token = kv_bytes_per_token(shape, settings.kv_dtype)
    block_bytes = settings.block_size * per_token
    num_blocks = max(0, kv_budget // block_bytes)
    tokens = num_blocks * settings.block_size
    plan = ConcurrencyPlan(
        name=shape.name, attention=shape.attention, model_type=shape.model_type, num_params=shape.num_params(),
        weight_bytes=weights, device_memory_bytes=device, memory_utilization=settings.memory_utilization,
        budget_bytes=budget, activation_reserve_bytes=reserve, kv_budget_bytes=kv_budget,
        kv_bytes_per_token=per_token, block_size=settings.block_size, block_bytes=block_bytes, num_blocks=num_blocks,
        kv_cache_tokens=tokens, max_model_len=settings.max_model_len,
        max_concurrency=tokens / settings.max_model_len)
    plan.warnings = deployment_warnings(shape, settings, plan)
    return plan


def mla_limits(shape: ModelShape) -> List[str]:
    """The MLA deployment limits an MLA model's shape runs into (the conversion warns of the same ones)."""
    if not shape.is_mla:
        return []
    return contract.deployment_warnings(shape.num_attention_heads, shape.kv_lora_rank, shape.qk_rope_head_dim,
                                        attention_bias=shape.qkv_bias or shape.o_bias)


def deployment_warnings(shape: ModelShape, settings: PlanSettings = PlanSettings(),
                        plan: Optional[ConcurrencyPlan] = None) -> List[str]:
    """Things that will stop or slow a vLLM / vLLM-Ascend deployment. Strings, not exceptions: a plan is still useful."""
    out: List[str] = mla_limits(shape)
    if plan is not None:
        if plan.kv_budget_bytes <= 0:
            out.append(f"does not fit: weights {plan.weight_bytes / GIB:.2f} GiB + activation reserve "
                       f"{plan.activation_reserve_bytes / GIB:.2f} GiB exceed the "
                       f"{plan.budget_bytes / GIB:.2f} GiB budget ({settings.device_memory_gib:g} GiB × "
                       f"{settings.memory_utilization:g}); use a larger card, tensor parallelism or a smaller dtype")
        elif plan.max_concurrency < 1:
            out.append(f"does not fit one {plan.max_model_len}-token request: the KV cache holds only "
                       f"{plan.kv_cache_tokens} tokens; vLLM refuses to start: lower --max-model-len or raise "
                       "--memory-utilization")
    if shape.max_position_embeddings and settings.max_model_len > shape.max_position_embeddings:
        out.append(f"max_model_len {settings.max_model_len} exceeds the model's max_position_embeddings "
                   f"{shape.max_position_embeddings}")
    return out


# --------------------------------------------------------------------------------------------------------------------
# Rank search
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class RankChoice:
    kv_lora_rank: int
    qk_rope_head_dim: int
    ratio: float
    target_ratio: float
    mode: str
    source_plan: ConcurrencyPlan
    mla_plan: ConcurrencyPlan
    candidates: List[Dict[str, float]]  # every rank tried: {"kv_lora_rank", "ratio"}

    def neighbours(self, n: int = 2) -> List[Dict[str, float]]:
        idx = next(i for i, c in enumerate(self.candidates) if c["kv_lora_rank"] == self.kv_lora_rank)
        return self.candidates[max(0, idx - n): idx + n + 1]


def rank_for_ratio(source: ModelShape, target_ratio: float, settings: PlanSettings = PlanSettings(),
                   qk_rope_head_dim: Optional[int] = None, multiple: int = 16, mode: str = "closest") -> RankChoice:
    """The `kv_lora_rank` (a multiple of `multiple`) whose max-concurrency gain over `source` meets `target_ratio`.

    mode "closest": the rank whose ratio is nearest the target (ties go to the larger rank);
    mode "reach":   the largest rank whose ratio is still >= the target (the least compression that reaches it).
    Ratios fall as the rank grows; all ranks up to 2·n_kv·head_dim − rope are tried.
    """
    if mode not in ("closest", "reach"):
        raise YouzhiError(f"rank search mode must be 'closest' or 'reach', got {mode!r}")
    if not target_ratio > 0:
        raise YouzhiError(f"target ratio must be positive, got {target_ratio}")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple <= 0:
        raise YouzhiError(f"rank multiple must be a positive integer, got {multiple!r}")
    rope = _check_conversion_args(source, multiple, qk_rope_head_dim)
    src_plan = plan_concurrency(source, settings)
    if src_plan.max_concurrency <= 0:
        raise YouzhiError(f"{source.name or 'the source model'} does not fit under these settings, so no ratio "
                          "exists; use a larger card or lower --max-model-len")
    max_rank = contract.max_rank(source.num_key_value_heads, source.head_dim, rope)
    plans: Dict[int, ConcurrencyPlan] = {}
    candidates = []
    for r in range(multiple, max_rank + 1, multiple):
        p = plan_concurrency(mla_shape_from_source(source, r, rope), settings)
        plans[r] = p
        candidates.append({"kv_lora_rank": r, "ratio": p.max_concurrency / src_plan.max_concurrency})
    if not candidates:
        raise YouzhiError(f"no multiple of {multiple} fits below the maximum rank {max_rank}")
    if mode == "reach":
        ok = [c for c in candidates if c["ratio"] >= target_ratio]
        if not ok:
            raise YouzhiError(f"no kv_lora_rank reaches a {target_ratio}× gain (best: "
                              f"{candidates[0]['ratio']:.2f}× at r={candidates[0]['kv_lora_rank']}); lower the target "
                              "or the rope dim")
        best = max(ok, key=lambda c: c["kv_lora_rank"])
    else:
        best = min(candidates, key=lambda c: (abs(c["ratio"] - target_ratio), -c["kv_lora_rank"]))
    r = best["kv_lora_rank"]
    return RankChoice(kv_lora_rank=r, qk_rope_head_dim=rope, ratio=best["ratio"], target_ratio=target_ratio,
                      mode=mode, source_plan=src_plan, mla_plan=plans[r], candidates=candidates)


def fmt_gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f}"

