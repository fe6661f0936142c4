"""Model configs: Hugging Face config.json -> dataclasses for the source GQA models and the MLA (DeepSeek-V3) models,
and the RoPE frequencies.

The fields are validated by `contract.parse_config` / `check_runnable` (the one place every tool, the planner included,
reads a model config), so every tool refuses unsupported or broken checkpoints the same way, before any weight is read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from youzhi_ms.contract import MLA_MODEL_TYPE, check_runnable, parse_config, rope_type
from youzhi_ms.errors import YouzhiError

_rope_type = rope_type  # the rope_scaling check lives in contract.py (pure Python, shared with the planner)


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
    def from_hf(cls, cfg: dict, where: str = "config.json") -> "SourceConfig":
        f = parse_config(cfg, where)
        if f["model_type"] == MLA_MODEL_TYPE:
            raise YouzhiError("this is already an MLA (deepseek_v3) checkpoint; load it with youzhi_ms.models.mla")
        check_runnable(cfg, f, where)
        return cls(
            arch=f["model_type"], vocab_size=f["vocab_size"], hidden_size=f["hidden_size"],
            intermediate_size=f["intermediate_size"], num_layers=f["num_hidden_layers"],
            num_heads=f["num_attention_heads"], num_kv_heads=f["num_key_value_heads"], head_dim=f["head_dim"],
            rms_norm_eps=f["rms_norm_eps"], rope_theta=f["rope_theta"], rope_scaling=f["rope_scaling"],
            max_position_embeddings=f["max_position_embeddings"] or 2048,
            tie_word_embeddings=f["tie_word_embeddings"], qkv_bias=f["qkv_bias"], o_bias=f["o_bias"],
            bos_token_id=f["bos_token_id"], eos_token_id=f["eos_token_id"], raw=dict(cfg))


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

    @classmethod
    def from_hf(cls, cfg: dict, where: str = "config.json") -> "MLAConfig":
        f = parse_config(cfg, where)
        if f["model_type"] != MLA_MODEL_TYPE:
            raise YouzhiError(f"expected a deepseek_v3 config, got model_type {cfg.get('model_type')!r}")
        check_runnable(cfg, f, where)
        return cls(
            vocab_size=f["vocab_size"], hidden_size=f["hidden_size"], intermediate_size=f["intermediate_size"],
            num_layers=f["num_hidden_layers"], num_heads=f["num_attention_heads"], kv_lora_rank=f["kv_lora_rank"],
            qk_nope_head_dim=f["qk_nope_head_dim"], qk_rope_head_dim=f["qk_rope_head_dim"],
            v_head_dim=f["v_head_dim"], q_lora_rank=f["q_lora_rank"], rms_norm_eps=f["rms_norm_eps"],
            rope_theta=f["rope_theta"], rope_scaling=f["rope_scaling"],
            rope_interleave=f["rope_interleave"],
            max_position_embeddings=f["max_position_embeddings"] or 2048,
            tie_word_embeddings=f["tie_word_embeddings"], attention_bias=f["qkv_bias"], q_bias=f["q_bias"],
            kv_layernorm=f["kv_layernorm"], bos_token_id=f["bos_token_id"], eos_token_id=f["eos_token_id"],
            raw=dict(cfg))


def load_any_config(cfg: dict, where: str = "config.json"):
    """SourceConfig or MLAConfig, by model_type."""
    if parse_config(cfg, where)["model_type"] == MLA_MODEL_TYPE:
        return MLAConfig.from_hf(cfg, where)
    return SourceConfig.from_hf(cfg, where)


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
