"""Model configs: Hugging Face config.json <-> dataclasses for the source GQA models and the MLA (DeepSeek-V3) models.

Validation lives here so every tool refuses unsupported checkpoints the same way, before any weight is read.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from youzhi_ms.errors import YouzhiError

SOURCE_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
MLA_ARCHS = {"DeepseekV3ForCausalLM": "deepseek_v3"}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _rope_type(scaling: Optional[dict]) -> str:
    if not scaling:
        return "default"
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise YouzhiError(f"rope_scaling type {kind!r} is not supported (supported: none, linear, llama3, yarn); "
                          "dynamic/longrope checkpoints need a static rope_scaling to be converted")
    return kind


def _refuse_unsupported(cfg: dict) -> None:
    """Architectural features the conversion cannot represent, each with the reason and what to do."""
    mt = cfg.get("model_type", "")
    arch = (cfg.get("architectures") or ["?"])[0]
    if mt in ("qwen3", "qwen3_moe", "gemma3", "olmo2", "cohere2") or "Qwen3" in arch:
        raise YouzhiError(f"{arch} ({mt}) applies a per-head q/k RMSNorm before RoPE, which the RoRoPE rotation and the "
                          "MLA latent cannot absorb; only Llama, Qwen2/Qwen2.5 and Mistral (no q/k norm) are supported")
    moe_keys = [k for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
                if cfg.get(k)]
    if moe_keys or "moe" in mt.lower():
        raise YouzhiError(f"{arch} is a mixture-of-experts model ({', '.join(moe_keys) or mt}); youzhi_ms converts "
                          "dense models only")


@dataclass
class SourceConfig:
    """A dense Llama / Qwen2 / Mistral causal LM (GQA attention, SwiGLU MLP, RMSNorm, half-split RoPE)."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[object] = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, cfg: dict) -> "SourceConfig":
        _refuse_unsupported(cfg)
        arch = (cfg.get("architectures") or [None])[0]
        mt = cfg.get("model_type")
        if arch in MLA_ARCHS or mt == "deepseek_v3":
            raise YouzhiError("this is already an MLA (deepseek_v3) checkpoint; load it with youzhi_ms.models.mla")
        if arch not in SOURCE_ARCHS and mt not in SOURCE_ARCHS.values():
            raise YouzhiError(f"unsupported architecture {arch} (model_type {mt}); supported sources: "
                              f"{', '.join(SOURCE_ARCHS)}")
        kind = SOURCE_ARCHS.get(arch, mt)
        if cfg.get("hidden_act", "silu") != "silu":
            raise YouzhiError(f"hidden_act {cfg.get('hidden_act')!r} is not supported; only SwiGLU (silu) MLPs are")
        if cfg.get("mlp_bias"):
            raise YouzhiError("mlp_bias=true is not supported (no Llama/Qwen2 release uses it)")
        if kind == "qwen2" and cfg.get("use_sliding_window"):
            raise YouzhiError("Qwen2 sliding-window attention (use_sliding_window=true) is not supported; "
                              "set use_sliding_window=false if the checkpoint was trained without it")
        if kind == "mistral" and cfg.get("sliding_window") not in (None, 0) and \
                cfg.get("sliding_window") < cfg.get("max_position_embeddings", 0):
            raise YouzhiError("Mistral sliding-window attention is not supported; use a checkpoint with "
                              "sliding_window null")
        if cfg.get("partial_rotary_factor", 1.0) != 1.0:
            raise YouzhiError("partial_rotary_factor != 1 is not supported")
        heads = cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        if heads % kv:
            raise YouzhiError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        _rope_type(cfg.get("rope_scaling"))
        attn_bias = bool(cfg.get("attention_bias", False))
        return cls(
            arch=kind, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"], num_heads=heads,
            num_kv_heads=kv, head_dim=head_dim, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", 10000.0), rope_scaling=cfg.get("rope_scaling"),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if kind == "qwen2" else attn_bias, o_bias=attn_bias if kind != "qwen2" else False,
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"), raw=dict(cfg))


@dataclass
class MLAConfig:
    """A dense DeepSeek-V3-style causal LM. `attention_bias` and `kv_layernorm=False` are youzhi extensions that make
    exact conversions representable; the stock contract is attention_bias=False, kv_layernorm=True."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    rope_interleave: bool = True
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # transformers' meaning: bias on q_a_proj, kv_a_proj_with_mqa, o_proj
    q_bias: bool = False  # youzhi extension: bias on q_proj (q_lora_rank null), needed for exact Qwen2 conversions
    kv_layernorm: bool = True  # youzhi extension when False: no kv_a_layernorm (exact conversions)
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[object] = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_width(self) -> int:
        """Values cached per token per layer by the absorbed decode path."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @classmethod
    def from_hf(cls, cfg: dict) -> "MLAConfig":
        arch = (cfg.get("architectures") or [None])[0]
        if cfg.get("model_type") != "deepseek_v3" and arch not in MLA_ARCHS:
            raise YouzhiError(f"expected a deepseek_v3 config, got model_type {cfg.get('model_type')!r}")
        if cfg.get("n_routed_experts") or cfg.get("first_k_dense_replace", cfg["num_hidden_layers"]) < \
                cfg["num_hidden_layers"]:
            raise YouzhiError("MoE DeepSeek-V3 layers are not supported: youzhi_ms models dense MLA conversions "
                              "(n_routed_experts null, first_k_dense_replace = num_hidden_layers)")
        _rope_type(cfg.get("rope_scaling"))
        yz = cfg.get("youzhi") or {}
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
            kv_lora_rank=cfg["kv_lora_rank"], qk_nope_head_dim=cfg["qk_nope_head_dim"],
            qk_rope_head_dim=cfg["qk_rope_head_dim"], v_head_dim=cfg["v_head_dim"],
            q_lora_rank=cfg.get("q_lora_rank"), rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", 10000.0), rope_scaling=cfg.get("rope_scaling"),
            rope_interleave=cfg.get("rope_interleave", True),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            q_bias=bool(yz.get("q_proj_bias", False)), kv_layernorm=not yz.get("no_kv_layernorm", False),
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"), raw=dict(cfg))


def load_any_config(cfg: dict):
    """SourceConfig or MLAConfig, by model_type."""
    if cfg.get("model_type") == "deepseek_v3" or (cfg.get("architectures") or [None])[0] in MLA_ARCHS:
        return MLAConfig.from_hf(cfg)
    return SourceConfig.from_hf(cfg)


# ----------------------------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(rot_dim: int, theta: float, scaling: Optional[dict], max_position_embeddings: int):
    """Inverse frequencies [rot_dim/2] and the cos/sin attention factor, for the rope types real checkpoints use.

    Computed in float32 like transformers so both sides see the same angles.
    """
    kind = _rope_type(scaling)
    idx = np.arange(0, rot_dim, 2, dtype=np.int64).astype(np.float32)
    inv = (1.0 / (np.float32(theta) ** (idx / np.float32(rot_dim)))).astype(np.float32)
    factor = 1.0
    if kind == "linear":
        inv = inv / np.float32(scaling["factor"])
    elif kind == "llama3":
        f, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        lo_wav, hi_wav = old / lo, old / hi
        wav = 2 * math.pi / inv
        scaled = np.where(wav > lo_wav, inv / f, inv)
        smooth = (old / wav - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / f + smooth * scaled
        medium = ~(wav < hi_wav) & ~(wav > lo_wav)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    elif kind == "yarn":
        inv, factor = _yarn(rot_dim, theta, scaling, max_position_embeddings)
    return inv, float(factor)


def _yarn(dim: int, base: float, s: dict, max_pos: int):
    f = s["factor"]
    orig = s.get("original_max_position_embeddings") or max_pos

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    att = s.get("attention_factor")
    if att is None:
        att = mscale(f, s["mscale"]) / mscale(f, s["mscale_all_dim"]) if s.get("mscale") and s.get("mscale_all_dim") \
            else mscale(f)
    fast, slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def corr(rot):
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr(fast), corr(slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extra = 1 - ramp
    inv = (1.0 / (f * pos)) * (1 - extra) + (1.0 / pos) * extra
    return inv.astype(np.float32), att


def rope_tables(inv_freq: np.ndarray, max_len: int, attention_factor: float = 1.0):
    """cos/sin tables [max_len, rot_dim/2] in float32 (one frequency per column, not yet laid out per head)."""
    ang = np.arange(max_len, dtype=np.float32)[:, None] * inv_freq[None, :].astype(np.float32)
    return (np.cos(ang) * attention_factor).astype(np.float32), (np.sin(ang) * attention_factor).astype(np.float32)


def config_to_dict(cfg) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "raw"}
